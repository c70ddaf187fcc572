"""Offloading and memory admission: the node never holds more than its memory budget.

What the node holds is measured, not assumed: each sandbox's private memory and device
memory as it reported them at its last step (or, while it climbs, what its target level
costs in the profile), plus every backbone loaded and what each generation engine holds
beyond it (its runtime, the adapters of its functions, its KV cache). Before a new sandbox starts (a request's
cold start, or the pre-loader's), `admit` checks that it fits. When it does not, idle
artifacts move down a level, lowest value first (the pre-loader's value of their function,
then the longest idle): on a GPU an idle LOADED sandbox first moves its adapter from the
device to host memory (STAGED), and only then are idle sandboxes stopped. Nothing serving
or climbing is touched. When even that cannot make room, the request gets a 503 with a
retry hint instead of the node running out of memory.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from faas.logs import get_logger
from runtime.backbone.registry import BackboneRegistry
from runtime.memory.budget import Budget
from runtime.memory.victims import Idle, victims
from runtime.sandbox.levels import Level, Profiles

if TYPE_CHECKING:
    from runtime.engine.registry import EngineRegistry
    from runtime.pool.leases import FunctionPool
    from runtime.pool.slots import Slot


class MemoryGuard:
    """Admission and offloading over every pool of the node (see the module docstring)."""

    def __init__(self, pools: dict[str, FunctionPool], backbones: BackboneRegistry,
                 profiles: Profiles, budget: Budget,
                 value: Callable[[str], float] = lambda name: 0.0,
                 engines: EngineRegistry | None = None) -> None:
        self.pools = pools
        self.backbones = backbones
        self.engines = engines
        self.profiles = profiles
        self.budget = budget
        self.value = value
        self.offloaded = 0
        self.refused = 0
        self.log = get_logger(component="memory")

    def full(self, margin: float = 0.95) -> bool:
        """Whether the node holds nearly its whole budget (peers then stop forwarding here)."""
        host, device = self.held()
        return (host >= margin * self.budget.host_bytes
                or bool(self.budget.device_bytes) and device >= margin * self.budget.device_bytes)

    def held(self) -> tuple[int, int]:
        """(host, device) bytes the node's sandboxes, backbones and engines hold now."""
        host = device = 0
        for pool in self.pools.values():
            h, d = pool.held_bytes()
            host, device = host + h, device + d
        for backbone in self.backbones.state():
            if self.profiles.on_device:
                device += backbone["bytes"]
            else:
                host += backbone["bytes"]
        if self.engines is not None:
            h, d = self.engines.held_bytes()
            host, device = host + h, device + d
        return host, device

    def _need(self, pool: FunctionPool, have: Level, target: Level) -> tuple[int, int]:
        """What moving one of `pool`'s sandboxes from `have` to `target` adds, with its
        backbone when that is not loaded yet."""
        model = pool.spec.backbone
        profile = self.profiles.of(pool.profile_key)
        host, device = profile.held(target)
        had_host, had_device = profile.held(have) if have > Level.COLD else (0, 0)
        host, device = max(0, host - had_host), max(0, device - had_device)
        running = self.engines.state() if pool.on_engine and self.engines is not None else self.backbones.state()
        if model is not None and target >= Level.ATTACHED and not any(b["model"] == model for b in running):
            host += profile.backbone_bytes
            device += profile.backbone_device_bytes
        return host, device

    def _over(self, need: tuple[int, int]) -> tuple[int, int]:
        host, device = self.held()
        over_host = host + need[0] - self.budget.host_bytes
        over_device = device + need[1] - self.budget.device_bytes if self.budget.device_bytes else 0
        return over_host, over_device

    def fits(self, pool: FunctionPool, have: Level, target: Level) -> bool:
        """Whether a sandbox of `pool` may go from `have` to `target` as things are."""
        over_host, over_device = self._over(self._need(pool, have, target))
        return over_host <= 0 and over_device <= 0

    def admit(self, pool: FunctionPool, slot: Slot | None) -> bool:
        """Room for `slot` of `pool` to climb to LOADED (None: a new sandbox), offloading
        idle artifacts of any function when needed; False when no room can be made
        (nothing was moved then)."""
        have = Level.COLD if slot is None else slot.level
        if slot is not None and Level.LOADED in (slot.level, slot.target):
            return True  # there, or already counted as getting there
        over_host, over_device = self._over(self._need(pool, have, Level.LOADED))
        if over_host <= 0 and over_device <= 0:
            return True
        if not any(p.instances for p in self.pools.values()):
            return True  # nothing to wait for or offload (the cost may be a prior's guess)
        idle: list[Idle] = []
        for other in self.pools.values():
            staged = self.profiles.of(other.profile_key).held(Level.STAGED)
            for held in other.idle_slots():
                if held is not slot:
                    idle.append(Idle((other, held), self.value(other.name), held.idle_since, held.level,
                                     *other.slot_bytes(held), *staged))
        moves = victims(over_host, over_device, idle)
        if moves is None:
            self.refused += 1
            self.log.warning("memory_admission_refused", fn=pool.name,
                             held_mib=[round(b / 2**20, 1) for b in self.held()],
                             budget_mib=[round(self.budget.host_bytes / 2**20, 1),
                                         round(self.budget.device_bytes / 2**20, 1)])
            return False
        for candidate, to in moves:
            other, held = candidate.key
            self.offloaded += 1
            self.log.info("sandbox_offloaded", fn=other.name, to=to.label, level=held.level.label,
                          for_fn=pool.name, idle_s=round(time.monotonic() - held.idle_since, 1))
            other.offload(held, to)
        return True

    def retry_after_s(self) -> float:
        """When a refused request may find room: about when the soonest serving function
        finishes a request."""
        serving = [pool.service_s for pool in self.pools.values() if pool.serving]
        return max(0.5, min(serving, default=1.0))

    def state(self) -> dict[str, object]:
        host, device = self.held()
        return {"held_mib": {"host": round(host / 2**20, 1), "device": round(device / 2**20, 1)},
                "budget_mib": {"host": round(self.budget.host_bytes / 2**20, 1),
                               "device": round(self.budget.device_bytes / 2**20, 1)},
                "offloaded": self.offloaded, "refused": self.refused}
