"""The node agent's handle on sandbox processes: spawn, initialise, invoke, stop, kill."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from faas.errors import BadRequest, HandlerError, Overloaded
from faas.logs import get_logger
from faas.protocol import MAX_ERROR_MESSAGE
from faas.record import FunctionRecord
from runtime.backbone.registry import Backbone
from runtime.memory.usage import sandbox_bytes
from runtime.pool.levels import Level
from runtime.proc import frames
from runtime.proc.children import renice_tree, start_node_child
from runtime.proc.isolation import Isolation


# How long a frame to a sandbox may wait for room in its socket before the sandbox counts
# as gone.
_SEND_TIMEOUT_S = 5.0


class SandboxDied(HandlerError):
    """The sandbox process exited (crashed or was killed) while it held a request."""


class SandboxGone(SandboxDied):
    """The sandbox had exited before the request reached it: the handler never ran."""


class OutputTooLarge(HandlerError):
    """The handler returned more than a reply may carry: running it again cannot help."""


@dataclass(frozen=True)
class SandboxConfig:
    """How sandboxes are started and kept. `threads` is torch's intra-op thread count per
    sandbox, kept low so several sandboxes do not oversubscribe the cores; an idle sandbox
    is stopped `keep_alive_s` after its last request (scale to zero); a request that stops
    (cancelled, past its deadline) gets `stop_grace_s` for its handler to return before
    its sandbox is killed."""

    threads: int = 1
    stop_grace_s: float = 2.0
    keep_alive_s: float = 600.0
    max_batch: int = 64  # the node's cap on every function's `max_batch` (1: no batching)
    # On a CPU node run as root: a sandbox that only decodes runs at the lowest CPU priority,
    # one with a prompt to prefill at the normal one, so under contention the cores go to
    # first tokens (the SLO) before more tokens of requests that have theirs.
    prefill_priority: bool = False
    # The largest frame the node reads from a sandbox (a reply beyond the max payload could
    # not be sent anyway; the node sets it from its server's), and how many bytes of a
    # sandbox's frames may wait for their requests before the node stops reading from it.
    max_frame_bytes: int = (1 << 20) + (64 << 10)
    queued_bytes: int = 16 << 20
    # Each line a sandbox prints: (function, request id or None, line); the node publishes
    # them for `faas logs`.
    on_output: Callable[[str, str | None, str], None] | None = field(default=None, compare=False)


def _request_of(line: str) -> tuple[str | None, str]:
    """The request id a sandbox line carries (a handler's print: `\x1e<id>\x1f` first; its
    structured log: a JSON `req` field), and the line without the tag. The id is only a
    label: the line is the sandbox's to write."""
    if line.startswith("\x1e") and "\x1f" in line:
        tag, _, rest = line[1:].partition("\x1f")
        return tag[:64] or None, rest
    if line.startswith("{") and '"req"' in line:
        try:
            request_id = json.loads(line).get("req")
        except (ValueError, RecursionError):  # whatever the sandbox wrote
            return None, line
        return (request_id[:64] if isinstance(request_id, str) else None), line
    return None, line


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 62


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e15


def _error_fields(error: object) -> bool:
    return isinstance(error, dict) and isinstance(error.get("type"), str) \
        and isinstance(error.get("message"), str)


def _retry_hint(value: object) -> float:
    """The engine's hint (when enough of its batch will have finished) as the sandbox relayed
    it: the sandbox may lie, so a hint that is no number counts as none and the rest is held
    to 0.1-60 s."""
    return max(0.1, min(float(value), 60.0)) if _number(value) else 1.0  # type: ignore[arg-type]


_USAGE = {"tokens_in": _int, "tokens_out": _int, "batch": _int,
          "first_token_at": lambda v: v is None or _number(v)}
# What each frame a sandbox sends must carry (beside its type), checked as it is read: a
# frame that breaks this is a protocol error and its sandbox is killed.
_FRAMES: dict[str, Callable[[dict[str, Any]], bool]] = {
    "level": lambda f: _int(f.get("level")) and _int(f.get("device_bytes", 0)),
    "init_error": lambda f: _error_fields(f.get("error")),
    "prefill": lambda f: _int(f.get("rows")) and _int(f.get("tokens")) and _number(f.get("ms")),
    "first": lambda f: isinstance(f.get("request_id"), str),
    "started": lambda f: isinstance(f.get("request_id"), str),
    "chunk": lambda f: isinstance(f.get("request_id"), str) and isinstance(f.get("delta"), str)
    and isinstance(f.get("token_ids"), list) and all(_int(t) for t in f["token_ids"]),
    "result": lambda f: isinstance(f.get("request_id"), str) and "output" in f
    and isinstance(f.get("usage", {}), dict) and all(k in _USAGE and _USAGE[k](v) for k, v in f.get("usage", {}).items()),
    "error": lambda f: isinstance(f.get("request_id"), str) and _error_fields(f.get("error")),
}


def _checked(frame: dict[str, Any]) -> dict[str, Any]:
    """`frame` if it is one a sandbox may send, with the fields its type needs; ValueError
    otherwise."""
    check = _FRAMES.get(frame["type"])
    if check is None or not check(frame):
        raise ValueError(f"a {frame['type'][:40]!r} frame the node does not take")
    return frame


def max_batch(spec: FunctionRecord, config: SandboxConfig) -> int:
    """How many requests one sandbox of this function serves at once."""
    return max(1, min(spec.max_batch, config.max_batch))


@dataclass
class SandboxResult:
    output: Any
    tokens_in: int = 0
    tokens_out: int = 0
    first_token_at: float | None = None
    batch: int = 0  # how many prompts its first prefill ran with


# What the pool hears from a sandbox besides replies: its prefills (rows, tokens, ms).
PrefillSink = Callable[[dict[str, Any]], None]
# Where a streamed request's chunks go, in order: {"delta", "token_ids"}.
ChunkSink = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class StepCost:
    """What one step took, measured on the node, and what the sandbox holds after it."""

    level: Level
    seconds: float
    host_bytes: int
    device_bytes: int


class Sandbox:
    """One sandbox process leased to one function; climbs the levels one step at a time
    (runtime/pool/levels.py), then serves requests, several at once: one task reads every frame
    and hands each to the step or the request it answers."""

    def __init__(self, function: str, proc: ForkedProcess, sock: socket.socket,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 config: SandboxConfig) -> None:
        self.function = function
        self._on_output = config.on_output
        self.proc = proc
        self._prefill_priority = config.prefill_priority
        self._max_frame_bytes = config.max_frame_bytes
        self._queue_budget = config.queued_bytes
        self._queued = 0  # bytes of frames waiting in the requests' queues
        self._drained = asyncio.Event()
        self._prefilling: set[str] = set()  # requests it holds that have no first token yet
        self._nice = 0
        self._renicing: asyncio.Task[None] | None = None
        # A twin of the stream's socket for the one frame that carries descriptors (the
        # backbone's); asyncio's transport cannot attach them.
        self._fd_sock = socket.socket(fileno=os.dup(sock.fileno()))
        self._reader = reader
        self._writer = writer
        self._on_close: Callable[[], None] | None = None
        self._output_task: asyncio.Task[None] | None = None  # ends at EOF, when the process does
        self._step: asyncio.Future[dict[str, Any]] | None = None
        self._eof = False  # its end of the socket closed: it is gone or going
        self._calls: dict[str, asyncio.Queue[tuple[dict[str, Any], int]]] = {}
        self._recent: collections.deque[str] = collections.deque(maxlen=256)  # answered requests
        self.on_prefill: PrefillSink = lambda frame: None
        self.prefills = 0  # how many it reported
        self.log = get_logger(fn=function, pid=proc.pid)
        self._reading = asyncio.create_task(self._read(), name=f"frames-{proc.pid}")

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def forward_output(self, fd: int) -> None:
        """Log what the sandbox writes to stdout/stderr (prints, its own log lines), one
        `sandbox_output` event a line, tagged with the function and pid: a function cannot
        write to the node's stderr or pass its lines off as the node's."""
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                     os.fdopen(fd, "rb", buffering=0))
        self._output_task = asyncio.create_task(self._forward(reader), name=f"output-{self.proc.pid}")

    async def _forward(self, reader: asyncio.StreamReader, max_line: int = 16384) -> None:
        pending = b""
        while chunk := await reader.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if len(pending) > max_line:
                lines.append(pending)
                pending = b""
            for line in lines:
                self._output(line[:max_line].decode(errors="replace"))
        if pending:
            self._output(pending[:max_line].decode(errors="replace"))

    def _output(self, line: str) -> None:
        request_id, line = _request_of(line)
        # Only ids of requests this sandbox holds or just answered (its last lines may
        # arrive after its reply): a function cannot file lines under another's requests.
        if request_id is not None and request_id not in self._calls and request_id not in self._recent:
            request_id = None
        self.log.info("sandbox_output", line=line, req=request_id)
        if self._on_output is not None:
            self._on_output(self.function, request_id, line)

    async def _send(self, frame: dict[str, Any]) -> None:
        """Write a frame; a sandbox that stops reading its socket (and so would hold up its
        caller, a cancel, a deadline) is killed: ConnectionError."""
        self._writer.write(frames.pack(frame))
        if not self._writer.transport.get_write_buffer_size():  # all in the socket already
            return
        try:
            await asyncio.wait_for(self._writer.drain(), _SEND_TIMEOUT_S)
        except TimeoutError:
            self.log.error("sandbox_not_reading", timeout_s=_SEND_TIMEOUT_S)
            self.proc.kill()
            raise ConnectionError("the sandbox stopped reading its socket") from None

    async def _read(self) -> None:
        try:
            while True:
                frame, size = await frames.read_sized_frame(self._reader, self._max_frame_bytes)
                kind = _checked(frame)["type"]
                if kind in ("level", "init_error"):
                    if self._step is not None and not self._step.done():
                        self._step.set_result(frame)
                elif kind == "prefill":
                    self.prefills += 1
                    self.on_prefill(frame)
                elif kind == "first":
                    self._prefilled(frame["request_id"])
                elif (calls := self._calls.get(frame.get("request_id", ""))) is not None:
                    calls.put_nowait((frame, size))
                    self._queued += size
                    while self._queued > self._queue_budget:  # the sandbox waits for its callers
                        self._drained.clear()
                        await self._drained.wait()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception as exc:  # a frame that breaks the protocol: the sandbox cannot be trusted
            self.log.error("sandbox_protocol_error", error=f"{type(exc).__name__}: {exc}")
            self.proc.kill()
        self._eof = True
        code = await self.proc.wait()
        died = {"type": "died", "code": code}
        if self._step is not None and not self._step.done():
            self._step.set_result(died)
        for calls in self._calls.values():
            calls.put_nowait((died, 0))

    def _died(self, reply: dict[str, Any]) -> SandboxDied:
        return SandboxDied(f"sandbox of {self.function!r} exited with code {reply['code']} "
                           "while serving the request")

    def hold(self, on_close: Callable[[], None]) -> None:
        """Run `on_close` once when this sandbox is let go of (at once if it already was):
        what lets go of the backbone it maps."""
        if self._writer.is_closing():
            on_close()
        else:
            self._on_close = on_close

    async def step(self, frame: dict[str, Any], backbone: Backbone | None = None,
                   fds: list[int] | None = None) -> StepCost:
        """Send one step (`init` or `step`) and wait for the level it reached; with a
        backbone, its descriptors go along (or `fds`: an engine connection).
        HandlerError when the step failed."""
        started = time.monotonic()
        self._step = asyncio.get_running_loop().create_future()
        if backbone is not None:
            frame, fds = {**frame, "backbone": backbone.for_sandbox()}, backbone.fds
        try:
            if fds:
                await self._writer.drain()
                frames.send_frame_with_fds(self._fd_sock, frame, fds)
            else:
                await self._send(frame)
        except (ConnectionError, BrokenPipeError):
            pass  # the reader sees the end too, and answers the step with it
        reply = await self._step
        if reply["type"] == "died":
            raise self._died(reply)
        if reply["type"] == "init_error":
            err = reply["error"]
            raise HandlerError(f"function {self.function!r} failed to load: "
                               f"{err['type'][:200]}: {err['message'][:MAX_ERROR_MESSAGE]}")
        seconds = time.monotonic() - started
        asked = Level(frame.get("level", Level.SPAWNED))
        if reply.get("level") != asked:  # a sandbox says which level it reached, not another
            self.proc.kill()
            raise HandlerError(f"sandbox of {self.function!r} answered a {asked.label} step "
                               "with another level")
        host, device = await asyncio.to_thread(sandbox_bytes, self.proc.pid, int(reply.get("device_bytes", 0)))
        return StepCost(asked, seconds, host, device)

    async def invoke(self, request_id: str, event: dict[str, Any], stream: bool = False,
                     on_chunk: ChunkSink | None = None,
                     event_info: dict[str, Any] | None = None) -> SandboxResult:
        """Run the handler (beside the sandbox's other requests); with `stream`, each chunk
        of streamed text goes to `on_chunk` before this returns. HandlerError if the
        handler raised, SandboxDied if the process died."""
        if self._eof:
            code = await self.proc.wait()
            raise SandboxGone(f"sandbox of {self.function!r} exited with code {code}")
        replies: asyncio.Queue[tuple[dict[str, Any], int]] = asyncio.Queue()
        self._calls[request_id] = replies
        self._prefilling.add(request_id)
        self._prioritise()
        try:
            try:
                await self._send({"type": "invoke", "request_id": request_id, "event": event,
                                  "stream": stream, "event_info": event_info})
            except (ConnectionError, BrokenPipeError):
                code = await self.proc.wait()
                raise SandboxGone(f"sandbox of {self.function!r} exited with code {code}") from None
            started = False
            while (reply := await self._next(replies))["type"] in ("started", "chunk"):
                if reply["type"] == "started":
                    started = True
                elif on_chunk is not None:
                    await on_chunk({"delta": reply["delta"], "token_ids": reply["token_ids"]})
        finally:
            del self._calls[request_id]
            while not replies.empty():  # frames it sent past the request's end
                self._unqueue(replies.get_nowait()[1])
            self._recent.append(request_id)
            self._prefilled(request_id)
        if reply["type"] == "died":
            if not started:  # it died before it could run the handler: another may serve
                raise SandboxGone(f"sandbox of {self.function!r} exited with code {reply['code']}")
            raise self._died(reply)
        if reply["type"] == "error":
            err = reply["error"]
            if err.get("bad_request"):
                raise BadRequest(str(err["message"]))
            if err.get("overloaded"):
                raise Overloaded(str(err["message"]),
                                 retry_after_s=_retry_hint(err.get("retry_after_s")))
            cls = OutputTooLarge if err.get("too_large") else HandlerError
            raise cls(f"{err['type']}: {err['message']}")
        return SandboxResult(output=reply["output"], **reply.get("usage", {}))

    async def _next(self, replies: asyncio.Queue[tuple[dict[str, Any], int]]) -> dict[str, Any]:
        frame, size = await replies.get()
        self._unqueue(size)
        return frame

    def _unqueue(self, size: int) -> None:
        self._queued -= size
        if self._queued <= self._queue_budget:
            self._drained.set()

    def _prefilled(self, request_id: str) -> None:
        self._prefilling.discard(request_id)
        self._prioritise()

    def _prioritise(self) -> None:
        """Normal priority while it has a prompt to prefill (or nothing to do), the lowest
        while it only decodes."""
        if not self._prefill_priority or not self.alive:
            return
        nice = 19 if self._calls and not self._prefilling else 0
        if nice != self._nice:
            self._nice = nice
            if self._renicing is None or self._renicing.done():
                self._renicing = asyncio.create_task(self._renice(), name=f"renice-{self.proc.pid}")

    async def _renice(self) -> None:
        """Apply the latest nice value, off the event loop (a sandbox may have thousands of
        threads to walk), however often it changes meanwhile."""
        applied = None
        while applied != self._nice and self.alive:
            applied = self._nice
            await asyncio.to_thread(renice_tree, self.proc.pid, applied)

    async def cancel(self, request_id: str) -> None:
        """Stop a request's generations at their next token (its handler then answers)."""
        try:
            await self._send({"type": "cancel", "request_id": request_id})
        except (ConnectionError, BrokenPipeError):
            pass

    def discard(self) -> None:
        """Let go of a sandbox that already exited: our socket end and its backbone."""
        if self._renicing is not None:
            self._renicing.cancel()
        self._writer.close()
        self._fd_sock.close()
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()

    async def stop(self, grace_s: float) -> None:
        """Close the socket (the sandbox exits on EOF); kill it if it lingers."""
        self._writer.close()
        self._fd_sock.close()
        try:
            await asyncio.wait_for(self.proc.wait(), grace_s)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        self.discard()

    async def kill(self) -> None:
        if self.alive:
            self.proc.kill()
        await self.proc.wait()
        self.discard()


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
            "node_models": spec.deployed is not None, "engine": engine}
    try:
        await sandbox.forward_output(output_r)
        cost = await sandbox.step(init)
    except BaseException:
        await sandbox.kill()
        raise
    return sandbox, StepCost(cost.level, time.monotonic() - started, cost.host_bytes,
                             cost.device_bytes)
