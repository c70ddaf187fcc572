"""The sandbox process: serves one function for the node agent, several requests at once.

Forked by the zygote (runtime/sandbox/zygote.py) with one end of a socketpair. It receives an
`init` frame (which function) and answers `level` (SPAWNED). Then the node moves it up
the levels of runtime/sandbox/levels.py with one `step` frame each (the ATTACHED step carries the
backbone's descriptors), each answered with `level` (its time and the memory the process
holds after it) or `init_error`; a `step` to STAGED sent to a LOADED sandbox moves it back
down (its adapter leaves the device, or the engine's model: offloading). Once LOADED it acknowledges each `invoke` frame
(`started`) and runs its handler on a worker thread of its own (up to the function's `max_batch` at once: their generations
share one batch, runtime/batching/batcher.py), and answers with `chunk` frames (streamed text,
when the request asked for a stream) and then one `result` or `error` frame, each tagged
with the request id; a `cancel` frame stops a request's generations. It exits when the
socket closes, and the kernel kills it if the node dies.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from faas import openai_api
from faas.protocol import MAX_ERROR_MESSAGE
from faas.errors import BadRequest, Overloaded
from faas.logs import get_logger
from faas.record import DEFAULT_SLO_TTFT_S
from faas.sdk import Context, EventInfo, FunctionSpec, Generation, use_node_models
from runtime.batching.window import turn_prefill_budget_s
from runtime.functions.loader import find_spec
from runtime.proc import frames
from runtime.proc.usage import device_bytes, give_back_heap
from runtime.sandbox.levels import Level


# The exit code of a sandbox whose engine connection closed (the engine exited or cut it off).
ENGINE_LOST_EXIT = 75


def _error(exc: BaseException) -> dict[str, Any]:
    """A handler's exception for the node, its message cut to what a reply keeps (the node
    reads no frame larger than a reply); `faas.BadRequest` marks the caller's mistake (the
    reply is then a 400, not a 500), and the engine's `Overloaded` (it stopped, or the
    function asked for more at once than its share) a 503 worth retrying."""
    message = exc.message if isinstance(exc, (BadRequest, Overloaded)) else str(exc)
    if len(message) > MAX_ERROR_MESSAGE:
        message = message[:MAX_ERROR_MESSAGE] + f"... ({len(message)} characters)"
    error: dict[str, Any] = {"type": type(exc).__name__, "message": message}
    if isinstance(exc, BadRequest):
        error["bad_request"] = True
    elif isinstance(exc, Overloaded):
        error["overloaded"] = True
        retry = exc.retry_after_s
        if isinstance(retry, (int, float)) and not isinstance(retry, bool) and 0 <= retry < 3600:
            error["retry_after_s"] = retry
    return error


class _Wire:
    """The socket to the node, written by several threads (handlers, the batcher)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()

    def send(self, frame: dict[str, Any]) -> None:
        data = frames.pack(frame)
        with self._lock:
            self.sock.sendall(data)


class _Call:
    """One request in this sandbox: its usage meter and where its stream goes."""

    def __init__(self, frame: dict[str, Any], wire: _Wire) -> None:
        from runtime.sandbox.meter import UsageMeter

        self.request_id: str = frame["request_id"]
        self.stream = bool(frame.get("stream"))
        meta = frame.get("event_info")
        self.event_info = EventInfo(**meta) if meta else None
        self.meter = UsageMeter()
        self._wire = wire

    def first(self) -> None:
        """Its first prefill is done: the node lowers the sandbox's CPU priority while it
        only decodes."""
        self._wire.send({"type": "first", "request_id": self.request_id})

    def delta(self, text: str, token_ids: list[int]) -> None:
        self._wire.send({"type": "chunk", "request_id": self.request_id, "delta": text,
                         "token_ids": token_ids})


class _Function:
    """The function this sandbox serves, loaded one level at a time."""

    def __init__(self, init: dict[str, Any], wire: _Wire) -> None:
        self.init = init
        self.wire = wire
        self.level = Level.SPAWNED
        self.model: Any = None  # the model in this process (the paper's path)
        self.conn: Any = None  # or the connection to the node's generation engine
        self.spec: FunctionSpec | None = None
        self.state: dict[str, Any] = {}
        self.loop = asyncio.new_event_loop()  # `setup`'s
        self.calls: dict[str, _Call] = {}
        self._calls_lock = threading.Lock()
        self._local = threading.local()  # each worker thread's event loop, for async handlers
        self.workers = ThreadPoolExecutor(max_workers=max(1, int(init.get("max_batch", 1))),
                                          thread_name_prefix="handler")

    def step(self, level: Level, frame: dict[str, Any], fds: list[int]) -> None:
        """Do what reaching `level` takes. The zygote already isolated this process
        (runtime/proc/isolation.py): all of it runs with the function's rights only."""
        if level == Level.STAGED and self.level == Level.LOADED:
            if self.model is not None:
                self.model.unload()
            elif self.conn is not None and self.init["adapter"] is not None:
                self.conn.unload()
            self.level = level
            return
        if level != self.level + 1:
            raise RuntimeError(f"cannot step from {self.level.label} to {level.label}")
        init = self.init
        if level == Level.ATTACHED and init.get("engine") and init["backbone_path"] is not None:
            from runtime.sandbox.engine_client import EngineConnection

            if len(fds) != 1:
                raise RuntimeError("the engine step carries one connection")
            self.conn = EngineConnection(socket.socket(fileno=os.dup(fds[0])))
        elif level == Level.STAGED and self.conn is not None:
            if init["adapter"] is not None:
                self.conn.stage(init["adapter"])
        elif level == Level.ATTACHED and init["backbone_path"] is not None:
            import torch

            from runtime.sandbox.model import LoraModel

            torch.set_num_threads(int(init.get("threads", 1)))
            self.model = LoraModel(init["backbone_path"], init["adapter"],
                                     int(init.get("max_batch", 1)), self._prefilled,
                                     turn_prefill_budget_s(float(init.get("slo_ttft_s", DEFAULT_SLO_TTFT_S))))
            shared = frame.get("backbone")
            if shared is not None:
                shared["fds"] = fds
            self.model.attach(shared)
        elif level == Level.STAGED and self.model is not None:
            self.model.stage()
        elif level == Level.LOADED:
            self._load(warm_up=bool(frame.get("warm_up")))
        self.level = level

    def _prefilled(self, prefill: Any) -> None:
        self.wire.send({"type": "prefill", "rows": prefill.rows, "tokens": prefill.tokens,
                        "ms": prefill.seconds * 1000})

    def _load(self, warm_up: bool) -> None:
        init = self.init
        if self.model is not None:
            self.model.load()
        elif self.conn is not None and init["adapter"] is not None:
            self.conn.load()
        if self.spec is None:  # back from an offload: the handler module and setup stay
            # The node resolved the models: a deployed file names its deployer's paths, and
            # a declared folder this uid may not read was staged as a copy.
            use_node_models(init["name"], init["backbone_path"], init["adapter"])
            self.spec = find_spec(init["source_file"], init["name"])
            if self.spec.setup is not None:
                self._call(self.spec.setup, Context(self.spec.name, None, self.state, None), loop=self.loop)
        if self.model is not None and warm_up:
            self.model.warm_up()

    def _generator(self, call: _Call) -> Callable[..., Generation] | None:
        model = self.model if self.model is not None else self.conn
        if model is None:
            return None

        def generate(prompt: str, *, stream: bool, **options: Any) -> Generation:
            return model.generate(prompt, call.meter, on_delta=call.delta if stream and call.stream
                                   else None, on_first=call.first, **options)

        return generate

    def _call(self, fn: Callable[..., Any], *args: Any, loop: asyncio.AbstractEventLoop | None = None) -> Any:
        result = fn(*args)
        if inspect.isawaitable(result):
            if loop is None:
                loop = getattr(self._local, "loop", None)
                if loop is None:
                    loop = self._local.loop = asyncio.new_event_loop()
            result = loop.run_until_complete(result)
        return result

    def _chat_template(self, messages: list[dict[str, str]]) -> str:
        if self.conn is not None:
            return str(self.conn.chat_prompt(messages))
        from runtime.models.hf import chat_prompt

        model = self.model
        if model is None or model.tokenizer is None or model.batcher is None:
            raise BadRequest("the model is not loaded")
        with model.batcher.tokenizer_lock:  # the fast tokenizer is not thread-safe
            return chat_prompt(model.tokenizer, messages)

    def invoke(self, frame: dict[str, Any]) -> None:
        """Run one request's handler on a worker thread; its frames go to the node."""
        call = _Call(frame, self.wire)
        with self._calls_lock:
            self.calls[call.request_id] = call
        self.workers.submit(self._serve, call, frame["event"])

    def cancel(self, request_id: str) -> None:
        with self._calls_lock:
            call = self.calls.get(request_id)
        if call is not None:
            call.meter.cancelled.set()

    def _serve(self, call: _Call, event: dict[str, Any]) -> None:
        try:
            self.wire.send(self._run(call, event))
        except OSError:  # the node went away: the main thread exits on EOF
            pass
        except SystemExit as exc:  # the handler asked the process to end: it does, as it asked
            code = exc.code
            os._exit(code if isinstance(code, int) else 0 if code is None else 1)
        finally:
            with self._calls_lock:
                del self.calls[call.request_id]
                idle = not self.calls
            if idle and self.conn is not None and self.conn.gone:
                # Nothing can generate here any more: the node replaces an exited sandbox.
                os._exit(ENGINE_LOST_EXIT)
            if idle:
                give_back_heap()

    def _run(self, call: _Call, event: dict[str, Any]) -> dict[str, Any]:
        tag = {"request_id": call.request_id}
        if self.spec is None:
            return {"type": "error", **tag, "error": {
                "type": "RuntimeError", "message": "the sandbox is not loaded"}}
        has_model = self.model is not None or self.conn is not None
        ctx = Context(self.spec.name, call.request_id, self.state, self._generator(call),
                      call.event_info, self._chat_template if has_model else None)
        handler = self.spec.handler
        if self.spec.openai is not False and openai_api.is_request(event):
            postprocess = self.spec.openai if callable(self.spec.openai) else None

            def handler(event: dict[str, Any], ctx: Context) -> Any:
                return openai_api.respond(event, ctx, self._chat_template, postprocess)
        _current.request_id = call.request_id
        try:
            output = self._call(handler, event, ctx)
        except BadRequest as exc:  # the caller's mistake, as the handler judged it: no traceback
            ctx.log.info("handler_refused", error=exc.message[:MAX_ERROR_MESSAGE])
            return {"type": "error", **tag, "error": _error(exc)}
        except Exception as exc:
            ctx.log.warning("handler_failed", error=f"{type(exc).__name__}: {exc}", exc_info=True)
            return {"type": "error", **tag, "error": _error(exc)}
        finally:
            for stream in (_STDOUT, _STDERR):  # a last line without "\n" is this request's too
                if stream is not None:
                    stream.flush()
            _current.request_id = None
        meter = call.meter
        usage = {"tokens_in": meter.tokens_in, "tokens_out": meter.tokens_out,
                 "first_token_at": meter.first_token_at, "batch": meter.prefill_batch}
        result = {"type": "result", **tag, "output": output, "usage": usage}
        try:
            size = len(frames.pack(result))
        except Exception as exc:  # e.g. a set, an object, an int beyond 64 bits
            return {"type": "error", **tag, "error": {
                "type": type(exc).__name__,
                "message": f"handler returned a value that cannot be encoded: {exc}"}}
        limit = int(self.init.get("max_frame_bytes", frames.MAX_FRAME_BYTES))
        if size > limit:  # the node would not read it (nor could it send such a reply)
            return {"type": "error", **tag, "error": {
                "type": "ValueError", "too_large": True,
                "message": f"handler returned {size} bytes, over the {limit} a reply may carry"}}
        return result


def _level_frame(level: Level, seconds: float) -> dict[str, Any]:
    # The node measures host memory itself; device memory only where NVML cannot tell it.
    return {"type": "level", "level": int(level), "ms": seconds * 1000, "device_bytes": device_bytes()}


class _TaggedLines(io.TextIOBase):
    """sys.stdout / sys.stderr of a sandbox: each line a handler writes goes out prefixed
    with its request id (`\x1e<id>\x1f`), so the node can tell `faas logs` which request
    printed it. Lines of no request (setup, imports) go out as they are."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._partial = threading.local()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        pending = getattr(self._partial, "text", "") + text
        *lines, self._partial.text = pending.split("\n")
        if lines:
            self._emit(lines)
        return len(text)

    def _emit(self, lines: list[str]) -> None:
        request_id = getattr(_current, "request_id", None)
        tag = f"\x1e{request_id}\x1f" if request_id else ""
        with self._lock:
            self._stream.write("".join(f"{tag}{line}\n" for line in lines))
            self._stream.flush()

    def flush(self) -> None:
        """Also ends this thread's unfinished line (a print with end=""), under its request."""
        partial, self._partial.text = getattr(self._partial, "text", ""), ""
        if partial:
            self._emit([partial])
        else:
            with self._lock:
                self._stream.flush()

    # What code expects of a text stream: passed through to the real one.
    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._stream.encoding

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self._stream.errors

    @property
    def buffer(self) -> Any:
        return self._stream.buffer

    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        return self._stream.isatty()


_current = threading.local()  # the request a handler thread serves
_STDOUT: _TaggedLines | None = None
_STDERR: _TaggedLines | None = None


def serve(sock: socket.socket) -> int:
    """Serve one function on `sock` (the zygote calls this in a forked child)."""
    global _STDOUT, _STDERR
    sys.stdout = _STDOUT = _TaggedLines(sys.stdout)
    sys.stderr = _STDERR = _TaggedLines(sys.stderr)
    reader = frames.FrameReader(sock)
    init, _ = reader.next()
    if init is None:
        return 0
    log = get_logger(fn=init["name"])
    # The function's settings and secrets, sent by the node to its sandboxes only: before
    # its code is imported, as its environment.
    os.environ.update({str(k): str(v) for k, v in (init.get("env") or {}).items()})
    wire = _Wire(sock)
    function = _Function(init, wire)
    wire.send(_level_frame(Level.SPAWNED, 0.0))
    while True:
        frame, fds = reader.next()
        if frame is None:
            return 0
        kind = frame.get("type")
        if kind == "invoke":
            # Before the handler can run: a death without this frame means it never did.
            wire.send({"type": "started", "request_id": frame["request_id"]})
            function.invoke(frame)
            continue
        if kind == "cancel":
            function.cancel(frame["request_id"])
            continue
        level = Level(frame["level"])
        started = time.monotonic()
        try:
            function.step(level, frame, fds)
        except Exception as exc:
            log.error("sandbox_init_failed", level=level.label, error=f"{type(exc).__name__}: {exc}",
                      exc_info=True)
            wire.send({"type": "init_error", "error": _error(exc)})
            return 1
        finally:
            for fd in fds:  # a mapping outlives its descriptor
                os.close(fd)
        # Return what loading and the warm-up freed: before the reply when nobody waits for
        # it (the profile then sees what an idle sandbox holds), after it when a request does.
        waited = not frame.get("warm_up")
        if not waited:
            give_back_heap()
        wire.send(_level_frame(level, time.monotonic() - started))
        if waited:
            give_back_heap()
