"""Where the bundled offline models live, without importing torch.

The runtime builds them (a tiny Llama and a tiny Qwen2 with tied embeddings, a shared
byte-level BPE tokenizer and a few LoRA adapters, all from fixed seeds) under
`$FAAS_HOME/models` (default `~/.cache/faas/models`); example functions point at them
through these helpers, so nobody edits paths. Their weights are random: the outputs are
gibberish, the mechanics are real.
"""

from __future__ import annotations

import os
from pathlib import Path

TINY_LLAMA = "tiny-llama"
TINY_QWEN2 = "tiny-qwen2"


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


def model_path(model: str = TINY_LLAMA) -> str:
    """Folder of a bundled backbone (config, safetensors weights, tokenizer)."""
    return str(models_dir() / model)


def adapter_path(adapter: str, model: str = TINY_LLAMA) -> str:
    """Folder of a bundled LoRA adapter of `model`."""
    return str(models_dir() / model / "adapters" / adapter)
