"""Per-function sandbox pool: admission (bounded queue), leasing, climbing the levels,
replacement.

Sandboxes are leased to one function only and never reused for another. Each is a `Slot`
from the moment its start is decided: it climbs the levels of runtime/levels.py in a task
the pool owns, towards a target set by a request (LOADED) or by the pre-loader (any level).
A request takes the free slot that is furthest up (a LOADED idle one at once; one below
LOADED is finished for it, without the warm-up); when there is none and fewer than
`max_instances` exist, it starts one (the cold start). A request that gives up leaves the
climb to finish and the sandbox to the next request. A sandbox that dies, or that is killed
because a request ran past its budget, is dropped and the next request starts a fresh one.

Idle sandboxes are stopped `keep_alive_s` after their last use when the pool has one; under
the pre-loader (`keep_alive_s=None`) the plan decides, through `prepare` and `trim`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from faas.errors import DeadlineExceeded, FaasError, HandlerError, Overloaded
from faas.logs import get_logger
from runtime.backbones import Backbone, BackboneRegistry
from runtime.isolation import Isolation
from runtime.levels import Level, Profiles
from runtime.sandboxes import (
    Sandbox,
    SandboxConfig,
    SandboxDied,
    SandboxGone,
    SandboxResult,
    StepCost,
    Zygote,
    fork_sandbox,
)


@dataclass
class Served:
    """What the pool hands back for one request: the handler's result and its timing."""

    result: SandboxResult
    leased_at: float  # time.monotonic() when a sandbox was leased (end of queueing)
    level: Level  # what the request found: the level of the sandbox it got, COLD if none


@dataclass(eq=False)
class Slot:
    """One sandbox of the function, from the moment its start is decided."""

    sandbox: Sandbox | None = None
    level: Level = Level.COLD  # reached
    target: Level = Level.COLD  # climbing towards
    climb: asyncio.Task[None] | None = None
    waiter: asyncio.Future[None] | None = None  # a request's, resolved when it may use the slot
    busy: bool = False
    idle_since: float = field(default_factory=time.monotonic)
    expiry: asyncio.TimerHandle | None = None
    load_s: float = 0.0  # spent in its own steps (what start_timeout_s bounds)

    @property
    def free(self) -> bool:
        """Neither serving nor promised to a request."""
        return not self.busy and self.waiter is None


class FunctionPool:
    """The sandboxes of one function on this node."""

    def __init__(self, spec: dict[str, Any], config: SandboxConfig, zygote: Zygote,
                 backbones: BackboneRegistry, isolation: Isolation, profiles: Profiles,
                 keep_alive_s: float | None, on_change: Callable[[], None] = lambda: None) -> None:
        self.spec = spec
        self.name: str = spec["name"]
        self._config = config
        self._zygote = zygote
        self.isolation = isolation
        self._backbones = backbones
        self._profiles = profiles
        self._keep_alive_s = keep_alive_s
        self._on_change = on_change
        self._slots: list[Slot] = []
        self._waiting = 0
        self._failures = 0
        self._last_failure: FaasError | None = None
        self._start_failed = False  # the last start failed: pre-load again only after one succeeds
        self._cond = asyncio.Condition()
        self._stopping: set[asyncio.Task[None]] = set()  # stopped sandboxes; close() waits for them
        self._closed = False
        self.log = get_logger(fn=self.name)

    # --- admission and state --------------------------------------------------------

    def admit(self) -> None:
        """Take a request into the queue, or raise Overloaded when `max_queue` requests are
        already waiting. Synchronous, so a burst of callbacks cannot overshoot the bound;
        every admitted request must then be passed to `serve`."""
        if self._closed:
            raise Overloaded(f"function {self.name!r} is shutting down on this node")
        if self._waiting >= self.spec["max_queue"]:
            raise Overloaded(f"function {self.name!r} has {self._waiting} requests queued "
                             f"(max_queue={self.spec['max_queue']})")
        self._waiting += 1

    @property
    def instances(self) -> int:
        return len(self._slots)

    @property
    def busy(self) -> bool:
        return any(not s.free for s in self._slots)

    @property
    def held_level(self) -> Level:
        """How far the furthest idle sandbox of this function is loaded."""
        return max((s.level for s in self._slots if s.free and s.climb is None), default=Level.COLD)

    def state(self) -> dict[str, Any]:
        return {"idle": sum(1 for s in self._slots if s.free and s.climb is None),
                "busy": sum(1 for s in self._slots if s.busy),
                "starting": sum(1 for s in self._slots if s.climb is not None),
                "queued": self._waiting,
                "levels": [s.level.label for s in self._slots]}

    # --- serving --------------------------------------------------------------------

    async def serve(self, request_id: str, event: dict[str, Any], deadline: float) -> Served:
        """Lease a sandbox for an admitted request, run the handler and give the sandbox
        back; a sandbox that outlives `deadline` (time.monotonic()) is killed. A sandbox
        found dead before the request reached it (it died idle, and the node had not heard
        yet) is dropped and another one leased, once."""
        try:
            slot, found = await self._with_deadline(self._lease(), deadline, "waiting for a sandbox")
        finally:
            self._waiting -= 1
        try:
            return await self._run(slot, found, request_id, event, deadline)
        except SandboxGone:
            slot, found = await self._with_deadline(self._lease(), deadline, "waiting for a sandbox")
            return await self._run(slot, found, request_id, event, deadline)

    async def _run(self, slot: Slot, found: Level, request_id: str, event: dict[str, Any],
                   deadline: float) -> Served:
        leased_at = time.monotonic()
        sandbox = slot.sandbox
        assert sandbox is not None
        try:
            result = await self._with_deadline(sandbox.invoke(request_id, event), deadline,
                                               "in the handler")
        except DeadlineExceeded:
            self.log.warning("sandbox_killed_past_deadline", req=request_id, pid=sandbox.proc.pid)
            await sandbox.kill()
            raise
        except asyncio.CancelledError:
            # It still owes this request's reply: never lease it to another request.
            await sandbox.kill()
            raise
        except SandboxDied:
            self.log.error("sandbox_died", req=request_id, pid=sandbox.proc.pid,
                           code=sandbox.proc.returncode)
            raise
        finally:
            await self._release(slot)
        return Served(result=result, leased_at=leased_at, level=found)

    async def _with_deadline(self, aw: Any, deadline: float, where: str) -> Any:
        try:
            return await asyncio.wait_for(aw, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise DeadlineExceeded(f"function {self.name!r} ran out of budget {where}") from None

    async def _lease(self) -> tuple[Slot, Level]:
        """A sandbox for one request and the level it found. When the sandbox it waited for
        dies while loading (killed, or its zygote died), it tries once more: it may have
        taken over a climb the pre-loader started before that death was noticed."""
        try:
            return await self._lease_once()
        except SandboxDied:
            return await self._lease_once()

    async def _lease_once(self) -> tuple[Slot, Level]:
        async with self._cond:
            seen_failures = self._failures
            while True:
                free = [s for s in self._slots if s.free]
                if free:
                    slot = max(free, key=lambda s: (s.level, s.climb is None))
                    found = slot.level
                    break
                if self._failures != seen_failures and self._last_failure is not None:
                    raise self._last_failure
                if self._closed:
                    raise Overloaded(f"function {self.name!r} is shutting down on this node")
                if self.instances < self.spec["max_instances"]:
                    slot = Slot()
                    self._slots.append(slot)
                    found = Level.COLD
                    break
                await self._cond.wait()
            if slot.level == Level.LOADED and slot.climb is None:
                self._take(slot)
                return slot, found
            slot.waiter = asyncio.get_running_loop().create_future()
            self._raise_target(slot, Level.LOADED)
            waiter = slot.waiter
        try:
            await waiter
        except asyncio.CancelledError:
            async with self._cond:
                if slot.waiter is waiter:  # not handed over yet: the climb parks it idle
                    slot.waiter = None
                elif slot.busy:  # handed over as we gave up: give it back
                    slot.busy = False
                    self._park(slot)
                self._cond.notify_all()
            raise
        return slot, found

    def _take(self, slot: Slot) -> None:
        slot.busy = True
        if slot.expiry is not None:
            slot.expiry.cancel()
            slot.expiry = None

    async def _release(self, slot: Slot) -> None:
        async with self._cond:
            slot.busy = False
            sandbox = slot.sandbox
            keep = sandbox is not None and sandbox.alive and not self._closed
            if keep:
                self._park(slot)
            else:
                self._slots.remove(slot)
            self._cond.notify_all()
        if not keep and sandbox is not None:
            await sandbox.stop(self._config.stop_grace_s)
        self._on_change()

    # --- climbing the levels --------------------------------------------------------

    def _raise_target(self, slot: Slot, target: Level) -> bool:
        """Make `slot` climb to at least `target` (call with the condition held); True when
        that starts a climb."""
        slot.target = max(slot.target, target)
        if slot.expiry is not None:
            slot.expiry.cancel()
            slot.expiry = None
        if slot.climb is None and slot.level < slot.target:
            slot.climb = asyncio.create_task(self._climb(slot), name=f"climb-{self.name}")
            return True
        return False

    async def _climb(self, slot: Slot) -> None:
        failure: FaasError | None = None
        try:
            await self._steps(slot)
        except TimeoutError:
            failure = HandlerError(f"sandbox of {self.name!r} did not load within "
                                   f"start_timeout_s={self.spec['start_timeout_s']:g}")
        except FaasError as exc:
            failure = exc
        except asyncio.CancelledError:  # close(): the pool is going away
            failure = Overloaded(f"function {self.name!r} is shutting down on this node")
        except Exception as exc:  # spawning itself failed (fork, exec, socket)
            failure = HandlerError(f"could not start a sandbox for {self.name!r}: {exc}")
        if failure is not None and slot.sandbox is not None:
            await slot.sandbox.kill()
        async with self._cond:
            slot.climb = None
            if failure is not None:
                if not self._closed:
                    self.log.error("sandbox_start_failed", error=failure.message)
                self._slots.remove(slot)
                self._failures += 1
                self._last_failure = failure
                self._start_failed = True
                if slot.waiter is not None and not slot.waiter.done():
                    slot.waiter.set_exception(failure)
            elif self._closed:
                self._slots.remove(slot)
            elif slot.level < slot.target:  # the target was raised during the last step
                slot.climb = asyncio.create_task(self._climb(slot), name=f"climb-{self.name}")
            else:
                self._start_failed = False
                if slot.waiter is not None:
                    self._take(slot)
                    slot.waiter.set_result(None)
                    slot.waiter = None
                else:
                    self._park(slot)
            self._cond.notify_all()
        if failure is None and self._closed and slot.sandbox is not None:
            await slot.sandbox.stop(self._config.stop_grace_s)
        self._on_change()

    async def _steps(self, slot: Slot) -> None:
        """Climb to the slot's target. `start_timeout_s` bounds the sandbox's own steps, all
        climbs of the slot together; waiting for the zygote or a backbone load is not
        counted (the backbone has its own limit)."""
        started = time.monotonic()
        if slot.sandbox is None:
            await self._zygote.ready()
            sandbox, cost = await self._within_start_timeout(
                slot, fork_sandbox(self.spec, self._config, self._zygote, self.isolation))
            slot.sandbox = sandbox
            sandbox.proc.add_exit_callback(lambda code: self._exited(slot, code))
            self._reached(slot, cost)
        sandbox = slot.sandbox
        while slot.level < slot.target:
            level = Level(slot.level + 1)
            frame = {"type": "step", "level": int(level),
                     "warm_up": slot.waiter is None}  # nobody waiting: pay first-call costs now
            if level == Level.ATTACHED and self.spec["backbone"] is not None:
                backbone = await self._backbones.acquire(self.spec["backbone"])
                sandbox.hold(self._backbone_release(backbone, sandbox))
                step = sandbox.step(frame, backbone)
            else:
                step = sandbox.step(frame)
            self._reached(slot, await self._within_start_timeout(slot, step))
        sandbox.log.info("sandbox_climbed", level=slot.level.label,
                         ms=round((time.monotonic() - started) * 1000, 1))

    async def _within_start_timeout(self, slot: Slot, step: Any) -> Any:
        started = time.monotonic()
        try:
            return await asyncio.wait_for(step, max(0.0, self.spec["start_timeout_s"] - slot.load_s))
        finally:
            slot.load_s += time.monotonic() - started

    def _backbone_release(self, backbone: Backbone, sandbox: Sandbox) -> Callable[[], None]:
        """What lets go of `backbone` once, however the sandbox ends; meanwhile the sandbox
        is killed if the backbone's weights are found corrupted."""
        kill = sandbox.proc.kill
        backbone.on_corrupt.add(kill)

        def release() -> None:
            backbone.on_corrupt.discard(kill)
            self._backbones.release(backbone)

        return release

    def _reached(self, slot: Slot, cost: StepCost) -> None:
        slot.level = cost.level
        self._profiles.observe(self.spec["backbone"], cost.level, cost.seconds, cost.host_bytes,
                               cost.device_bytes)

    # --- idle sandboxes -------------------------------------------------------------

    def _park(self, slot: Slot) -> None:
        """Make a slot leasable; with a keep-alive, stop it if nobody leases it in time."""
        slot.idle_since = time.monotonic()
        if self._keep_alive_s is not None:
            slot.expiry = asyncio.get_running_loop().call_later(self._keep_alive_s, self._expire, slot)

    def _expire(self, slot: Slot) -> None:
        slot.expiry = None
        self.log.info("sandbox_expired", pid=slot.sandbox.proc.pid if slot.sandbox else None,
                      keep_alive_s=self._keep_alive_s)
        self._stop(slot)

    def _stop(self, slot: Slot) -> None:
        """Stop an idle slot in the background (close() waits for it)."""
        self._slots.remove(slot)
        if slot.sandbox is not None:
            task = asyncio.create_task(slot.sandbox.stop(self._config.stop_grace_s))
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    def _exited(self, slot: Slot, code: int) -> None:
        """A sandbox process ended. An idle one is dropped at once (its backbone use with
        it); a busy or climbing one is handled by the request or the climb."""
        if slot in self._slots and slot.free and slot.climb is None:
            self._slots.remove(slot)
            if slot.expiry is not None:
                slot.expiry.cancel()
            assert slot.sandbox is not None
            slot.sandbox.discard()
            self.log.warning("sandbox_exited_idle", pid=slot.sandbox.proc.pid, code=code)
            self._on_change()

    # --- the pre-loader's handles ---------------------------------------------------

    def prepare(self, levels: list[Level], most: int) -> int:
        """Have sandboxes ready at these levels (the function's first, second...; a busy
        one covers the first): free ones climb, and new ones start while the function has
        fewer than `max_instances`; at most `most` climbs are started. Returns how many
        were. Not after a failed start: a function that cannot load is retried by its next
        request, not in the background."""
        if self._closed or self._start_failed:
            return 0
        busy = sum(1 for s in self._slots if not s.free)
        free = sorted((s for s in self._slots if s.free), key=lambda s: max(s.level, s.target),
                      reverse=True)
        started = 0
        for i, target in enumerate(levels[busy:]):
            if target == Level.COLD or started >= most:
                break
            if i < len(free):
                if max(free[i].level, free[i].target) < target:
                    started += self._raise_target(free[i], target)
            elif self.instances < self.spec["max_instances"]:
                slot = Slot()
                self._slots.append(slot)
                started += self._raise_target(slot, target)
        return started

    @property
    def climbing(self) -> int:
        return sum(1 for s in self._slots if s.climb is not None)

    @property
    def serving(self) -> int:
        return sum(1 for s in self._slots if s.busy)

    def trim(self, levels: list[Level], extra_keep_alive_s: float) -> int:
        """Stop idle sandboxes beyond the plan: every one when it plans none; else those
        beyond the planned ones (a burst's) once idle for `extra_keep_alive_s`. A planned one
        is never moved down in place. Never a busy or climbing one. Returns how many were
        stopped."""
        planned = sum(1 for level in levels if level > Level.COLD)
        idle = sorted((s for s in self._slots if s.free and s.climb is None),
                      key=lambda s: s.level, reverse=True)
        now = time.monotonic()
        stopped = 0
        for i, slot in enumerate(idle):
            if planned == 0 or (i >= planned and now - slot.idle_since >= extra_keep_alive_s):
                self._stop(slot)
                stopped += 1
        return stopped

    async def close(self) -> None:
        """Stop taking requests, stop idle sandboxes and those still starting. Busy ones
        are stopped by `_release` when their request is answered."""
        async with self._cond:
            self._closed = True
            climbs = [s.climb for s in self._slots if s.climb is not None]
            for slot in [s for s in self._slots if s.free and s.climb is None]:
                if slot.expiry is not None:
                    slot.expiry.cancel()
                self._stop(slot)
            self._cond.notify_all()
        for climb in climbs:
            climb.cancel()
        await asyncio.gather(*climbs, return_exceptions=True)
        await asyncio.gather(*self._stopping)
