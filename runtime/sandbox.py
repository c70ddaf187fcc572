"""The sandbox process: serves one function, one request at a time, for the node agent.

Forked by the zygote (runtime/zygote.py) with one end of a socketpair and the backbone's
descriptors. It receives an `init` frame (which function), imports the function's file,
loads backbone + adapter when the function declares them, runs `setup`, answers `ready`
(or `init_error`), then answers each `invoke` frame with a `result` or an `error` frame.
It exits when the socket closes, and the kernel kills it if the node dies.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
from typing import Any, Callable

from faas.errors import SpecError
from faas.logs import get_logger
from faas.sdk import Context, FunctionSpec
from runtime import frames
from runtime.loader import find_spec


def _error(exc: BaseException) -> dict[str, str]:
    return {"type": type(exc).__name__, "message": str(exc)}


class _Served:
    """The loaded function: spec, optional engine, and the sandbox-lifetime state."""

    def __init__(self, init: dict[str, Any]) -> None:
        self.engine = None
        self.state: dict[str, Any] = {}
        self.loop = asyncio.new_event_loop()
        # The zygote already isolated this process (runtime/isolation.py): everything below,
        # the runtime's loading included, happens with the function's rights only.
        if init["backbone_path"] is not None:
            import torch

            from runtime.engine import LoraEngine

            torch.set_num_threads(int(init.get("threads", 1)))
            self.engine = LoraEngine(init["backbone_path"], init["adapter"], init.get("backbone"))
        self.spec: FunctionSpec = find_spec(init["source_file"], init["name"])
        if (self.spec.backbone, self.spec.adapter) != (init["backbone_path"], init["adapter"]):
            raise SpecError(f"{init['source_file']} changed since the node loaded it "
                            "(backbone or adapter differ): restart the node")
        if self.engine is not None:
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


def serve(sock: socket.socket, backbone_fds: list[int]) -> int:
    """Serve one function on `sock` (the zygote calls this in a forked child);
    `backbone_fds` are this process's descriptors of the shared backbone, if any."""
    init = frames.recv_frame(sock)
    if init is None:
        return 0
    if init.get("backbone") is not None:
        init["backbone"]["fds"] = backbone_fds
    log = get_logger(fn=init["name"])
    started = time.monotonic()
    try:
        served = _Served(init)
    except Exception as exc:
        log.error("sandbox_init_failed", error=f"{type(exc).__name__}: {exc}", exc_info=True)
        sock.sendall(frames.pack({"type": "init_error", "error": _error(exc)}))
        return 1
    load_ms = (time.monotonic() - started) * 1000
    sock.sendall(frames.pack({"type": "ready", "load_ms": load_ms}))
    log.info("sandbox_ready", load_ms=round(load_ms, 1))
    while (frame := frames.recv_frame(sock)) is not None:
        if frame.get("type") == "invoke":
            sock.sendall(served.invoke(frame))
    return 0
