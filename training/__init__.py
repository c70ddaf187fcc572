"""The example functions' adapters for the bundled SmolLM2: datasets written by a script with
a fixed seed (`training.data`), LoRA training on CPU (`training.train`), held-out metrics
against the bare backbone (`training.evaluate`). The trained adapters are written to
`runtime/models/adapters/<function>/`: the runtime ships them and copies them beside the model."""

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
