"""A sandbox's connection to its generation engine (runtime/engine/server.py): what
`ctx.generate` and `ctx.chat_prompt` call when the function runs on the engine. Light: no
torch; the sandbox reads its own adapter's files (with the function's rights, no more) and
sends them to the engine as data."""

from __future__ import annotations

import itertools
import json
import socket
import threading
from pathlib import Path
from typing import Any, Callable

from faas.errors import FaasError, Overloaded, error_for_code
from faas.sdk import Generation
from runtime.proc import frames
from runtime.sandbox.meter import UsageMeter

# Text delta and the token ids since the last one.
DeltaSink = Callable[[str, list[int]], None]
_CANCEL_POLL_S = 0.05


class EngineGone(Overloaded):
    """The engine exited: nothing more runs on this connection (the node starts a fresh
    engine for the next sandbox); the caller may retry."""

    def __init__(self) -> None:
        super().__init__("the generation engine stopped: retry", retry_after_s=1.0)


class _Pending:
    """One request in flight: its answer, and for a generation where its frames go."""

    def __init__(self, on_frame: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.on_frame = on_frame
        self.answer: dict[str, Any] | None = None
        self.done = threading.Event()


class EngineConnection:
    """The socket the node handed this sandbox; any thread may ask through it."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._gone = False
        threading.Thread(target=self._read, name="engine-in", daemon=True).start()

    def _read(self) -> None:
        reader = frames.FrameReader(self._sock, max_fds=0)
        try:
            while (frame := reader.next()[0]) is not None:
                with self._lock:
                    pending = self._pending.get(frame.get("id"))
                if pending is None:
                    continue
                if frame["type"] in ("first", "chunk"):
                    if pending.on_frame is not None:
                        pending.on_frame(frame)
                    continue
                pending.answer = frame
                pending.done.set()
        except OSError:
            pass
        with self._lock:
            self._gone = True
            waiting = list(self._pending.values())
        for pending in waiting:
            pending.done.set()

    @property
    def gone(self) -> bool:
        """The engine closed this connection (it exited, or cut this sandbox off)."""
        return self._gone

    def _start(self, frame: dict[str, Any], pending: _Pending) -> int:
        ident = next(self._ids)
        with self._lock:
            if self._gone:
                raise EngineGone()
            self._pending[ident] = pending
        try:
            with self._send_lock:
                self._sock.sendall(frames.pack({**frame, "id": ident}))
        except OSError:
            with self._lock:
                self._pending.pop(ident, None)
            raise EngineGone() from None
        return ident

    def _finish(self, ident: int, pending: _Pending, expect: str) -> dict[str, Any]:
        with self._lock:
            self._pending.pop(ident, None)
        answer = pending.answer
        if answer is None:
            raise EngineGone()
        if answer["type"] == "error":
            err = error_for_code(int(answer.get("code", 500)), str(answer.get("message", "")))
            retry = answer.get("retry_after_s")
            if isinstance(retry, (int, float)) and not isinstance(retry, bool):
                err.retry_after_s = float(retry)
            raise err
        if answer["type"] != expect:
            raise FaasError(f"the engine answered {answer['type']!r} to a request for {expect!r}")
        return answer

    def _ask(self, frame: dict[str, Any], expect: str) -> dict[str, Any]:
        pending = _Pending()
        ident = self._start(frame, pending)
        pending.done.wait()
        return self._finish(ident, pending, expect)

    def stage(self, adapter: str) -> int:
        """Send the adapter folder's config and safetensors weights; the bytes the engine
        holds for it."""
        folder = Path(adapter)
        weights = folder / "adapter_model.safetensors"
        if not weights.is_file():
            raise FaasError(f"adapter {adapter} has no adapter_model.safetensors "
                            "(the engine takes safetensors weights only)")
        config = json.loads((folder / "adapter_config.json").read_text())
        return int(self._ask({"type": "stage", "config": config, "weights": weights.read_bytes()},
                             "staged")["bytes"])

    def load(self) -> None:
        self._ask({"type": "load"}, "loaded")

    def unload(self) -> None:
        self._ask({"type": "unload"}, "unloaded")

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        return str(self._ask({"type": "chat", "messages": messages}, "chat")["text"])

    def generate(self, prompt: str, meter: UsageMeter, *, max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop: tuple[str, ...] = (), ignore_eos: bool = False,
                 on_delta: DeltaSink | None = None,
                 on_first: Callable[[], None] | None = None) -> Generation:
        """One generation in the engine's batch with this function's adapter (any thread);
        a cancel of the request (`meter.cancelled`) stops it at its next token."""
        first = on_first if meter.first_token_at is None else None

        def on_frame(frame: dict[str, Any]) -> None:
            if frame["type"] == "first":
                if first is not None:
                    first()
            elif on_delta is not None:
                on_delta(str(frame.get("delta", "")), list(frame.get("token_ids", [])))

        pending = _Pending(on_frame)
        ident = self._start({"type": "gen", "prompt": prompt, "max_new_tokens": max_new_tokens,
                             "temperature": temperature, "top_p": top_p, "seed": seed,
                             "stop": list(stop), "ignore_eos": ignore_eos,
                             "stream": on_delta is not None}, pending)
        cancelled = False
        while not pending.done.wait(_CANCEL_POLL_S):
            if meter.cancelled.is_set() and not cancelled:
                cancelled = True
                try:
                    with self._send_lock:
                        self._sock.sendall(frames.pack({"type": "cancel", "id": ident}))
                except OSError:
                    pass
        done = self._finish(ident, pending, "done")
        generation = Generation(text=str(done["text"]), token_ids=list(done["token_ids"]),
                                prompt_tokens=int(done["prompt_tokens"]),
                                finish_reason=str(done["finish_reason"]))
        meter.tokens_in += generation.prompt_tokens
        meter.tokens_out += len(generation.token_ids)
        if meter.first_token_at is None:
            meter.first_token_at = done.get("first_token_at")
            meter.prefill_batch = int(done.get("batch", 0))
        return generation
