"""The example functions (`functions/*.py` at the repository root), loaded by path: the
datasets and the metrics use their prompts and post-processing, so what is trained and
measured is exactly what the deployed function sends and returns."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

FUNCTIONS = Path(__file__).resolve().parent.parent / "functions"


def load(name: str) -> ModuleType:
    """The module `functions/<name>.py`, imported once."""
    key = f"faas_example_{name}"
    if key not in sys.modules:
        from faas.bundled import MODEL_ENV, TINY_LLAMA, models_dir
        from runtime.models.zoo import ensure_tiny_models

        spec = importlib.util.spec_from_file_location(key, FUNCTIONS / f"{name}.py")
        if spec is None or spec.loader is None:
            raise FileNotFoundError(FUNCTIONS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        # The decorator checks that the function's model folders exist, and SmolLM2's adapters
        # do not before they are trained here: the module is imported against the tiny model
        # (only its prompts and post-processing are used).
        models_dir().mkdir(parents=True, exist_ok=True)
        ensure_tiny_models(models_dir())
        previous = os.environ.get(MODEL_ENV)
        os.environ[MODEL_ENV] = TINY_LLAMA
        try:
            spec.loader.exec_module(module)
        finally:
            if previous is None:
                del os.environ[MODEL_ENV]
            else:
                os.environ[MODEL_ENV] = previous
        sys.modules[key] = module
    return sys.modules[key]


def messages(task: str, event: dict) -> list[dict[str, str]]:
    """The chat messages the function `task` sends its model for `event`."""
    module = load(task)
    if task == "support":
        message = str(event.get("message", ""))
        return module.messages_for(message, module.facts_for(message, module.FAQ))
    return module.messages_for(event)


def postprocess(task: str, text: str) -> str:
    """What the function `task` returns for the model's text."""
    module = load(task)
    return module.postprocess(text) if hasattr(module, "postprocess") else text.strip()
