"""How far a function's sandbox is loaded, and what each step costs (the pre-loader's profile).

A sandbox climbs the levels one step at a time, each step a frame to the sandbox:

- SPAWNED: forked from the zygote (python, torch, transformers and peft already imported);
- ATTACHED: device context up and the shared backbone mapped into a meta skeleton;
- STAGED: the adapter's weights read into host memory;
- LOADED: adapter on the device (peft, unmerged), tokenizer, handler module imported, `setup`
  run, warm-up forward done (when no request is waiting for it).

COLD is no sandbox at all. A function without a backbone has nothing to attach or stage:
those steps cost nothing for it.

A function that generates in the node's engine climbs the same levels at other costs: its
sandbox is forked from a light zygote (no torch), ATTACHED is a connection to the engine,
STAGED its adapter sent to the engine, LOADED the adapter on the engine's model and the
handler imported. Its profile is kept apart (`engine_key`), and there "the backbone" is the
engine: what starting it takes (the backbone exported, then loaded by the engine) and holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

from runtime.proc.usage import GIB, MIB


class Level(IntEnum):
    COLD = 0
    SPAWNED = 1
    ATTACHED = 2
    STAGED = 3
    LOADED = 4

    @property
    def label(self) -> str:
        """The name replies, logs and `faas ls` use."""
        return self.name.lower()


STEPS = (Level.SPAWNED, Level.ATTACHED, Level.STAGED, Level.LOADED)


# A NUL ends no file path or hub id: a model's name cannot pass for an engine's key.
_ENGINE = "\0engine"


def engine_key(model: str) -> str:
    """The profile (and plan) key of the functions that generate in `model`'s engine."""
    return model + _ENGINE


def model_of(key: str) -> tuple[str, bool]:
    """The model a profile key names, and whether it is an engine's."""
    return (key[:-len(_ENGINE)], True) if key.endswith(_ENGINE) else (key, False)


def _label(key: str | None) -> str:
    """How a profile key reads in listings."""
    if key is None:
        return "(plain)"
    model, engine = model_of(key)
    return f"{model} (engine)" if engine else model


def _weights_size(model: str) -> int:
    folder = Path(model)
    if not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".bin"))


@dataclass
class Cost:
    """One step's running estimate: its time and the memory the sandbox holds after it.
    Memory is what the sandbox holds privately (the backbone it maps is the backbone's)."""

    seconds: float
    host_bytes: int
    device_bytes: int = 0
    samples: int = 0

    def observe(self, seconds: float, host_bytes: int, device_bytes: int, weight: float = 0.3) -> None:
        """Fold in one measurement; the first replaces the prior."""
        if self.samples == 0:
            self.seconds, self.host_bytes, self.device_bytes = seconds, host_bytes, device_bytes
        else:
            self.seconds += weight * (seconds - self.seconds)
            self.host_bytes = round(self.host_bytes + weight * (host_bytes - self.host_bytes))
            self.device_bytes = round(self.device_bytes + weight * (device_bytes - self.device_bytes))
        self.samples += 1


def _prior() -> dict[Level, Cost]:
    # What the steps cost the bench's 190M Llama on the 2-core dev machine (bench/levels.py);
    # the first measurement of each step replaces it.
    return {Level.SPAWNED: Cost(0.015, 4 * MIB), Level.ATTACHED: Cost(0.1, 23 * MIB),
            Level.STAGED: Cost(0.01, 23 * MIB), Level.LOADED: Cost(0.18, 145 * MIB)}


def _engine_prior() -> dict[Level, Cost]:
    # The same on the engine (bench/runs/cpu-2core/engine/levels): a light sandbox.
    return {Level.SPAWNED: Cost(0.01, 3 * MIB), Level.ATTACHED: Cost(0.002, 3 * MIB),
            Level.STAGED: Cost(0.015, 4 * MIB), Level.LOADED: Cost(0.1, 4 * MIB)}


@dataclass
class LevelProfile:
    """The measured cost of each level for the functions of one backbone (None: plain
    Python functions), plus the backbone's own load time and size."""

    steps: dict[Level, Cost] = field(default_factory=_prior)
    backbone_seconds: float = 0.0
    backbone_bytes: int = 0
    backbone_device_bytes: int = 0

    def time_to_loaded(self, level: Level) -> float:
        """Seconds from `level` to LOADED (the rest of a cold start, backbone excluded)."""
        return sum(self.steps[step].seconds for step in STEPS if step > level)

    def saved(self, level: Level) -> float:
        """TTFT a request saves by finding a sandbox at `level` rather than none."""
        return self.time_to_loaded(Level.COLD) - self.time_to_loaded(level)

    def held(self, level: Level) -> tuple[int, int]:
        """(host, device) bytes a sandbox holds at `level`: never less than at a level below
        (a measurement after the heap was trimmed can be lower than one before)."""
        below = [self.steps[step] for step in STEPS if step <= level]
        return (max((c.host_bytes for c in below), default=0),
                max((c.device_bytes for c in below), default=0))

    def to_dict(self) -> dict[str, Any]:
        return {"steps": {step.label: {"ms": round(c.seconds * 1000, 1),
                                       "host_mib": round(c.host_bytes / MIB, 1),
                                       "device_mib": round(c.device_bytes / MIB, 1),
                                       "samples": c.samples}
                          for step, c in self.steps.items()},
                "backbone": {"ms": round(self.backbone_seconds * 1000, 1),
                             "host_mib": round(self.backbone_bytes / MIB, 1),
                             "device_mib": round(self.backbone_device_bytes / MIB, 1)}}


class Profiles:
    """The node's level profiles, one per backbone (None: plain functions), measured from
    every step a sandbox takes (first use replaces the prior, later ones refine it)."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self._by_model: dict[str | None, LevelProfile] = {}

    def of(self, model: str | None) -> LevelProfile:
        profile = self._by_model.get(model)
        if profile is None:
            profile = self._by_model[model] = LevelProfile()
            if model is None:  # nothing to attach or stage
                for step in (Level.ATTACHED, Level.STAGED):
                    profile.steps[step] = Cost(0.0, profile.steps[Level.SPAWNED].host_bytes)
            else:  # until it is loaded once: its size on disk, and a load time guessed from it
                folder, engine = model_of(model)
                size = _weights_size(folder)
                if engine:  # exported, then loaded again by the engine
                    profile.steps = _engine_prior()
                self.observe_backbone(model, (2.0 if engine else 1.0) * (1.0 + size / GIB), size)
        return profile

    @property
    def on_device(self) -> bool:
        return self.device != "cpu"

    def observe(self, model: str | None, level: Level, seconds: float, host_bytes: int,
                device_bytes: int) -> None:
        self.of(model).steps[level].observe(seconds, host_bytes, device_bytes)

    def observe_backbone(self, model: str, seconds: float, size: int, more: tuple[int, int] = (0, 0)) -> None:
        """A backbone's load time and size (in device memory on a GPU node, else in host),
        plus `more` (host, device) bytes that come with it (an engine's runtime and cache)."""
        profile = self.of(model)
        profile.backbone_seconds = seconds
        host, device = (0, size) if self.on_device else (size, 0)
        profile.backbone_bytes, profile.backbone_device_bytes = host + more[0], device + more[1]

    def to_dict(self) -> dict[str, Any]:
        return {_label(model): p.to_dict() for model, p in self._by_model.items()}
