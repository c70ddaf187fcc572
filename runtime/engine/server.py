"""The generation engine process: one per (base model, device), started by the node as
`python -m runtime.engine.server --fd N --parent PID`. It runs no user code.

Control socket (from the node): a `load` frame with the backbone export's descriptors
(the weights are mapped read-only, as sandboxes of the paper's path map them), answered
`ready` or `error`; then `connect {function, max_batch, slo_ttft_s}` frames, each with
one end of a socketpair whose other end the node hands to a sandbox of that function,
answered `connected`. The engine exits when the control socket closes.

Connection (from a sandbox; every frame has an `id` its answer carries):
- `stage {config, weights}`: the function's LoRA adapter as data (its adapter_config.json
  as a map, its adapter_model.safetensors bytes), checked against the backbone
  (LoRA tensors only, shapes that fit, rank bounded), kept in host memory -> `staged`;
- `load` / `unload`: the staged adapter joins / leaves the model -> `loaded` / `unloaded`;
- `gen {prompt, max_new_tokens, temperature, top_p, seed, stop, ignore_eos, stream}`:
  one generation in the shared batch, with this connection's adapter -> `first`, `chunk`s
  (with `stream`), then `done` (or `error`: a 503 when the KV cache had no room for it
  within the function's TTFT SLO, with `retry_after_s`);
- `cancel {id}`: stop that generation at its next token;
- `chat {messages}`: the prompt for chat messages in the model's template -> `chat {text}`.
Errors are `error {id, code, message}` (HTTP-like codes). A connection that breaks the
protocol or stops reading is closed: its generations end, nobody else's change.

Longer than most modules: this is one trust boundary (every frame from a sandbox is checked
here, against the state it may touch), kept in one file so that none of its checks is
somewhere else.
"""

from __future__ import annotations

import collections
import hashlib
import json
import selectors
import socket
import sys
import threading
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from faas.logs import get_logger
from runtime.batching.window import turn_prefill_budget_s
from runtime.proc import frames
from runtime.proc.children import run_node_child

log = get_logger()

MAX_FRAME_BYTES = 1 << 30  # a stage frame carries the adapter's weights
MAX_REQUEST_BYTES = 4 << 20  # any other frame
MAX_QUEUED_OUT_BYTES = 16 << 20  # answers a sandbox has not read yet
MAX_RANK = 256
MAX_STOPS = 16
MAX_STOP_CHARS = 256
MAX_MESSAGES = 256
# A longer prompt is prefilled this many tokens a turn, between decode steps of the others.
CHUNK_TOKENS = 256
DEFAULT_CPU_KV_BYTES = 1 << 30


class ProtocolError(Exception):
    """A frame the engine does not take: its connection is closed."""


class _Refused(Exception):
    """A request the engine answers with an error (the connection stays)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Out:
    """What the engine sends a sandbox, written by a thread of its own: a sandbox that does
    not read can never hold up the batch; past `MAX_QUEUED_OUT_BYTES` it is cut off."""

    def __init__(self, sock: socket.socket, on_fail: Callable[[], None]) -> None:
        self._sock = sock
        self._on_fail = on_fail
        self._queue: collections.deque[bytes] = collections.deque()
        self._bytes = 0
        self._closed = False
        self._cond = threading.Condition()
        threading.Thread(target=self._run, name="engine-out", daemon=True).start()

    def send(self, frame: dict[str, Any]) -> None:
        data = frames.pack(frame)
        with self._cond:
            if self._closed:
                return
            if self._bytes + len(data) > MAX_QUEUED_OUT_BYTES:
                overflow = True
            else:
                overflow = False
                self._queue.append(data)
                self._bytes += len(data)
                self._cond.notify()
        if overflow:
            self._on_fail()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                data = self._queue.popleft()
                self._bytes -= len(data)
            try:
                self._sock.sendall(data)
            except OSError:
                self._on_fail()
                return


@dataclass(eq=False)
class _Adapter:
    """One function's adapter in the engine: staged (host) by some connections, on the model
    (loaded) for some."""

    key: str  # its name in the peft model: function and content digest
    config: Any
    weights: dict[str, Any]
    nbytes: int
    staged_by: set[int] = field(default_factory=set)
    loaded_by: set[int] = field(default_factory=set)


@dataclass(eq=False)
class _Conn:
    """A sandbox's connection, bound by the node to one function."""

    id: int
    function: str
    max_batch: int
    slo_s: float
    sock: socket.socket
    out: _Out | None = None
    buffer: bytearray = field(default_factory=bytearray)
    adapter: _Adapter | None = None
    gens: dict[Any, Any] = field(default_factory=dict)  # its id -> GenRequest
    closed: bool = False


class Engine:
    """The backbone, the adapters of the connected functions, and one batch for all."""

    def __init__(self, model: Any, tokenizer: Any, device: str, max_rows: int,
                 kv_bytes: int | None = None) -> None:
        from runtime.batching.batcher import Batcher
        from runtime.engine.stacked import StackedLora

        self.device = device
        self.tokenizer = tokenizer
        self.base_shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.lora = StackedLora()
        self.kv_tokens = kv_bytes // kv_bytes_per_token(model) if kv_bytes is not None else None
        self.batcher = Batcher(model, tokenizer, device, max_rows, chunk_tokens=CHUNK_TOKENS,
                               route=lambda adapters: self.lora.route(adapters, device),
                               kv_tokens=self.kv_tokens)
        self.adapters: dict[str, _Adapter] = {}
        self.conns: dict[int, _Conn] = {}
        self.selector = selectors.DefaultSelector()
        self._lock = threading.Lock()  # conns' gens: the selector thread and the batcher's callbacks
        self._next_conn = 0
        self._closing: list[_Conn] = []  # cut off by another thread: closed by the selector's

    # --- control -------------------------------------------------------------------------

    def connect(self, frame: dict[str, Any], fds: list[int]) -> None:
        if len(fds) != 1:
            raise ProtocolError("connect carries exactly one socket")
        self._next_conn += 1
        conn = _Conn(self._next_conn, str(frame["function"]), max(1, int(frame["max_batch"])),
                     float(frame["slo_ttft_s"]), socket.socket(fileno=fds[0]))
        conn.sock.setblocking(False)
        conn.out = _Out(conn.sock, lambda: self._cut_off(conn))
        self.conns[conn.id] = conn
        self.batcher.shares[conn.function] = conn.max_batch
        self.batcher.prefill_budget_s = turn_prefill_budget_s(min(c.slo_s for c in self.conns.values()))
        self.selector.register(conn.sock, selectors.EVENT_READ, conn)

    def _cut_off(self, conn: _Conn) -> None:
        with self._lock:
            self._closing.append(conn)

    def close_conn(self, conn: _Conn, why: str | None = None) -> None:
        if conn.closed:
            return
        conn.closed = True
        if why:
            log.warning("engine_connection_closed", fn=conn.function, reason=why)
        self.selector.unregister(conn.sock)
        assert conn.out is not None
        conn.out.close()
        conn.sock.close()
        self.conns.pop(conn.id, None)
        with self._lock:
            gens, conn.gens = list(conn.gens.values()), {}
        for request in gens:
            request.cancelled.set()
        adapter = conn.adapter
        if adapter is not None:
            adapter.staged_by.discard(conn.id)
            if conn.id in adapter.loaded_by:
                adapter.loaded_by.discard(conn.id)
                if not adapter.loaded_by:
                    self.batcher.between_turns(lambda: self._take_off(adapter))
            if not adapter.staged_by:
                self.adapters.pop(adapter.key, None)

    # --- a connection's frames ----------------------------------------------------------

    def readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close_conn(conn)
            return
        conn.buffer += data
        try:
            while (frame := self._next_frame(conn)) is not None:
                self.handle(conn, frame)
        except ProtocolError as exc:
            self.close_conn(conn, str(exc))

    @staticmethod
    def _next_frame(conn: _Conn) -> dict[str, Any] | None:
        if len(conn.buffer) < 4:
            return None
        size = int.from_bytes(conn.buffer[:4], "big")
        if size > MAX_FRAME_BYTES:
            raise ProtocolError(f"a frame of {size} bytes")
        if len(conn.buffer) < 4 + size:
            return None
        body = bytes(conn.buffer[4:4 + size])
        del conn.buffer[:4 + size]
        try:
            frame = frames.unpack(body)
        except Exception as exc:
            raise ProtocolError(f"not a frame: {type(exc).__name__}") from None
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            raise ProtocolError("a frame must be a map with a type")
        if frame["type"] != "stage" and size > MAX_REQUEST_BYTES:
            raise ProtocolError(f"a {frame['type'][:20]!r} frame of {size} bytes")
        return frame

    def handle(self, conn: _Conn, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        handler = self._HANDLERS.get(kind)
        if handler is None:
            raise ProtocolError(f"unknown frame {kind[:40]!r}")
        ident = frame.get("id")
        if not isinstance(ident, int) or isinstance(ident, bool) or not 0 <= ident < 1 << 62:
            raise ProtocolError("a frame needs an integer id")
        allowed = _FIELDS[kind]
        unknown = set(frame) - allowed - {"type", "id"}
        if unknown:  # e.g. an adapter or a function of its choosing: refused, not ignored
            self.reply(conn, ident, 400, f"{kind} takes no {sorted(map(str, unknown))[:3]}")
            return
        try:
            handler(self, conn, ident, frame)
        except _Refused as exc:
            self.reply(conn, ident, exc.code, exc.message)

    def reply(self, conn: _Conn, ident: int, code: int, message: str) -> None:
        assert conn.out is not None
        conn.out.send({"type": "error", "id": ident, "code": code, "message": message[:4096]})

    def _stage(self, conn: _Conn, ident: int, frame: dict[str, Any]) -> None:
        from peft import PeftConfig, PeftType
        from safetensors.torch import load as load_safetensors

        from faas.artifacts import lora_shape_problems

        started = time.monotonic()
        config_data, weights = frame.get("config"), frame.get("weights")
        if not isinstance(config_data, dict) or not isinstance(weights, bytes):
            raise _Refused(400, "stage needs config (a map) and weights (safetensors bytes)")
        try:
            config = PeftConfig.from_peft_type(**config_data)
        except Exception as exc:
            raise _Refused(400, f"adapter config: {type(exc).__name__}: {exc}") from None
        if config.peft_type != PeftType.LORA:
            raise _Refused(400, f"only LoRA adapters are served, not {config.peft_type}")
        if getattr(config, "modules_to_save", None) or getattr(config, "trainable_token_indices", None):
            raise _Refused(400, "modules_to_save / trainable tokens cannot run on a shared backbone")
        variants = [flag for flag in ("use_dora", "lora_bias", "alora_invocation_tokens")
                    if getattr(config, flag, None)]
        if variants:
            raise _Refused(400, f"LoRA variants ({', '.join(variants)}) are not served by the engine: "
                                f"declare the function engine=\"sandbox\"")
        if not 0 < int(getattr(config, "r", 0)) <= MAX_RANK:
            raise _Refused(400, f"rank must be 1..{MAX_RANK}")
        try:
            tensors = load_safetensors(weights)
        except Exception as exc:
            raise _Refused(400, f"adapter weights are not safetensors: {exc}") from None
        stray = [k for k in tensors if ".lora_A." not in k and ".lora_B." not in k]
        if stray or not tensors:
            raise _Refused(400, f"only LoRA matrices may be sent, not {stray[:3] or 'nothing'}")
        problems = lora_shape_problems({k: list(t.shape) for k, t in tensors.items()}, self.base_shapes)
        if problems:
            raise _Refused(400, "; ".join(problems))
        config.inference_mode = True
        digest = hashlib.sha256(json.dumps(config_data, sort_keys=True, default=str).encode() + weights)
        key = f"{conn.function}-{digest.hexdigest()[:16]}"
        adapter = self.adapters.get(key)
        if adapter is None:
            adapter = self.adapters[key] = _Adapter(key, config, tensors, len(weights))
        if conn.adapter is not None and conn.adapter is not adapter:
            raise _Refused(409, "this connection staged another adapter already")
        conn.adapter = adapter
        adapter.staged_by.add(conn.id)
        assert conn.out is not None
        conn.out.send({"type": "staged", "id": ident, "bytes": adapter.nbytes,
                       "ms": (time.monotonic() - started) * 1000})

    def _load(self, conn: _Conn, ident: int, frame: dict[str, Any]) -> None:
        adapter = conn.adapter
        if adapter is None:
            raise _Refused(409, "stage the adapter first")
        first = not adapter.loaded_by
        adapter.loaded_by.add(conn.id)
        started = time.monotonic()
        out = conn.out
        assert out is not None

        def done(future: Future[None]) -> None:
            if future.exception() is not None:
                adapter.loaded_by.discard(conn.id)
                out.send({"type": "error", "id": ident, "code": 500,
                          "message": f"adapter load failed: {future.exception()}"})
            else:
                out.send({"type": "loaded", "id": ident, "ms": (time.monotonic() - started) * 1000})

        if first:
            self.batcher.between_turns(lambda: self._put_on(adapter)).add_done_callback(done)
        else:
            out.send({"type": "loaded", "id": ident, "ms": 0.0})

    def _unload(self, conn: _Conn, ident: int, frame: dict[str, Any]) -> None:
        adapter = conn.adapter
        assert conn.out is not None
        if adapter is not None and conn.id in adapter.loaded_by:
            adapter.loaded_by.discard(conn.id)
            if not adapter.loaded_by:
                self.batcher.between_turns(lambda: self._take_off(adapter))
        conn.out.send({"type": "unloaded", "id": ident})

    def _put_on(self, adapter: _Adapter) -> None:
        """On the batcher's thread, between turns: add the adapter to the model."""
        from peft import PeftModel
        from peft.utils import set_peft_model_state_dict

        model = self.batcher.model
        if not adapter.loaded_by or adapter.key in getattr(model, "peft_config", {}):
            return  # let go of meanwhile, or already on
        if hasattr(model, "peft_config"):
            model.add_adapter(adapter.key, adapter.config, low_cpu_mem_usage=True)
        else:
            model = PeftModel(model, adapter.config, adapter_name=adapter.key, low_cpu_mem_usage=True)
        result = set_peft_model_state_dict(model, adapter.weights, adapter_name=adapter.key,
                                           low_cpu_mem_usage=True)
        missing = [k for k in result.missing_keys if "lora_" in k and adapter.key in k]
        if missing:
            self.batcher.model = model
            self._take_off(adapter)
            raise ValueError(f"the adapter lacks weights for {missing[:3]}")
        self.batcher.model = model.eval()
        self.lora.rebuild(model)

    def _take_off(self, adapter: _Adapter) -> None:
        """On the batcher's thread, between turns: remove the adapter from the model (the
        last one: back to the bare backbone)."""
        model = self.batcher.model
        if adapter.loaded_by or adapter.key not in getattr(model, "peft_config", {}):
            return
        if len(model.peft_config) == 1:
            self.batcher.model = model.unload()
        else:
            model.delete_adapter(adapter.key)
            self.lora.rebuild(model)

    def _gen(self, conn: _Conn, ident: int, frame: dict[str, Any]) -> None:
        from runtime.batching.batcher import GenRequest

        options = _generation_options(frame)
        adapter = conn.adapter  # None: a function of the bare backbone
        if adapter is not None and conn.id not in adapter.loaded_by:
            raise _Refused(409, "the function's adapter is not loaded")
        with self._lock:
            if ident in conn.gens:
                raise _Refused(409, f"generation {ident} is running already")
            if len(conn.gens) >= conn.max_batch:
                raise _Refused(503, f"{len(conn.gens)} generations at once: the function's max_batch")
        input_ids = self.batcher.encode(frame["prompt"])
        if not input_ids:
            raise _Refused(400, "prompt encodes to no tokens")
        if self.context is not None and len(input_ids) + options["max_new_tokens"] > self.context:
            raise _Refused(400, f"prompt ({len(input_ids)} tokens) + max_new_tokens "
                                f"({options['max_new_tokens']}) exceeds the model's context of {self.context}")
        out = conn.out
        assert out is not None
        stream = bool(frame.get("stream"))
        request = GenRequest(
            input_ids, options["max_new_tokens"], options["temperature"], options["top_p"],
            options["seed"], options["stop"], options["ignore_eos"],
            on_delta=(lambda text, ids: out.send({"type": "chunk", "id": ident, "delta": text,
                                                  "token_ids": ids})) if stream else None,
            on_first=lambda: out.send({"type": "first", "id": ident}),
            adapter=adapter.key if adapter is not None else None, owner=conn.function, deadline=time.monotonic() + conn.slo_s)

        def finished(future: Future[Any]) -> None:
            with self._lock:
                conn.gens.pop(ident, None)
            error = future.exception()
            if error is not None:
                code = getattr(error, "code", 500)
                out.send({"type": "error", "id": ident, "code": code if isinstance(code, int) else 500,
                          "message": str(getattr(error, "message", error))[:4096],
                          "retry_after_s": getattr(error, "retry_after_s", None)})
                return
            generation = future.result()
            out.send({"type": "done", "id": ident, "text": generation.text,
                      "token_ids": generation.token_ids, "prompt_tokens": generation.prompt_tokens,
                      "finish_reason": generation.finish_reason,
                      "first_token_at": request.first_token_at, "batch": request.prefill_batch})

        with self._lock:
            conn.gens[ident] = request
        request.future.add_done_callback(finished)
        self.batcher.submit(request)

    def _cancel(self, conn: _Conn, ident: int, frame: dict[str, Any]) -> None:
        with self._lock:
            request = conn.gens.get(ident)
        if request is not None:
            request.cancelled.set()

    def _chat(self, conn: _Conn, ident: int, frame: dict[str, Any]) -> None:
        from faas.errors import BadRequest
        from runtime.models.hf import chat_prompt

        messages = frame.get("messages")
        if not (isinstance(messages, list) and len(messages) <= MAX_MESSAGES and all(
                isinstance(m, dict) and set(m) == {"role", "content"}
                and isinstance(m["role"], str) and isinstance(m["content"], str) for m in messages)):
            raise _Refused(400, f"messages must be a list of at most {MAX_MESSAGES} "
                                "{'role': str, 'content': str} maps")
        try:
            with self.batcher.tokenizer_lock:
                text = chat_prompt(self.tokenizer, messages)
        except BadRequest as exc:
            raise _Refused(400, exc.message) from None
        except Exception as exc:  # the template itself failed on these messages
            raise _Refused(400, f"chat template: {type(exc).__name__}: {exc}") from None
        assert conn.out is not None
        conn.out.send({"type": "chat", "id": ident, "text": text})

    _HANDLERS: dict[str, Callable[[Engine, _Conn, int, dict[str, Any]], None]] = {
        "stage": _stage, "load": _load, "unload": _unload, "gen": _gen, "cancel": _cancel, "chat": _chat}

    # --- the loop -------------------------------------------------------------------------

    def run(self, control: socket.socket) -> None:
        reader = frames.FrameReader(control)
        self.selector.register(control, selectors.EVENT_READ, None)
        while True:
            for key, _ in self.selector.select(timeout=0.5):
                if key.data is None:
                    frame, fds = reader.next()
                    if frame is None:
                        return
                    if frame.get("type") != "connect":
                        raise ProtocolError(f"the node sent {frame.get('type')!r}")
                    self.connect(frame, fds)
                    control.sendall(frames.pack({"type": "connected"}))
                elif not key.data.closed:
                    self.readable(key.data)
            with self._lock:
                closing, self._closing = self._closing, []
            for conn in closing:
                self.close_conn(conn, "it stopped reading its answers")


_FIELDS = {
    "stage": {"config", "weights"}, "load": set(), "unload": set(), "cancel": set(),
    "chat": {"messages"},
    "gen": {"prompt", "max_new_tokens", "temperature", "top_p", "seed", "stop", "ignore_eos", "stream"},
}


def _generation_options(frame: dict[str, Any]) -> dict[str, Any]:
    """A gen frame's options, checked (the sandbox's SDK checked them too, but the sandbox
    runs whatever code its function wants)."""
    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    prompt, tokens = frame.get("prompt"), frame.get("max_new_tokens")
    temperature, top_p = frame.get("temperature", 0.0), frame.get("top_p", 1.0)
    seed, stop = frame.get("seed"), frame.get("stop", [])
    if not isinstance(prompt, str):
        raise _Refused(400, "prompt must be a string")
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise _Refused(400, "max_new_tokens must be an integer >= 1")
    if not (number(temperature) and 0 <= temperature <= 100 and number(top_p) and 0 < top_p <= 1):
        raise _Refused(400, "temperature must be in [0, 100] and top_p in (0, 1]")
    if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 1 << 63):
        raise _Refused(400, "seed must be a non-negative 64-bit integer")
    if not (isinstance(stop, list) and len(stop) <= MAX_STOPS
            and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)):
        raise _Refused(400, f"stop must be at most {MAX_STOPS} strings of 1..{MAX_STOP_CHARS} characters")
    return {"max_new_tokens": tokens, "temperature": float(temperature), "top_p": float(top_p),
            "seed": seed, "stop": tuple(stop), "ignore_eos": bool(frame.get("ignore_eos", False))}


def kv_bytes_per_token(model: Any) -> int:
    """What one token of one row takes in the KV cache: keys and values of every layer."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * next(model.parameters()).element_size()


def kv_budget(requested: int | None, device: str) -> int:
    """The KV cache's budget in bytes: what the node asked for, else 1 GiB on a CPU and half
    of the device memory still free once the backbone is on a GPU."""
    if requested is not None:
        return int(requested)
    if device == "cpu":
        return DEFAULT_CPU_KV_BYTES
    import torch

    return int(torch.cuda.mem_get_info(torch.device(device))[0] // 2)


def serve(control: socket.socket) -> int:
    reader = frames.FrameReader(control)
    request, fds = reader.next()
    if request is None:
        return 0
    started = time.monotonic()
    try:
        from transformers import AutoTokenizer

        from runtime.models.hf import enter_model_process
        from runtime.batching.batcher import GenRequest
        from runtime.backbone.skeleton import bind_shared
        from runtime.backbone.weights import backend_for

        enter_model_process(request["isolation"], int(request["threads"]))
        # peft warns as it switches the active adapter when one is deleted: rows name theirs.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"peft\.")
        device = request["device"]
        tensors = backend_for(device).attach(request["manifest"], fds)
        model = bind_shared(request["model"], tensors, device)
        tokenizer = AutoTokenizer.from_pretrained(request["model"])
        engine = Engine(model, tokenizer, device, int(request["max_rows"]), kv_budget(request.get("kv_bytes"), device))
        # First-call costs (the tokenizer's, the kernels') before any function waits for them.
        engine.batcher.submit(GenRequest(engine.batcher.encode("hello"), 2)).result()
    except Exception as exc:
        log.error("engine_load_failed", model=request.get("model"), error=f"{type(exc).__name__}: {exc}",
                  exc_info=True)
        control.sendall(frames.pack({"type": "error", "error": f"{type(exc).__name__}: {exc}"}))
        return 1
    load_ms = (time.monotonic() - started) * 1000
    control.sendall(frames.pack({"type": "ready", "load_ms": load_ms}))
    log.info("engine_ready", model=request["model"], device=device, load_ms=round(load_ms, 1))
    engine.run(control)
    engine.batcher.close()
    return 0


if __name__ == "__main__":
    sys.exit(run_node_child("python -m runtime.engine.server", serve))
