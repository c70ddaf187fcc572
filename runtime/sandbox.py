"""The sandbox process: serves one function, one request at a time, for the node agent.

Forked by the zygote (runtime/zygote.py) with one end of a socketpair. It receives an
`init` frame (which function) and answers `level` (SPAWNED). Then the node moves it up
the levels of runtime/levels.py with one `step` frame each (the ATTACHED step carries the
backbone's descriptors), each answered with `level` (its time and the memory the process
holds after it) or `init_error`. Once LOADED it answers each `invoke` frame with a
`result` or an `error` frame. It exits when the socket closes, and the kernel kills it if
the node dies.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import time
from typing import Any, Callable

from faas.errors import SpecError
from faas.logs import get_logger
from faas.sdk import Context, FunctionSpec
from runtime import frames
from runtime.levels import Level
from runtime.loader import find_spec
from runtime.memory import device_bytes, give_back_heap, private_dirty_bytes


def _error(exc: BaseException) -> dict[str, str]:
    return {"type": type(exc).__name__, "message": str(exc)}


class _Function:
    """The function this sandbox serves, loaded one level at a time."""

    def __init__(self, init: dict[str, Any]) -> None:
        self.init = init
        self.level = Level.SPAWNED
        self.engine: Any = None
        self.spec: FunctionSpec | None = None
        self.state: dict[str, Any] = {}
        self.loop = asyncio.new_event_loop()

    def step(self, level: Level, frame: dict[str, Any], fds: list[int]) -> None:
        """Do what reaching `level` takes. The zygote already isolated this process
        (runtime/isolation.py): all of it runs with the function's rights only."""
        if level != self.level + 1:
            raise RuntimeError(f"cannot step from {self.level.label} to {level.label}")
        init = self.init
        if level == Level.ATTACHED and init["backbone_path"] is not None:
            import torch

            from runtime.engine import LoraEngine

            torch.set_num_threads(int(init.get("threads", 1)))
            self.engine = LoraEngine(init["backbone_path"], init["adapter"])
            shared = frame.get("backbone")
            if shared is not None:
                shared["fds"] = fds
            self.engine.attach(shared)
        elif level == Level.STAGED and self.engine is not None:
            self.engine.stage()
        elif level == Level.LOADED:
            self._load(warm_up=bool(frame.get("warm_up")))
        self.level = level

    def _load(self, warm_up: bool) -> None:
        init = self.init
        if self.engine is not None:
            self.engine.load()
        self.spec = find_spec(init["source_file"], init["name"])
        if (self.spec.backbone, self.spec.adapter) != (init["backbone_path"], init["adapter"]):
            raise SpecError(f"{init['source_file']} changed since the node loaded it "
                            "(backbone or adapter differ): restart the node")
        if self.engine is not None and warm_up:
            self.engine.warm_up()
        if self.spec.setup is not None:
            self._call(self.spec.setup, Context(self.spec.name, None, self.state, self._generator))

    @property
    def _generator(self) -> Callable[..., Any] | None:
        return self.engine.generate if self.engine is not None else None

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        result = fn(*args)
        if inspect.isawaitable(result):
            result = self.loop.run_until_complete(result)
        return result

    def invoke(self, frame: dict[str, Any]) -> bytes:
        if self.spec is None:
            return frames.pack({"type": "error", "error": {
                "type": "RuntimeError", "message": "the sandbox is not loaded"}})
        if self.engine is not None:
            self.engine.meter.reset()
        ctx = Context(self.spec.name, frame["request_id"], self.state, self._generator)
        try:
            output = self._call(self.spec.handler, frame["event"], ctx)
        except Exception as exc:
            ctx.log.warning("handler_failed", error=f"{type(exc).__name__}: {exc}", exc_info=True)
            return frames.pack({"type": "error", "error": _error(exc)})
        usage = {}
        if self.engine is not None:
            meter = self.engine.meter
            usage = {"tokens_in": meter.tokens_in, "tokens_out": meter.tokens_out,
                     "first_token_at": meter.first_token_at}
        try:
            return frames.pack({"type": "result", "output": output, "usage": usage})
        except Exception as exc:  # e.g. a set, an object, an int beyond 64 bits
            return frames.pack({"type": "error", "error": {
                "type": type(exc).__name__,
                "message": f"handler returned a value that cannot be encoded: {exc}"}})


def _level_frame(level: Level, seconds: float) -> bytes:
    return frames.pack({"type": "level", "level": int(level), "ms": seconds * 1000,
                        "host_bytes": private_dirty_bytes(), "device_bytes": device_bytes()})


def serve(sock: socket.socket) -> int:
    """Serve one function on `sock` (the zygote calls this in a forked child)."""
    init = frames.recv_frame(sock)
    if init is None:
        return 0
    log = get_logger(fn=init["name"])
    function = _Function(init)
    sock.sendall(_level_frame(Level.SPAWNED, 0.0))
    while True:
        frame, fds = frames.recv_frame_with_fds(sock)
        if frame is None:
            return 0
        if frame.get("type") == "invoke":
            sock.sendall(function.invoke(frame))
            give_back_heap()
            continue
        level = Level(frame["level"])
        started = time.monotonic()
        try:
            function.step(level, frame, fds)
        except Exception as exc:
            log.error("sandbox_init_failed", level=level.label, error=f"{type(exc).__name__}: {exc}",
                      exc_info=True)
            sock.sendall(frames.pack({"type": "init_error", "error": _error(exc)}))
            return 1
        finally:
            for fd in fds:  # a mapping outlives its descriptor
                os.close(fd)
        # Return what loading and the warm-up freed: before the reply when nobody waits for
        # it (the profile then sees what an idle sandbox holds), after it when a request does.
        waited = not frame.get("warm_up")
        if not waited:
            give_back_heap()
        sock.sendall(_level_frame(level, time.monotonic() - started))
        if waited:
            give_back_heap()
