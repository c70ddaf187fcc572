"""The node agent's handle on a sandbox process: initialise, climb, invoke, cancel, stop,
kill, and the checks on every frame it sends (it may be hostile). Sandboxes are forked by
the zygote (runtime/sandbox/spawn.py).

Longer than most modules: the frames a sandbox may send and the handle that reads them are
one trust boundary, kept in one file.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import socket
import time
from dataclasses import dataclass, field
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Callable

from faas.errors import BadRequest, HandlerError, Overloaded
from faas.logs import get_logger
from faas.protocol import MAX_ERROR_MESSAGE
from faas.record import FunctionRecord
from runtime.backbone.registry import Backbone
from runtime.proc import frames
from runtime.proc.children import renice_tree
from runtime.proc.usage import sandbox_bytes
from runtime.sandbox.levels import Level

if TYPE_CHECKING:
    from runtime.sandbox.spawn import ForkedProcess


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
    # A function's environment for its next sandbox (its settings and secrets), read when
    # the sandbox starts; None: its settings only.
    environment: Callable[[FunctionRecord], Awaitable[dict[str, str]]] | None = field(default=None, compare=False)


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
    (runtime/sandbox/levels.py), then serves requests, several at once: one task reads every frame
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
