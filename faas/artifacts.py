"""What a deploy ships and checks, read from the files alone (no torch): a backbone's
fingerprint, a safetensors file's tensor shapes, and whether a LoRA adapter can run on a
given shared backbone.

A deployed function names its base model by a fingerprint of the model's `config.json`
(architecture, sizes, vocabulary), not by a path: paths differ between machines, and a node
serves the function with whichever local model folder has the same fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

# Written by the tools that saved the model, not part of what the model is.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype",
                         "_commit_hash", "use_cache"}
# Files a loader would unpickle: arbitrary code on every node that loads them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|"
                       r"lora_embedding_B|lora_magnitude_vector)(?:\.[^.]+)?\.?(?:weight)?$")


def safetensors_header(path: Path) -> dict[str, Any]:
    """Tensor name -> {"dtype", "shape", ...} from a safetensors file's JSON header."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > 100 << 20:
            raise ValueError(f"{path.name} is not a safetensors file (header of {length} bytes)")
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def model_fingerprint(model: Path) -> str:
    """`sha256:<hex>` of the model's config.json without the keys saving tools add."""
    config = json.loads((model / "config.json").read_text())
    kept = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    canonical = json.dumps(kept, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def model_shapes(model: Path) -> dict[str, list[int]]:
    """Parameter name -> shape of a model folder's safetensors weights (sharded or not)."""
    index = model / "model.safetensors.index.json"
    files = (sorted({model / f for f in json.loads(index.read_text())["weight_map"].values()})
             if index.is_file() else sorted(model.glob("*.safetensors")))
    if not files:
        raise ValueError(f"{model} has no safetensors weights")
    return {name: meta["shape"] for f in files for name, meta in safetensors_header(f).items()}


def looks_local(ref: str) -> bool:
    """Whether a model reference is a folder on this machine (else a hub id, `org/model`)."""
    return ref.startswith(("/", ".", "~")) or os.path.exists(ref)


def declared_models_problem(backbone: str | None, adapter: str | None) -> str | None:
    """Why the model folders a function declares cannot be served, or None. Checked by the
    SDK at declaration and, for the functions a node serves, by the node itself (its
    discovery runs where those folders may be hidden)."""
    try:
        if backbone is not None and looks_local(backbone):
            if not os.path.isdir(backbone):
                return f"backbone folder {backbone!r} does not exist"
            if not (Path(backbone) / "config.json").is_file():
                return f"backbone folder {backbone!r} has no config.json"
        if adapter is not None:
            if not os.path.isdir(adapter):
                return f"adapter folder {adapter!r} does not exist"
            problem = shared_backbone_problem(Path(adapter))
            if problem:
                return f"adapter {adapter!r} {problem}"
    except PermissionError as exc:
        return f"cannot read {exc.filename!r}: permission denied for uid {os.geteuid()}"
    except ValueError as exc:  # a config that is not JSON, a safetensors header that is not
        return f"model files are not readable as a model: {exc}"
    return None


def shared_backbone_problem(adapter: Path) -> str | None:
    """Why a LoRA adapter folder cannot run on a shared, read-only backbone, or None.

    Refused: no adapter_config.json; `modules_to_save` or trainable tokens (they replace
    backbone modules with private trained copies); saved embedding or output layers
    (resized vocabularies change the backbone itself).
    """
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        return "has no adapter_config.json"
    config = json.loads(config_file.read_text())
    if config.get("modules_to_save"):
        return (f"sets modules_to_save={config['modules_to_save']}: full module copies cannot "
                "run on a shared backbone")
    if config.get("trainable_token_indices"):
        return "trains token embeddings (trainable_token_indices): not shareable"
    weights = adapter / "adapter_model.safetensors"
    if weights.is_file():
        replaced = [k for k in safetensors_header(weights)
                    if "lora_" not in k and k.rsplit(".", 2)[-2] in ("embed_tokens", "lm_head", "wte")]
        if replaced:
            return (f"carries backbone layers {replaced[:2]} (resized embeddings?): "
                    "not shareable")
    return None


def adapter_problems(adapter: Path, backbone: Path) -> list[str]:
    """Why the LoRA adapter folder cannot be deployed for `backbone` ([] when it can):
    weights that are not safetensors, a missing config, modules_to_save or trainable tokens,
    target modules the backbone lacks, or LoRA matrices whose shapes do not fit it."""
    problems = [f"{p.relative_to(adapter)} is a pickle file: only safetensors weights are deployed"
                for p in sorted(adapter.rglob("*")) if p.suffix in PICKLE_SUFFIXES]
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        problems.append("has no adapter_model.safetensors")
    shared = shared_backbone_problem(adapter)
    if shared:
        problems.append(shared)
    if problems:
        return problems
    config = json.loads((adapter / "adapter_config.json").read_text())
    shapes = model_shapes(backbone)
    modules = {name.rsplit(".", 1)[0] for name in shapes}
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, m) for m in modules):
            problems.append(f"target_modules pattern {targets!r} matches no module of the backbone")
    else:
        missing = [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]
        if missing:
            problems.append(f"target modules {missing} are not in the backbone")
    lora = {key: meta["shape"] for key, meta in safetensors_header(weights).items()}
    problems += lora_shape_problems(lora, shapes)
    return problems


def lora_shape_problems(lora: dict[str, list[int]], base: dict[str, list[int]], most: int = 5) -> list[str]:
    """Why LoRA tensors (name -> shape) do not fit a backbone (parameter name -> shape):
    a module the backbone lacks, or matrices whose sizes are another model's ([] when
    they fit). Checked at deploy from the files and by the engine on what it is sent."""
    problems: list[str] = []
    for key, shape in lora.items():
        match = _LORA_KEY.match(key)
        if match is None:
            continue
        module, part = match["module"], match["part"]
        weight = base.get(module + ".weight")
        if weight is None:
            problems.append(f"{key}: the backbone has no module {module!r}")
        elif part == "lora_A" and len(weight) == 2 and shape[-1] != weight[1]:
            problems.append(f"{key}: {shape} does not fit {module} {weight} (another base model?)")
        elif part == "lora_B" and len(weight) == 2 and shape[0] != weight[0]:
            problems.append(f"{key}: {shape} does not fit {module} {weight} (another base model?)")
        if len(problems) >= most:
            break
    return problems
