"""Whom the memory guard offloads (runtime/memory/victims.py): a pure policy over plain
data, checked without processes."""

from __future__ import annotations

from runtime.memory.victims import Idle, victims
from runtime.sandbox.levels import Level

MIB = 1 << 20


def _idle(key: str, value: float = 0.0, idle_since: float = 0.0, level: Level = Level.LOADED,
          host: int = 40 * MIB, device: int = 0) -> Idle:
    return Idle(key, value, idle_since, level, host, device,
                staged_host_bytes=host + device // 100, staged_device_bytes=0)  # the adapter


def test_the_least_valuable_then_the_longest_idle_stop_first_and_no_more_than_needed():
    idle = [_idle("valued", value=5.0, idle_since=0.0), _idle("recent", idle_since=100.0),
            _idle("oldest", idle_since=1.0), _idle("spare", value=9.0)]
    moves = victims(70 * MIB, 0, idle)
    assert [(c.key, to) for c, to in moves] == [("oldest", Level.COLD), ("recent", Level.COLD)]
    assert victims(0, 0, idle) == []  # within the budget: nothing moves


def test_where_only_the_device_is_short_an_adapter_goes_to_host_memory_first():
    idle = [_idle("a", idle_since=1.0, device=300 * MIB), _idle("b", idle_since=2.0, device=300 * MIB)]
    moves = victims(-100 * MIB, 200 * MIB, idle)  # host has room for the adapters
    assert [(c.key, to) for c, to in moves] == [("a", Level.STAGED)]
    # A staged one holds no device memory: it can only stop, and only for host memory.
    staged = [_idle("s", level=Level.STAGED, host=100 * MIB)]
    assert [(c.key, to) for c, to in victims(50 * MIB, 0, staged)] == [("s", Level.COLD)]


def test_when_every_idle_sandbox_is_not_enough_nothing_moves():
    assert victims(500 * MIB, 0, [_idle("a"), _idle("b")]) is None
    assert victims(0, 1, [_idle("a", level=Level.STAGED)]) is None
