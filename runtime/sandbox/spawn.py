"""Spawning sandboxes: the node's handle on the zygote process (which has imported what
sandboxes need, and forks them on request) and `fork_sandbox`, which forks one for a
function and tells it what it serves."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from typing import Any, Callable

from faas.errors import HandlerError
from faas.logs import get_logger
from faas.record import FunctionRecord
from runtime.proc import frames
from runtime.proc.children import start_node_child
from runtime.proc.isolation import Isolation
from runtime.sandbox.handles import Sandbox, SandboxConfig, StepCost, max_batch


class ForkedProcess:
    """A sandbox process forked by the zygote: not our child, so its exit is reported by
    the zygote (`exited` frames) and it is signalled by pid (the zygote reaps it only after
    reporting, so the pid is not reused before `exited` arrives)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._exited = asyncio.Event()
        self._callbacks: list[Callable[[int], None]] = []

    def add_exit_callback(self, callback: Callable[[int], None]) -> None:
        self._callbacks.append(callback)

    def exited(self, code: int) -> None:
        if self.returncode is not None:
            return
        self.returncode = code
        self._exited.set()
        for callback in self._callbacks:
            callback(code)

    async def wait(self) -> int:
        await self._exited.wait()
        return self.returncode  # type: ignore[return-value]

    def kill(self) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Zygote:
    """The node's handle on the zygote process: forks sandboxes with torch, transformers
    and peft already imported (runtime/sandbox/zygote.py). Restarted as soon as it dies."""

    def __init__(self, threads: int, fork_timeout_s: float = 60.0, light: bool = False) -> None:
        self.threads = threads
        self.light = light  # imports no torch: for sandboxes whose model runs in the engine
        self.fork_timeout_s = fork_timeout_s
        self._proc: asyncio.subprocess.Process | None = None
        self._send: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._pending: dict[int, asyncio.Future[ForkedProcess]] = {}
        self._next_id = 0
        self._children: dict[int, ForkedProcess] = {}
        self._fork_lock = asyncio.Lock()
        self._closing = False
        self.log = get_logger(component="zygote")

    def start(self) -> None:
        """Begin starting the zygote (its imports take seconds); `fork` waits for it."""
        if self._ready is None and not self._closing:
            self._ready = asyncio.get_running_loop().create_future()
            self._task = asyncio.create_task(self._run(self._ready), name="zygote")

    async def _run(self, ready: asyncio.Future[None]) -> None:
        started = time.monotonic()
        writer: asyncio.StreamWriter | None = None
        try:
            self._proc, ours = await start_node_child("runtime.sandbox.zygote", self.threads,
                                                      args=("--light",) if self.light else ())
            # A twin of our end for sendmsg with descriptors (asyncio's transport cannot
            # attach them); it shares asyncio's O_NONBLOCK, fine for the small fork frames.
            self._send = socket.socket(fileno=os.dup(ours.fileno()))
            reader, writer = await asyncio.open_unix_connection(sock=ours)
            hello = await frames.read_frame(reader)
            self.log.info("zygote_ready", pid=hello["pid"],
                          start_ms=round((time.monotonic() - started) * 1000, 1))
            ready.set_result(None)
            while True:
                self._dispatch(await frames.read_frame(reader))
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            if not self._closing:
                self.log.warning("zygote_exited", error=f"{type(exc).__name__}: {exc}")
        finally:
            self._ready = None
            failure = HandlerError("the zygote exited")
            for future in [ready, *self._pending.values()]:
                if not future.done():
                    future.set_exception(failure)
                    future.exception()  # retrieved: whoever waits sees it, nobody else warns
            self._pending.clear()
            children, self._children = list(self._children.values()), {}
            for child in children:  # they die with it (PDEATHSIG)
                child.exited(-signal.SIGKILL)
            if self._send is not None:
                self._send.close()
                self._send = None
            if writer is not None:
                writer.close()
            if self._proc is not None and self._proc.returncode is None:
                self._proc.kill()
            if not self._closing:
                asyncio.get_running_loop().call_later(1.0, self.start)

    def _dispatch(self, frame: dict[str, Any]) -> None:
        if frame["type"] == "forked":
            child = ForkedProcess(frame["pid"])
            self._children[child.pid] = child
            waiter = self._pending.pop(frame["id"], None)
            if waiter is None or waiter.done():
                child.kill()  # its requester gave up: nobody will ever talk to it
            else:
                waiter.set_result(child)
        elif frame["type"] == "exited":
            child = self._children.pop(frame["pid"], None)
            if child is not None:
                child.exited(frame["code"])

    async def ready(self) -> None:
        """Wait until the zygote can fork (it is started if needed)."""
        self.start()
        if self._ready is None:
            raise HandlerError("the node is shutting down")
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), self.fork_timeout_s)
        except TimeoutError:
            raise HandlerError(f"the zygote did not start within {self.fork_timeout_s:g}s") from None

    async def fork(self, fds: list[int], isolation: Isolation) -> ForkedProcess:
        """A new sandbox process serving the first of `fds` (its socket; the second is its
        output pipe), isolated as `isolation` says before it reads anything."""
        await self.ready()
        try:
            # One fork in flight: the zygote reads exactly one frame (and its descriptors).
            async with self._fork_lock:
                if self._send is None:
                    raise HandlerError("the zygote is not running")
                self._next_id += 1
                request_id = self._next_id
                waiter = asyncio.get_running_loop().create_future()
                self._pending[request_id] = waiter
                try:
                    request = {"type": "fork", "id": request_id, "isolation": isolation.to_dict()}
                    socket.send_fds(self._send, [frames.pack(request)], fds)
                    return await asyncio.wait_for(waiter, self.fork_timeout_s)
                finally:
                    self._pending.pop(request_id, None)
        except TimeoutError:
            raise HandlerError(f"the zygote did not fork within {self.fork_timeout_s:g}s") from None

    async def close(self) -> None:
        self._closing = True
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


async def fork_sandbox(spec: FunctionRecord, config: SandboxConfig, zygote: Zygote,
                       isolation: Isolation, engine: bool = False) -> tuple[Sandbox, StepCost]:
    """Fork a sandbox for the function described by `spec` and tell it which function it
    serves (and, with `engine`, that it will generate through a connection to the node's
    engine): a SPAWNED sandbox, nothing loaded yet. Its cost is timed from the fork (not
    from waiting for a zygote that is still starting)."""
    await zygote.ready()
    # First: a secret not set fails the start before any process exists.
    env = await config.environment(spec) if config.environment is not None else dict(spec.env)
    started = time.monotonic()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    output_r, output_w = os.pipe()
    try:
        proc = await zygote.fork([theirs.fileno(), output_w], isolation)
    except BaseException:
        os.close(output_r)
        ours.close()
        raise
    finally:
        theirs.close()
        os.close(output_w)
    try:
        reader, writer = await asyncio.open_unix_connection(sock=ours)
    except BaseException:  # cancelled, say: nobody would ever talk to the new process
        proc.kill()
        os.close(output_r)
        ours.close()
        raise
    sandbox = Sandbox(spec.name, proc, ours, reader, writer, config)
    init = {"type": "init", "name": spec.name, "source_file": spec.source_file,
            "threads": config.threads, "backbone_path": spec.backbone, "adapter": spec.adapter,
            "max_batch": max_batch(spec, config), "slo_ttft_s": spec.slo_ttft_s,
            "max_frame_bytes": config.max_frame_bytes,
            "engine": engine, "env": env}
    try:
        await sandbox.forward_output(output_r)
        cost = await sandbox.step(init)
    except BaseException:
        await sandbox.kill()
        raise
    return sandbox, StepCost(cost.level, time.monotonic() - started, cost.host_bytes,
                             cost.device_bytes)
