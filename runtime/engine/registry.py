"""The node's generation engines: one per (base model, device), started on first use by a
function that runs on the engine, counted while its sandboxes hold connections to it, kept
warm for `keep_alive_s` after the last one lets go, then stopped. An engine that dies takes
its connections with it: the sandboxes that held them are killed (their in-flight requests
get a coded error) and the next request starts a fresh engine."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from faas.errors import HandlerError
from faas.logs import get_logger
from runtime.backbone.registry import Backbone, BackboneRegistry
from runtime.backbone.warm import KeptWarm
from runtime.proc import frames
from runtime.proc.children import start_node_child, wait_or_kill
from runtime.proc.isolation import Isolation
from runtime.proc.usage import sandbox_bytes

log = get_logger()


@dataclass(eq=False)
class Engine:
    """A running engine process and the backbone export it maps."""

    model: str
    backbone: Backbone
    proc: asyncio.subprocess.Process
    sock: socket.socket
    load_ms: float
    users: int = 0
    expiry: asyncio.Task[None] | None = field(default=None, repr=False)
    watch: asyncio.Task[None] | None = field(default=None, repr=False)
    # Called when the engine exits: each retires a sandbox connected to it.
    on_exit: set[Callable[[], None]] = field(default_factory=set, repr=False)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def connect(self, function: str, max_batch: int, slo_ttft_s: float) -> socket.socket:
        """A new connection bound to `function`: the engine gets one end, the caller the
        other, to hand to that function's sandbox."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

        def ask() -> dict[str, Any] | None:
            frames.send_frame_with_fds(self.sock, {"type": "connect", "function": function,
                                                   "max_batch": max_batch, "slo_ttft_s": slo_ttft_s},
                                       [theirs.fileno()])
            return frames.recv_frame(self.sock)

        try:
            async with self.lock:
                reply = await asyncio.wait_for(asyncio.to_thread(ask), 30)
        except (OSError, TimeoutError) as exc:
            ours.close()
            raise HandlerError(f"the engine of {self.model!r} did not take a connection: {exc}") from None
        finally:
            theirs.close()
        if reply is None or reply.get("type") != "connected":
            ours.close()
            raise HandlerError(f"the engine of {self.model!r} exited")
        return ours

    async def close(self) -> None:
        self.sock.close()  # the engine exits on EOF
        await wait_or_kill(self.proc)


class EngineRegistry(KeptWarm[Engine]):
    """Starts, shares and retires the engines of one node."""

    kind = "engine"

    def __init__(self, backbones: BackboneRegistry, threads: int | None = None,
                 keep_alive_s: float = 300.0, isolation: Isolation | None = None,
                 max_rows: int = 64, load_timeout_s: float = 600.0, kv_bytes: int | None = None) -> None:
        super().__init__(keep_alive_s)
        self.backbones = backbones
        # One process computes for every function: it gets the node's cores.
        self.threads = threads or len(os.sched_getaffinity(0))
        self.isolation = isolation or Isolation()
        self.max_rows = max_rows
        self.kv_bytes = kv_bytes
        self.load_timeout_s = load_timeout_s
        self._held: dict[str, tuple[int, int]] = {}
        self._measured_at = 0.0

    def state(self) -> list[dict[str, Any]]:
        return [{"model": e.model, "pid": e.proc.pid, "users": e.users, "load_ms": round(e.load_ms, 1)}
                for e in self._live.values()]

    def held_bytes(self, model: str | None = None, max_age_s: float = 1.0) -> tuple[int, int]:
        """(host, device) bytes the engines (or `model`'s) hold beyond the backbones they
        map: their runtime, adapters and KV cache, measured by this process from /proc and
        NVML (at most `max_age_s` old: the memory guard asks often)."""
        now = time.monotonic()
        if now - self._measured_at > max_age_s:
            self._held = {m: sandbox_bytes(e.proc.pid, 0) for m, e in list(self._live.items()) if e.alive}
            self._measured_at = now
        held = [b for m, b in self._held.items() if model is None or m == model]
        return sum(h for h, _ in held), sum(d for _, d in held)

    async def _retired(self, engine: Engine) -> None:
        self.backbones.release(engine.backbone)
        if engine.watch is not None and engine.watch is not asyncio.current_task():
            engine.watch.cancel()

    async def _watch(self, engine: Engine) -> None:
        code = await engine.proc.wait()
        if not self.is_live(engine):
            return  # retired on purpose
        log.error("engine_exited", model=engine.model, code=code, sandboxes=len(engine.on_exit))
        for retire in list(engine.on_exit):
            retire()
        await self.retire(engine)

    async def _start(self, model: str) -> Engine:
        started = time.monotonic()
        backbone = await self.backbones.acquire(model)
        try:
            proc, ours = await start_node_child("runtime.engine.server", self.threads)
        except BaseException:
            self.backbones.release(backbone)
            raise
        try:
            request = {"type": "load", "model": model, "device": backbone.device,
                       "threads": self.threads, "isolation": self.isolation.to_dict(),
                       "manifest": backbone.manifest, "max_rows": self.max_rows,
                       "kv_bytes": self.kv_bytes}
            await asyncio.to_thread(frames.send_frame_with_fds, ours, request, backbone.fds)
            reply = await asyncio.wait_for(asyncio.to_thread(frames.recv_frame, ours), self.load_timeout_s)
        except BaseException as exc:
            proc.kill()
            ours.close()
            self.backbones.release(backbone)
            if isinstance(exc, TimeoutError):
                raise HandlerError(f"engine of {model!r} did not load within {self.load_timeout_s:g}s") from None
            raise
        if reply is None or reply["type"] != "ready":
            ours.close()
            await proc.wait()
            self.backbones.release(backbone)
            why = reply["error"] if reply else f"exited with code {proc.returncode}"
            raise HandlerError(f"engine of {model!r} failed to load: {why}")
        log.info("engine_started", model=model, pid=proc.pid, threads=self.threads,
                 start_ms=round((time.monotonic() - started) * 1000, 1))
        engine = Engine(model=model, backbone=backbone, proc=proc, sock=ours,
                        load_ms=float(reply["load_ms"]))
        engine.watch = asyncio.create_task(self._watch(engine), name=f"engine-watch-{proc.pid}")
        return engine
