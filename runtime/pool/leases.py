"""Per-function sandbox pool: admission (bounded queue), leasing, replacement.

Sandboxes are leased to one function only and never reused for another. Each is a `Slot`
(runtime/pool/slots.py) from the moment its start is decided: it climbs the levels in a
task the pool owns, towards a target set by a request (LOADED) or by the pre-loader (any
level). A request takes the free slot that is furthest up (a LOADED idle one at once; one below
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
from dataclasses import dataclass
from typing import Any, Callable

from faas.errors import FaasError, Overloaded
from faas.record import FunctionRecord
from runtime.backbone.registry import BackboneRegistry
from runtime.batching.window import BatchWindow, Contention
from runtime.engine.registry import EngineRegistry
from runtime.memory.guard import MemoryGuard
from runtime.pool.racing import bounded, race
from runtime.pool.slots import Sandboxes, Slot
from runtime.proc.isolation import Isolation
from runtime.sandbox.handles import ChunkSink, SandboxConfig, SandboxDied, SandboxGone, SandboxResult
from runtime.sandbox.levels import Level, Profiles
from runtime.sandbox.spawn import Zygote


@dataclass
class Served:
    """What the pool hands back for one request: the handler's result and its timing."""

    result: SandboxResult
    leased_at: float  # time.monotonic() when a sandbox was leased (end of queueing)
    level: Level  # what the request found: the level of the sandbox it got, COLD if none


class FunctionPool(Sandboxes):
    """The sandboxes of one function on this node, leased to its requests."""

    def __init__(self, spec: FunctionRecord, config: SandboxConfig, zygote: Zygote,
                 backbones: BackboneRegistry, isolation: Isolation, profiles: Profiles,
                 keep_alive_s: float | None, on_change: Callable[[], None] = lambda: None,
                 contention: Contention | None = None, engines: EngineRegistry | None = None,
                 guard: MemoryGuard | None = None) -> None:
        super().__init__(spec, config, zygote, backbones, isolation, profiles, keep_alive_s, on_change,
                         engines)
        self._waiting = 0
        self.guard = guard  # the node's (None: nothing bounds what this pool holds)
        self.service_s = 1.0  # a request's time in a sandbox (moving average): retry hints
        # On the engine, its admission batches across functions under each one's SLO.
        if contention is not None and self._engines is None:
            self.window = BatchWindow(self.name, spec.slo_ttft_s, self.max_batch, contention)

    # --- admission and state ------------------------------------------------------
    def admit(self) -> None:
        """Take a request into the queue, or raise Overloaded when `max_queue` requests are
        already waiting. Synchronous, so a burst of callbacks cannot overshoot the bound;
        every admitted request must then be passed to `serve`."""
        if self._closed:
            raise Overloaded(f"function {self.name!r} is shutting down on this node")
        if self._waiting >= self.spec.max_queue:
            raise Overloaded(f"function {self.name!r} has {self._waiting} requests queued "
                             f"(max_queue={self.spec.max_queue})", retry_after_s=self.service_s)
        self._waiting += 1

    @property
    def busy(self) -> bool:
        return any(not s.free for s in self._slots)

    @property
    def held_level(self) -> Level:
        """How far the furthest idle sandbox of this function is loaded."""
        return max((s.level for s in self._slots if s.free and s.climb is None), default=Level.COLD)

    @property
    def warm_room(self) -> bool:
        """Whether a request would find a loaded sandbox with room in its batch now."""
        return any(s.level == Level.LOADED and s.climb is None and not s.retiring
                   and s.active < self.max_batch for s in self._slots)

    @property
    def load(self) -> float:
        """Requests held (in batches and queued) per place in this node's batches."""
        places = self.max_batch * self.spec.max_instances
        return (sum(s.active for s in self._slots) + self._waiting) / places

    def state(self) -> dict[str, Any]:
        return {"idle": sum(1 for s in self._slots if s.free and s.climb is None),
                "busy": sum(1 for s in self._slots if s.active),
                "active": sum(s.active for s in self._slots),
                "starting": sum(1 for s in self._slots if s.climb is not None),
                "queued": self._waiting,
                "levels": [s.level.label for s in self._slots]}
    # --- serving ------------------------------------------------------------------
    async def serve(self, request_id: str, event: dict[str, Any], deadline: float, *,
                    received: float | None = None, stream: bool = False,
                    on_chunk: ChunkSink | None = None, cancel: asyncio.Event | None = None,
                    event_info: dict[str, Any] | None = None) -> Served:
        """Lease a sandbox for an admitted request (joining the batch of one that is
        serving, when it has room; under contention, when its batch window closes), run
        the handler and give the sandbox back. Past
        `deadline` (time.monotonic()) or once `cancel` is set, the request stops: still
        queued, it leaves the queue; in a sandbox, its generations stop at the next token,
        and a handler that does not return within the stop grace retires its sandbox.
        A sandbox found dead before the request reached it (it died idle, and the node had
        not heard yet) is dropped and another one leased, once."""
        try:
            if self.window is not None and any(s.level == Level.LOADED for s in self._slots):
                hold = self.window.hold(time.monotonic() if received is None else received,
                                        self.serving > 0)
                await bounded(hold, deadline, cancel, self.name, "in the batch window")
            slot, found = await self._leased(deadline, cancel)
        finally:
            self._waiting -= 1
        run = (request_id, event, deadline, stream, on_chunk, cancel, event_info)
        try:
            return await self._run(slot, found, *run)
        except SandboxGone:
            slot, found = await self._leased(deadline, cancel)
            return await self._run(slot, found, *run)

    async def _run(self, slot: Slot, found: Level, request_id: str, event: dict[str, Any],
                   deadline: float, stream: bool, on_chunk: ChunkSink | None,
                   cancel: asyncio.Event | None, event_info: dict[str, Any] | None) -> Served:
        leased_at = time.monotonic()
        sandbox = slot.sandbox
        assert sandbox is not None
        answered = False  # once the caller has its final message, no chunk may follow it

        async def forward(chunk: dict[str, Any]) -> None:
            if on_chunk is not None and not answered:
                await on_chunk(chunk)

        call = asyncio.ensure_future(sandbox.invoke(request_id, event, stream, forward, event_info))
        settling = False
        try:
            stopped = await race(call, deadline, cancel, self.name, "in the handler")
            if stopped is not None:
                # The caller hears at once; the slot is free once the handler has stopped.
                answered = True
                await sandbox.cancel(request_id)
                settling = True
                task = asyncio.create_task(self._settle(slot, call, request_id, stopped))
                self._stopping.add(task)
                task.add_done_callback(self._stopping.discard)
                raise stopped
            self.service_s += 0.2 * (time.monotonic() - leased_at - self.service_s)
            return Served(result=call.result(), leased_at=leased_at, level=found)
        except asyncio.CancelledError:
            # It still owes this request's reply: never lease it to another request.
            call.cancel()
            await sandbox.kill()
            raise
        except SandboxDied:
            self.log.error("sandbox_died", req=request_id, pid=sandbox.proc.pid,
                           code=sandbox.proc.returncode)
            raise
        finally:
            if not settling:
                await self._release(slot)

    async def _settle(self, slot: Slot, call: asyncio.Future[Any], request_id: str,
                      stopped: FaasError) -> None:
        """Give a stopped request's handler `stop_grace_s` to return (its generations stop at
        the next token); if it does not (a handler stuck elsewhere), its sandbox takes no new
        request and is killed once the rest of its batch has been answered."""
        sandbox = slot.sandbox
        assert sandbox is not None
        try:
            await asyncio.wait_for(asyncio.shield(call), self._config.stop_grace_s)
        except TimeoutError:
            # A handler stuck outside generation: its sandbox takes no new request and is
            # killed once the rest of its batch has been answered.
            slot.retiring = True
            self.log.warning("sandbox_retired_handler_did_not_stop", req=request_id,
                             pid=sandbox.proc.pid, why=stopped.message)
            async with self._cond:
                while slot.active > 1 and not call.done():
                    await self._cond.wait()
            if not call.done():
                await sandbox.kill()
                call.cancel()
        except Exception:  # Cancelled from its generation (what stopping means), or its death
            pass
        finally:
            await self._release(slot)

    async def _leased(self, deadline: float, cancel: asyncio.Event | None) -> tuple[Slot, Level]:
        """A sandbox within the request's budget; one leased just as the request stopped is
        given back."""
        return await bounded(self._lease(), deadline, cancel, self.name, "waiting for a sandbox",
                             undo=lambda leased: self._release(leased[0]))

    async def _lease(self) -> tuple[Slot, Level]:
        """A sandbox for one request and the level it found. When the sandbox it waited for
        dies while loading (killed, or its zygote died), it tries once more: it may have
        taken over a climb the pre-loader started before that death was noticed."""
        try:
            return await self._lease_once()
        except SandboxDied:
            return await self._lease_once()

    def _pick(self) -> tuple[Slot, str] | None:
        """Where a request goes: a loaded sandbox with room in its batch (the least busy);
        else a free one still climbing (the furthest up); else the batch of a sandbox that a
        request is waiting for; None: a new sandbox, or wait."""
        room = [s for s in self._slots if s.level == Level.LOADED and s.climb is None
                and s.waiter is None and not s.retiring and s.active + s.joining < self.max_batch]
        if room:
            return min(room, key=lambda s: s.active + s.joining), "ready"
        free = [s for s in self._slots if s.free]
        if free:
            return max(free, key=lambda s: (s.level, s.climb is None)), "climb"
        climbing = [s for s in self._slots if s.waiter is not None and s.climb is not None
                    and 1 + s.joining < self.max_batch]
        if climbing:
            return min(climbing, key=lambda s: s.joining), "join"
        return None

    async def _lease_once(self) -> tuple[Slot, Level]:
        async with self._cond:
            seen_failures = self._failures
            while True:
                picked = self._pick()
                if picked is not None:
                    slot, how = picked
                    found = slot.level
                    if how == "ready":
                        self._take(slot)
                        return slot, found
                    if how == "join":
                        return await self._join(slot, found, seen_failures)
                    if self.guard is not None and not self.guard.admit(self, slot):
                        raise Overloaded(f"no memory on this node to load {self.name!r} "
                                         "(everything idle was offloaded; the rest is serving)",
                                         retry_after_s=self.guard.retry_after_s())
                    break
                if self._failures != seen_failures and self._last_failure is not None:
                    raise self._last_failure
                if self._closed:
                    raise Overloaded(f"function {self.name!r} is shutting down on this node")
                if self.instances < self.spec.max_instances:
                    if self.guard is None or self.guard.admit(self, None):
                        slot = Slot()
                        self._slots.append(slot)
                        found = Level.COLD
                        break
                    if self.instances == 0:  # nothing of ours will free up: come back later
                        raise Overloaded(f"no memory on this node for a sandbox of {self.name!r} "
                                         "(everything idle was offloaded; the rest is serving)",
                                         retry_after_s=self.guard.retry_after_s())
                await self._cond.wait()
            slot.waiter = asyncio.get_running_loop().create_future()
            self._raise_target(slot, Level.LOADED)
            waiter = slot.waiter
        try:
            await waiter
        except asyncio.CancelledError:
            async with self._cond:
                if slot.waiter is waiter:  # not handed over yet: the climb parks it idle
                    slot.waiter = None
                elif slot.active:  # handed over as we gave up: give it back
                    self._drop_request(slot)
                self._cond.notify_all()
            raise
        return slot, found

    async def _join(self, slot: Slot, found: Level, seen_failures: int) -> tuple[Slot, Level]:
        """Wait (condition held) for the climb another request waits for, and join its batch."""
        slot.joining += 1
        try:
            while slot.level < Level.LOADED or slot.climb is not None:
                if slot not in self._slots:
                    if self._failures != seen_failures and self._last_failure is not None:
                        raise self._last_failure
                    raise SandboxDied(f"the sandbox of {self.name!r} being started went away")
                await self._cond.wait()
        finally:
            slot.joining -= 1
        self._take(slot)
        return slot, found

    def _drop_request(self, slot: Slot) -> None:
        """One request of `slot` is done (condition held): park it once it serves none."""
        slot.active -= 1
        sandbox = slot.sandbox
        if slot.active or slot not in self._slots:
            return
        if sandbox is not None and sandbox.alive and not self._closed and not slot.retiring:
            self._park(slot)
        else:
            self._slots.remove(slot)

    async def _release(self, slot: Slot) -> None:
        async with self._cond:
            self._drop_request(slot)
            stop = slot not in self._slots and slot.active == 0
            self._cond.notify_all()
        if stop and slot.sandbox is not None:
            await slot.sandbox.stop(self._config.stop_grace_s)
        self._on_change()
    # --- the pre-loader's handles -------------------------------------------------
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
            have = max(free[i].level, free[i].target) if i < len(free) else Level.COLD
            if have >= target:
                continue
            if self.guard is not None and not self.guard.fits(self, have, target):
                break
            if i < len(free):
                started += self._raise_target(free[i], target)
            elif self.instances < self.spec.max_instances:
                slot = Slot()
                self._slots.append(slot)
                started += self._raise_target(slot, target)
        return started

    @property
    def serving(self) -> int:
        """How many of its sandboxes are serving requests."""
        return sum(1 for s in self._slots if s.active)

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

    async def stopped(self) -> None:
        """After `close`: once the last sandbox has stopped (busy ones end with their batch)."""
        async with self._cond:
            while self._slots:
                await self._cond.wait()
        await asyncio.gather(*self._stopping)
