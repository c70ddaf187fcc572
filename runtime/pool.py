"""Per-function sandbox pool: admission (bounded queue), leasing, cold starts, replacement.

Sandboxes are leased to one function only and never reused for another. A request waits
for an idle sandbox of its function; when none is idle and fewer than `max_instances`
exist, the pool starts one (the cold start) in a task it owns, so a caller that gives up
does not waste a half-finished start. A sandbox that dies, or that is killed because a
request ran past its budget, is dropped and the next request starts a fresh one. An idle
sandbox is stopped after the keep-alive.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Callable

from faas.errors import DeadlineExceeded, FaasError, HandlerError, Overloaded
from faas.logs import get_logger
from runtime.backbones import BackboneRegistry
from runtime.isolation import Isolation
from runtime.sandboxes import (
    Sandbox,
    SandboxConfig,
    SandboxDied,
    SandboxResult,
    Zygote,
    spawn_sandbox,
)


@dataclass
class Served:
    """What the pool hands back for one request: the handler's result and its timing."""

    result: SandboxResult
    leased_at: float  # time.monotonic() when a sandbox was leased (end of queueing)
    level: str  # "loaded" (a warm sandbox was idle) or "cold" (the request waited for a start)


class FunctionPool:
    """The sandboxes of one function on this node."""

    def __init__(self, spec: dict[str, Any], config: SandboxConfig, zygote: Zygote,
                 backbones: BackboneRegistry, isolation: Isolation) -> None:
        self.spec = spec
        self.name: str = spec["name"]
        self._config = config
        self._zygote = zygote
        self.isolation = isolation
        self._backbones = backbones
        self._idle: list[Sandbox] = []
        self._expiry: dict[Sandbox, asyncio.TimerHandle] = {}
        self._busy: set[Sandbox] = set()
        self._starting = 0
        self._waiting = 0
        self._failures = 0
        self._last_failure: FaasError | None = None
        self._cond = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping: set[asyncio.Task[None]] = set()  # expired sandboxes; close() waits for them
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
        return len(self._idle) + len(self._busy) + self._starting

    def state(self) -> dict[str, Any]:
        return {"idle": len(self._idle), "busy": len(self._busy), "starting": self._starting,
                "queued": self._waiting}

    # --- serving --------------------------------------------------------------------

    async def serve(self, request_id: str, event: dict[str, Any], deadline: float) -> Served:
        """Lease a sandbox for an admitted request, run the handler and give the sandbox
        back; a sandbox that outlives `deadline` (time.monotonic()) is killed."""
        try:
            sandbox, level = await self._with_deadline(self._lease(), deadline, "waiting for a sandbox")
        finally:
            self._waiting -= 1
        leased_at = time.monotonic()
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
            await self._release(sandbox)
        return Served(result=result, leased_at=leased_at, level=level)

    async def _with_deadline(self, aw: Any, deadline: float, where: str) -> Any:
        try:
            return await asyncio.wait_for(aw, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise DeadlineExceeded(f"function {self.name!r} ran out of budget {where}") from None

    async def _lease(self) -> tuple[Sandbox, str]:
        level = "loaded"
        async with self._cond:
            seen_failures = self._failures
            while True:
                while self._idle:
                    sandbox = self._idle.pop()
                    self._expiry.pop(sandbox).cancel()
                    if sandbox.alive:
                        self._busy.add(sandbox)
                        return sandbox, level
                    sandbox.discard()
                if self._failures != seen_failures and self._last_failure is not None:
                    raise self._last_failure
                if self._closed:
                    raise Overloaded(f"function {self.name!r} is shutting down on this node")
                if self.instances < self.spec["max_instances"]:
                    self._start_one()
                    level = "cold"
                await self._cond.wait()

    def _start_one(self) -> None:
        self._starting += 1
        task = asyncio.create_task(self._start(), name=f"start-sandbox-{self.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start(self) -> None:
        sandbox: Sandbox | None = None
        failure: FaasError | None = None
        try:
            sandbox = await self._spawn()
        except FaasError as exc:
            failure = exc
        except Exception as exc:  # spawning itself failed (fork, exec, socket)
            failure = HandlerError(f"could not start a sandbox for {self.name!r}: {exc}")
        if failure is not None:
            self.log.error("sandbox_start_failed", error=failure.message)
        else:
            sandbox.proc.add_exit_callback(lambda code: self._exited(sandbox, code))
        async with self._cond:
            self._starting -= 1
            if failure is not None:
                self._failures += 1
                self._last_failure = failure
            elif not self._closed:
                self._park(sandbox)
            self._cond.notify_all()
        if sandbox is not None and self._closed:  # started after close(): nobody will lease it
            await sandbox.stop(self._config.stop_grace_s)

    async def _spawn(self) -> Sandbox:
        """A new sandbox; a LoRA function's holds the shared backbone until it is let go."""
        if self.spec["backbone"] is None:
            return await spawn_sandbox(self.spec, self._config, self._zygote, self.isolation)
        backbone = await self._backbones.acquire(self.spec["backbone"])
        kill: Callable[[], None] | None = None
        released = False

        def release() -> None:  # once, whichever of spawn failure or sandbox end comes first
            nonlocal released
            if not released:
                released = True
                backbone.on_corrupt.discard(kill)  # type: ignore[arg-type]
                self._backbones.release(backbone)

        try:
            sandbox = await spawn_sandbox(self.spec, self._config, self._zygote, self.isolation,
                                          backbone, on_close=release)
        except BaseException:
            release()
            raise
        kill = sandbox.proc.kill
        backbone.on_corrupt.add(kill)
        return sandbox

    def _park(self, sandbox: Sandbox) -> None:
        """Make a sandbox leasable, and stop it if nobody leases it within the keep-alive."""
        self._idle.append(sandbox)
        self._expiry[sandbox] = asyncio.get_running_loop().call_later(
            self._config.keep_alive_s, self._expire, sandbox)

    def _expire(self, sandbox: Sandbox) -> None:
        self._idle.remove(sandbox)
        del self._expiry[sandbox]
        self.log.info("sandbox_expired", pid=sandbox.proc.pid, keep_alive_s=self._config.keep_alive_s)
        task = asyncio.create_task(sandbox.stop(self._config.stop_grace_s))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def _exited(self, sandbox: Sandbox, code: int) -> None:
        """A sandbox process ended. An idle one is dropped at once (its backbone use with
        it); a busy one is handled by the request it was serving."""
        if sandbox in self._idle:
            self._idle.remove(sandbox)
            self._expiry.pop(sandbox).cancel()
            sandbox.discard()
            self.log.warning("sandbox_exited_idle", pid=sandbox.proc.pid, code=code)

    async def _release(self, sandbox: Sandbox) -> None:
        async with self._cond:
            self._busy.discard(sandbox)
            keep = sandbox.alive and not self._closed
            if keep:
                self._park(sandbox)
            self._cond.notify_all()
        if not keep:
            await sandbox.stop(self._config.stop_grace_s)

    async def close(self) -> None:
        """Stop taking requests, stop idle sandboxes and those still starting. Busy ones
        are stopped by `_release` when their request is answered."""
        async with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            for handle in self._expiry.values():
                handle.cancel()
            self._expiry.clear()
            self._cond.notify_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(s.stop(self._config.stop_grace_s) for s in idle), *self._stopping)
