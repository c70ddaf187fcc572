"""The pre-loader: invocation history -> predictions -> plan -> sandboxes and backbones.

It re-plans on a timer, whenever an invocation arrives (on any node: the history is shared)
or a sandbox changes state, and on deploy (start). Applying a plan first stops what it
drops, lowest value first (never a busy or climbing sandbox), then pins the backbones it
keeps (for functions that generate in the engine: the engine, `levels.engine_key`) and has
each function's sandbox climb to its planned level, most valuable first, only while no
request needs the cores.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from faas.logs import get_logger
from runtime.backbone.registry import BackboneRegistry
from runtime.engine.registry import EngineRegistry
from runtime.memory.budget import machine_budget
from runtime.pool.leases import FunctionPool
from runtime.preload.history import History
from runtime.preload.plan import Demand, Plan, make_plan
from runtime.preload.predict import HybridHistogram, Prediction, Predictor, RateEstimate, followers
from runtime.proc.usage import GIB
from runtime.sandbox.levels import Level, Profiles, engine_key, model_of


@dataclass(frozen=True)
class PreloadConfig:
    """How the node pre-loads. Disabled, sandboxes and backbones live for their fixed
    keep-alives after use and nothing starts ahead of a request."""

    enabled: bool = True
    predictor: str = "histogram"  # or "rate"
    horizon_s: float = 5.0  # chances are of an invocation within this long
    interval_s: float = 1.0  # re-plan at least this often
    linger_s: float = 10.0  # a backbone the plan no longer pins stays this long after its last user
    host_budget_gib: float | None = None  # default: a quarter of the machine's memory
    device_budget_gib: float | None = None  # default: half of the device's memory (GPU nodes)
    # Seconds of expected TTFT that justify holding one GiB for one second.
    price_s_per_gib_s: float = 0.1
    # For functions with too little history (the predictor's fallback) and for the extra
    # sandboxes a burst started beyond the one the plan keeps: what --no-preload keeps all by.
    keep_alive_s: float = 600.0

    def make_predictor(self) -> Predictor:
        if self.predictor == "histogram":
            return HybridHistogram(fallback_keep_alive_s=self.keep_alive_s)
        if self.predictor == "rate":
            return RateEstimate()
        raise ValueError(f"unknown predictor {self.predictor!r} (histogram or rate)")


class Preloader:
    def __init__(self, pools: dict[str, FunctionPool], backbones: BackboneRegistry,
                 profiles: Profiles, history: History, config: PreloadConfig, device: str,
                 share: Callable[[str], float] = lambda name: 1.0,
                 engines: EngineRegistry | None = None) -> None:
        self.pools = pools
        # The part of each function's demand this node plans for (runtime/node/cluster.py:
        # one node of a cluster pre-loads a function, the others forward to it).
        self.share = share
        self.backbones = backbones
        self.engines = engines
        self.profiles = profiles
        self.history = history
        self.config = config
        self.predictor = config.make_predictor()
        # What pre-loading may fill (the node then holds it to its own budget, if smaller).
        self.budget = machine_budget(config.host_budget_gib, config.device_budget_gib, device, 1 / 4, 1 / 2)
        self.plan: Plan | None = None
        self.predictions: dict[str, Prediction] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pins: dict[str, asyncio.Task[Any]] = {}  # plan key -> its backbone or engine
        self._closing = False
        self.cores = os.cpu_count() or 2
        self.max_climbs = max(1, self.cores // 2)
        self.log = get_logger(component="preload")

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="preloader")

    def poke(self, *_: Any) -> None:
        """Something changed (an invocation, a sandbox): re-plan soon."""
        self._wake.set()

    async def _run(self) -> None:
        while not self._closing:
            # Not wait_for: on Python 3.11 it can swallow a cancel that races a wake-up.
            woken = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait([woken], timeout=self.config.interval_s)
            finally:
                woken.cancel()
            self._wake.clear()
            try:
                self.replan()
            except Exception:  # a bug here must not stop serving: log it and plan again later
                self.log.exception("replan_failed")
            await asyncio.sleep(0.05)  # a burst of invocations re-plans once, not per message

    def replan(self) -> Plan:
        now = time.time()
        loaded = {b["model"]: b for b in self.backbones.state()}
        for b in loaded.values():
            self.profiles.observe_backbone(b["model"], b["load_ms"] / 1000, b["bytes"])
        engines = self.engines.state() if self.engines is not None else []
        for e in engines:  # its start: the backbone exported, then loaded by the engine
            b = loaded.get(e["model"], {"load_ms": 0.0, "bytes": 0})
            self.profiles.observe_backbone(engine_key(e["model"]), (b["load_ms"] + e["load_ms"]) / 1000,
                                           b["bytes"], self.engines.held_bytes(e["model"]))
        self.predictions = {
            name: self.predictor.predict(self.history.arrivals.get(name, []), now, self.config.horizon_s)
            for name in self.pools}
        demands = [self._demand(name, pool) for name, pool in self.pools.items()]
        plan = make_plan(demands, self.profiles.of, self.budget, self.config.horizon_s,
                         self.config.price_s_per_gib_s,
                         frozenset([*loaded, *(engine_key(e["model"]) for e in engines)]))
        self._apply(plan)
        self.plan = plan
        return plan

    def _demand(self, name: str, pool: FunctionPool) -> Demand:
        chance = self.predictions[name].chance * self.share(name)
        bursts = followers(self.history.arrivals.get(name, []), self.config.horizon_s,
                           pool.spec.max_instances - 1, per=pool.max_batch)
        return Demand(name, pool.profile_key, chance, pool.busy, pool.held_level,
                      tuple(chance * share for share in bursts))

    def _apply(self, plan: Plan) -> None:
        serving = {name for name, pool in self.pools.items() if pool.busy}
        # A function being served keeps its idle sandboxes (the plan leaves it alone).
        for name in sorted(set(self.pools) - serving, key=lambda n: plan.values.get(n, 0.0)):
            stopped = self.pools[name].trim(self._levels(plan, name), self.config.keep_alive_s)
            if stopped:
                self.log.info("preload_dropped", fn=name, sandboxes=stopped,
                              planned=plan.levels[name].label,
                              chance=round(self.predictions[name].chance, 3))
        in_use = {self.pools[name].profile_key for name in serving}
        for key, pin in list(self._pins.items()):  # failed, or retired (corrupted, died): pin anew
            if pin.done() and (pin.cancelled() or pin.exception() is not None
                               or not self._registry(key).is_live(pin.result())):
                del self._pins[key]
                pin.add_done_callback(self._unpin(key))
        for key in set(self._pins) - plan.backbones - in_use:
            pin = self._pins.pop(key)
            pin.add_done_callback(self._unpin(key))
        for key in plan.backbones - set(self._pins):
            self._pins[key] = asyncio.create_task(self._registry(key).acquire(model_of(key)[0]))
            model, engine = model_of(key)
            self.log.info("preload_backbone", model=model, engine=engine,
                          value_s=round(plan.values[key], 3))
        # Background loading must not starve serving: a few climbs at a time, the most
        # valuable first, none while requests keep every core busy (an engine computes with
        # all of them, and a climb's last step puts the adapter on between its turns); the
        # rest follow at the next plans.
        room = self.max_climbs - sum(pool.climbing for pool in self.pools.values())
        busy = [pool for pool in self.pools.values() if pool.serving]
        if any(pool.on_engine for pool in busy) or sum(pool.serving for pool in busy) >= self.cores:
            room = 0
        for name in plan.order:
            if room <= 0:
                break
            pool = self.pools[name]
            started = pool.prepare(self._levels(plan, name), room)
            if started:
                self.log.info("preload", fn=name, to=plan.levels[name].label,
                              more=[level.label for level in plan.extra[name]],
                              chance=round(self.predictions[name].chance, 3),
                              why=self.predictions[name].why)
            room -= started

    @staticmethod
    def _levels(plan: Plan, name: str) -> list[Level]:
        return [plan.levels[name], *plan.extra[name]]

    def _registry(self, key: str) -> Any:
        """Where a plan key's backbone is kept: the engines, or the backbones."""
        return self.engines if model_of(key)[1] and self.engines is not None else self.backbones

    def _unpin(self, key: str) -> Callable[[asyncio.Task[Any]], None]:
        def release(pin: asyncio.Task[Any]) -> None:
            if not pin.cancelled() and pin.exception() is None:
                self._registry(key).release(pin.result())

        return release

    def value(self, name: str) -> float:
        """Expected seconds of TTFT that `name`'s pre-loaded sandboxes save (what offloading
        weighs them by; 0 before the first plan)."""
        return self.plan.values.get(name, 0.0) if self.plan is not None else 0.0

    def describe(self, name: str) -> dict[str, Any]:
        """What `faas ls` shows of the plan for one function, and why."""
        prediction = self.predictions.get(name)
        if self.plan is None or prediction is None:
            return {}
        return {"planned": "+".join(level.label for level in self._levels(self.plan, name)),
                "chance": round(prediction.chance, 4),
                "why": prediction.why, "value_s": round(self.plan.values.get(name, 0.0), 4)}

    def summary(self) -> dict[str, Any]:
        plan = self.plan
        return {"predictor": self.config.predictor, "horizon_s": self.config.horizon_s,
                "budget_gib": {"host": round(self.budget.host_bytes / GIB, 3),
                               "device": round(self.budget.device_bytes / GIB, 3)},
                "planned_gib": {"host": round(plan.host_bytes / GIB, 3) if plan else 0.0,
                                "device": round(plan.device_bytes / GIB, 3) if plan else 0.0},
                "backbones": sorted(plan.backbones) if plan else [],
                "profiles": self.profiles.to_dict(), "shared_history": self.history.shared}

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for pin in self._pins.values():
            pin.cancel()
        await asyncio.gather(*self._pins.values(), return_exceptions=True)
        self._pins.clear()
