"""Whom to offload to make room: a pure function over plain data (the guard measures, this
decides), unit-tested without processes."""

from __future__ import annotations

from dataclasses import dataclass

from runtime.sandbox.levels import Level


@dataclass(frozen=True)
class Idle:
    """An idle sandbox the guard may move down: what it holds now and what it would hold at
    STAGED (its adapter off the device, in host memory)."""

    key: object  # the caller's handle on it
    value: float  # the pre-loader's value of its function: the lowest goes first
    idle_since: float  # then the longest idle
    level: Level
    host_bytes: int
    device_bytes: int
    staged_host_bytes: int
    staged_device_bytes: int


def victims(over_host: int, over_device: int, idle: list[Idle]) -> list[tuple[Idle, Level]] | None:
    """The moves that bring what is held `over_host` / `over_device` bytes over the budget
    back within it: lowest value first, then the longest idle; a LOADED sandbox only gives
    up its device memory (to STAGED) while the device alone is over, anything else stops
    (COLD). None when even every idle sandbox is not enough (then nothing should move)."""
    moves: list[tuple[Idle, Level]] = []
    for candidate in sorted(idle, key=lambda c: (c.value, c.idle_since)):
        if over_host <= 0 and over_device <= 0:
            break
        if over_device > 0 and over_host <= 0 and candidate.level == Level.LOADED and candidate.device_bytes:
            moves.append((candidate, Level.STAGED))
            over_device -= candidate.device_bytes - candidate.staged_device_bytes
            over_host += max(0, candidate.staged_host_bytes - candidate.host_bytes)
        else:
            moves.append((candidate, Level.COLD))
            over_host -= candidate.host_bytes
            over_device -= candidate.device_bytes
    return None if over_host > 0 or over_device > 0 else moves
