"""A function's sandboxes as slots: each from the moment its start is decided, climbing
the levels of runtime/sandbox/levels.py one step at a time in a task of its own towards a
target (set by a request, LOADED, or by the pre-loader, any level), parked idle when done,
stopped when it expires or is offloaded, dropped when its process ends.

`Sandboxes` is this state machine; the pool (runtime/pool/leases.py) leases its slots to
requests and is the pre-loader's and the memory guard's handle on them.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from faas.errors import FaasError, HandlerError, Overloaded
from faas.logs import get_logger
from faas.record import FunctionRecord
from runtime.backbone.registry import Backbone, BackboneRegistry
from runtime.batching.window import BatchWindow, PrefillProfile
from runtime.engine.registry import Engine, EngineRegistry
from runtime.sandbox.levels import Level, Profiles, engine_key
from runtime.proc.isolation import Isolation
from runtime.sandbox.handles import Sandbox, SandboxConfig, StepCost, max_batch
from runtime.sandbox.spawn import Zygote, fork_sandbox


@dataclass(eq=False)
class Slot:
    """One sandbox of the function, from the moment its start is decided."""

    sandbox: Sandbox | None = None
    level: Level = Level.COLD  # reached
    target: Level = Level.COLD  # climbing towards
    climb: asyncio.Task[None] | None = None
    waiter: asyncio.Future[None] | None = None  # a request's, resolved when it may use the slot
    active: int = 0  # requests it is serving (a batch)
    retiring: bool = False  # a handler would not stop, or its engine died: no new requests, stopped once drained
    joining: int = 0  # requests waiting for its climb to join its first one
    idle_since: float = field(default_factory=time.monotonic)
    expiry: asyncio.TimerHandle | None = None
    load_s: float = 0.0  # spent in its own steps (what start_timeout_s bounds)
    host_bytes: int = 0  # what it reported holding after its last step
    device_bytes: int = 0

    @property
    def free(self) -> bool:
        """Neither serving nor promised to a request."""
        return self.active == 0 and self.waiter is None and self.joining == 0


class Sandboxes:
    """The slots of one function on this node, and how each climbs, parks and stops."""

    def __init__(self, spec: FunctionRecord, config: SandboxConfig, zygote: Zygote,
                 backbones: BackboneRegistry, isolation: Isolation, profiles: Profiles,
                 keep_alive_s: float | None, on_change: Callable[[], None],
                 engines: EngineRegistry | None) -> None:
        self.spec = spec
        self.name: str = spec.name
        self._config = config
        self._zygote = zygote
        self.isolation = isolation
        self._backbones = backbones
        # Where its generations run: the node's engine for its backbone, or its own sandbox.
        self._engines = engines if spec.on_engine else None
        self._profiles = profiles
        self._keep_alive_s = keep_alive_s
        self._on_change = on_change
        self._slots: list[Slot] = []
        self._failures = 0
        self._last_failure: FaasError | None = None
        self._start_failed = False  # the last start failed: pre-load again only after one succeeds
        self._cond = asyncio.Condition()
        self._stopping: set[asyncio.Task[None]] = set()  # stopped sandboxes; close() waits for them
        self._closed = False
        # The batch window whose prefill profile its sandboxes' prefills teach (None: none).
        self.window: BatchWindow | None = None
        self.log = get_logger(fn=self.name)

    # --- state --------------------------------------------------------------------
    @property
    def instances(self) -> int:
        return len(self._slots)

    @property
    def max_batch(self) -> int:
        return max_batch(self.spec, self._config)

    @property
    def on_engine(self) -> bool:
        """Whether its generations run in the node's engine (not in its sandboxes)."""
        return self._engines is not None

    @property
    def profile_key(self) -> str | None:
        """Whose level costs its sandboxes share (runtime/sandbox/levels.py): its backbone's, or its
        engine's (None: a plain function)."""
        backbone = self.spec.backbone
        return engine_key(backbone) if self._engines is not None else backbone

    @property
    def climbing(self) -> int:
        return sum(1 for s in self._slots if s.climb is not None)

    def _take(self, slot: Slot) -> None:
        slot.active += 1
        if slot.expiry is not None:
            slot.expiry.cancel()
            slot.expiry = None
    # --- climbing the levels ------------------------------------------------------
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
                                   f"start_timeout_s={self.spec.start_timeout_s:g}")
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
                slot, fork_sandbox(self.spec, self._config, self._zygote, self.isolation,
                                   engine=self._engines is not None))
            slot.sandbox = sandbox
            sandbox.proc.add_exit_callback(lambda code: self._exited(slot, code))
            if self.window is not None:
                sandbox.on_prefill = self._prefill_observer(sandbox, self.window.profile)
            self._reached(slot, cost)
        sandbox = slot.sandbox
        if slot.target < slot.level:  # offloaded: the adapter leaves the device
            cost = await sandbox.step({"type": "step", "level": int(slot.target)})
            slot.level, slot.host_bytes, slot.device_bytes = cost.level, cost.host_bytes, cost.device_bytes
        while slot.level < slot.target:
            level = Level(slot.level + 1)
            frame = {"type": "step", "level": int(level),
                     "warm_up": slot.waiter is None}  # nobody waiting: pay first-call costs now
            connection = None
            if level == Level.ATTACHED and self._engines is not None:
                engine = await self._engines.acquire(self.spec.backbone)
                sandbox.hold(self._engine_release(engine, slot))
                connection = await engine.connect(self.name, self.max_batch, self.spec.slo_ttft_s)
                step = sandbox.step(frame, fds=[connection.fileno()])
            elif level == Level.ATTACHED and self.spec.backbone is not None:
                backbone = await self._backbones.acquire(self.spec.backbone)
                sandbox.hold(self._backbone_release(backbone, sandbox))
                step = sandbox.step(frame, backbone)
            else:
                step = sandbox.step(frame)
            try:
                self._reached(slot, await self._within_start_timeout(slot, step))
            finally:
                if connection is not None:  # the sandbox has its own copy (or is gone)
                    connection.close()
        sandbox.log.info("sandbox_climbed", level=slot.level.label,
                         ms=round((time.monotonic() - started) * 1000, 1))

    @staticmethod
    def _prefill_observer(sandbox: Sandbox, profile: PrefillProfile) -> Callable[[dict[str, Any]], None]:
        def observe(frame: dict[str, Any]) -> None:
            # A sandbox's first prefill may pay first-call costs (kernels, allocator) when
            # a request took it before its warm-up: not what the next ones will take.
            if sandbox.prefills > 1:
                profile.observe(int(frame["rows"]), frame["ms"] / 1000)

        return observe

    async def _within_start_timeout(self, slot: Slot, step: Any) -> Any:
        started = time.monotonic()
        try:
            return await asyncio.wait_for(step, max(0.0, self.spec.start_timeout_s - slot.load_s))
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

    def _engine_release(self, engine: Engine, slot: Slot) -> Callable[[], None]:
        """What lets go of `engine` once, however the sandbox ends. If the engine dies first,
        the sandbox's connection is dead: it takes no new request and stops once the ones it
        holds are answered (their generations fail at once, 503: worth a retry)."""
        sandbox = slot.sandbox
        assert sandbox is not None

        def retire() -> None:
            slot.retiring = True
            if slot.active == 0:
                sandbox.proc.kill()

        engine.on_exit.add(retire)
        engines = self._engines
        assert engines is not None

        def release() -> None:
            engine.on_exit.discard(retire)
            engines.release(engine)

        return release

    def _reached(self, slot: Slot, cost: StepCost) -> None:
        slot.level = cost.level
        slot.host_bytes, slot.device_bytes = cost.host_bytes, cost.device_bytes
        self._profiles.observe(self.profile_key, cost.level, cost.seconds, cost.host_bytes,
                               cost.device_bytes)
    # --- idle sandboxes -----------------------------------------------------------
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
    # --- memory: what it holds, offloading ----------------------------------------
    def slot_bytes(self, slot: Slot) -> tuple[int, int]:
        """(host, device) bytes a sandbox holds: as it reported, or, while it climbs, what
        its target costs."""
        if slot.climb is not None and slot.target > slot.level:
            host, device = self._profiles.of(self.profile_key).held(slot.target)
            return max(host, slot.host_bytes), max(device, slot.device_bytes)
        return slot.host_bytes, slot.device_bytes

    def held_bytes(self) -> tuple[int, int]:
        host = device = 0
        for slot in self._slots:
            h, d = self.slot_bytes(slot)
            host, device = host + h, device + d
        return host, device

    def idle_slots(self) -> list[Slot]:
        """Sandboxes that may be offloaded: neither serving, promised nor climbing."""
        return [s for s in self._slots if s.free and s.climb is None and s.sandbox is not None]

    def offload(self, slot: Slot, to: Level) -> None:
        """Move an idle sandbox down: to STAGED (its adapter off the device) or COLD (stopped)."""
        if slot.expiry is not None:
            slot.expiry.cancel()
            slot.expiry = None
        if to == Level.COLD:
            self._stop(slot)
        else:
            slot.target = to
            slot.climb = asyncio.create_task(self._climb(slot), name=f"offload-{self.name}")
        self._on_change()
