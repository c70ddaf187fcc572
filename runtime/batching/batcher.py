"""Continuous batching: every generation submitted runs in one batch with one KV cache, in a
thread of its own. In a sandbox (the paper's path) the batch holds one function's requests;
in the generation engine (runtime/engine/) it holds every function's, each row with its
own LoRA adapter (`route`: runtime/engine/stacked.py).

Each turn of the loop admits waiting generations, earliest deadline first (a request's
deadline is its arrival plus its function's TTFT SLO in the engine, its arrival in a
sandbox), up to `max_batch` rows in all and each owner's share, within a prefill budget,
with one batched prefill; merges their cache into the running batch (left-padded, with an
attention mask and per-row positions); then, unless more admissible prompts wait for room
they have, decodes one token for every row. With `chunk_tokens`, a prompt longer than that
is prefilled one chunk per turn, between the decode steps of the running rows, so a long
prompt does not stop every other generation for the length of its prefill. With `kv_tokens`,
admission also keeps the KV cache within that many tokens (rows x width: a row reserves its
prompt plus its token limit); a prompt that cannot fit even alone is refused at once, and
while the cache is full, a request still waiting at its deadline is answered 503 with a
retry hint (when enough rows will have finished, at the measured decode speed).
A row leaves the batch when it reaches EOS,
its token limit or a stop string, or when it is cancelled; the others go on. In fp32,
greedy rows produce the tokens they would produce alone (padding is masked; PLATFORM.md:
bf16 can differ).

Longer than most modules: `Batcher` is one thread's state (the rows, their KV cache, the
prefills in progress), and every turn must keep the cache and its rows in step; split, that
invariant would live in several files.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import DynamicCache

from faas.errors import BadRequest, Cancelled, Overloaded
from faas.sdk import Generation

# (text delta, token ids since the last delta)
DeltaSink = Callable[[str, list[int]], None]


@dataclass(eq=False)
class GenRequest:
    """One generation: its tokenised prompt and how to decode it."""

    input_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    on_delta: DeltaSink | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    on_first: Callable[[], None] | None = None  # its prefill is done (first token chosen)
    adapter: str | None = None  # the engine's name of its LoRA adapter (None: the bare backbone)
    owner: str = ""  # whose share of the batch it takes (the engine: its function)
    deadline: float = field(default_factory=time.monotonic)  # admission order: earliest first
    future: Future[Generation] = field(default_factory=Future)
    first_token_at: float | None = None  # time.monotonic()
    prefill_batch: int = 0  # how many prompts its prefill ran with


def _need(request: GenRequest) -> int:
    """The KV cache tokens a generation may come to hold."""
    return len(request.input_ids) + request.max_new_tokens


class _Between:
    """Work for the batcher's thread between two turns."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self.future: Future[None] = Future()

    def run(self) -> None:
        try:
            self.fn()
        except Exception as exc:
            self.future.set_exception(exc)
        else:
            self.future.set_result(None)


@dataclass(eq=False)
class _Chunked:
    """A long prompt being prefilled a chunk per turn, into a cache of its own."""

    request: GenRequest
    cache: DynamicCache = field(default_factory=DynamicCache)
    done: int = 0  # prompt tokens prefilled so far


@dataclass(frozen=True)
class Prefill:
    """One batched prefill: how many prompts, their longest length, how long it took."""

    rows: int
    tokens: int
    seconds: float


class _Row:
    """A request in the running batch: what it generated and what it has streamed."""

    def __init__(self, request: GenRequest, device: str) -> None:
        self.request = request
        self.ids: list[int] = []
        self.streamed_chars = 0
        self.streamed_ids = 0
        self.text = ""
        self.finish: str | None = None
        self.generator: torch.Generator | None = None
        if request.temperature > 0:
            self.generator = torch.Generator(device=device)
            if request.seed is not None:
                self.generator.manual_seed(request.seed)
            else:
                self.generator.seed()


class Batcher:
    """Runs the generations of one model, batched, on a thread of its own; `submit` from
    any thread. `on_prefill` hears of every prefill (the node's batch window profiles it)."""

    def __init__(self, model: Any, tokenizer: Any, device: str, max_batch: int,
                 on_prefill: Callable[[Prefill], None] = lambda p: None,
                 max_prefill_tokens: int = 2048, prefill_budget_s: float | None = None,
                 route: Callable[[list[str | None]], dict[str, Any]] | None = None,
                 chunk_tokens: int | None = None, kv_tokens: int | None = None) -> None:
        self.model = model
        # A peft model with several adapters: before each forward, `route` hears each row's
        # adapter and gives the forward's extra arguments.
        self.route = route
        # The most rows an owner may hold at once (default: the whole batch), so that one
        # function's crowd cannot take every row from the others.
        self.shares: dict[str, int] = {}
        self.tokenizer = tokenizer
        self.device = device
        self.max_batch = max(1, max_batch)
        # One turn prefills at most this many prompt tokens (at least one prompt), and no
        # more than it prefills in `prefill_budget_s` at its measured speed: a crowd of
        # arrivals is prefilled in turns (where compute is the limit, as on a CPU, the first
        # ones then get their first token early instead of all waiting for one long prefill).
        self.max_prefill_tokens = max_prefill_tokens
        self.prefill_budget_s = prefill_budget_s
        self.tokens_per_s: float | None = None
        self._pending: list[GenRequest] = []  # taken from the queue, not yet admitted
        self.chunk_tokens = chunk_tokens
        self._chunked: list[_Chunked] = []  # admitted long prompts, prefilled a chunk per turn
        self._admissible = False  # some of them would be admitted now but for the token budget
        self._kv_full = False  # the first of them waits for rows to leave the KV cache
        self.kv_tokens = kv_tokens
        self.decode_s: float | None = None  # one decode step (moving average): retry hints
        self.on_prefill = on_prefill
        self.eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else (self.eos if self.eos is not None else 0)
        # The fast tokenizer is not thread-safe (concurrent calls fail "Already borrowed"):
        # handler threads encode and this thread decodes under one lock.
        self.tokenizer_lock = threading.Lock()
        self._queue: queue.SimpleQueue[GenRequest | _Between | None] = queue.SimpleQueue()
        self._closing = False
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, cached length]: 0 on left padding
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._thread.start()

    def submit(self, request: GenRequest) -> Future[Generation]:
        if self.kv_tokens is not None and _need(request) > self.kv_tokens:
            request.future.set_exception(BadRequest(
                f"prompt ({len(request.input_ids)} tokens) + max_new_tokens ({request.max_new_tokens}) "
                f"is more than the {self.kv_tokens} tokens this engine's KV cache holds"))
        else:
            self._queue.put(request)
        return request.future

    def between_turns(self, fn: Callable[[], None]) -> Future[None]:
        """Run `fn` on the batcher's thread before its next turn (what changes the model,
        such as adding an adapter, must not run during a forward)."""
        task = _Between(fn)
        self._queue.put(task)
        return task.future

    def encode(self, text: str) -> list[int]:
        with self.tokenizer_lock:
            return list(self.tokenizer(text)["input_ids"])

    def close(self) -> None:
        self._closing = True  # seen even when a full batch does not read the queue
        self._queue.put(None)
        self._thread.join()

    @property
    def active(self) -> int:
        return len(self._rows)

    # --- the loop ---------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._closing:
                new = self._take(block=not self._rows and not self._pending and not self._chunked)
                if new is None:
                    break
                try:
                    if new:
                        self._prefill(new)
                    if self._chunked:
                        self._prefill_chunk()
                    # Prefills first (time to first token is what the SLO is about): the
                    # rows already decoding wait while prompts that fit the batch wait.
                    waiting = self._admissible or (not self._kv_full and not self._queue.empty())
                    if self._rows and not (waiting and len(self._rows) < self.max_batch):
                        self._decode()
                except Exception as exc:  # e.g. out of memory: fail this batch, keep serving
                    for request in [*(row.request for row in self._rows), *new,
                                    *(job.request for job in self._chunked)]:
                        if not request.future.done():
                            request.future.set_exception(exc)
                    self._rows, self._cache, self._mask, self._chunked = [], None, None, []
        while True:  # whatever is still queued
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(request, _Between):
                request.future.set_exception(RuntimeError("the batcher closed"))
            elif request is not None:
                self._fail_later(request)
        for request in [*(row.request for row in self._rows), *self._pending,
                        *(job.request for job in self._chunked)]:
            self._fail_later(request)

    @staticmethod
    def _fail_later(request: GenRequest) -> None:
        if not request.future.done():
            request.future.set_exception(Cancelled("the model is shutting down"))

    def _take(self, block: bool) -> list[GenRequest] | None:
        """The waiting requests to prefill this turn: earliest deadline first, while they
        fit the batch, their owner's share and one prefill's token budget (None: close)."""
        if not self._receive(block):
            return None
        room = self.max_batch - len(self._rows) - len(self._chunked)
        running = [*(row.request for row in self._rows), *(job.request for job in self._chunked)]
        held = collections.Counter(r.owner for r in running)
        needs = [_need(r) for r in running]  # KV tokens each admitted row may come to hold
        taken: list[GenRequest] = []
        tokens = 0
        self._admissible = False
        self._kv_full = False
        blocked: GenRequest | None = None
        self._pending.sort(key=lambda r: r.deadline)
        for request in list(self._pending):
            if request.cancelled.is_set():
                self._pending.remove(request)
                request.future.set_exception(Cancelled("cancelled before it started"))
                continue
            if len(taken) >= room:
                self._admissible = True
                break
            if held[request.owner] >= self.shares.get(request.owner, self.max_batch):
                continue  # its owner's rows are all in use: the next owner's request goes first
            if not self._kv_fits([*needs, _need(request)]):
                blocked = request  # it waits for rows to leave; nobody overtakes it meanwhile
                break
            needs.append(_need(request))
            if self.chunk_tokens is not None and len(request.input_ids) > self.chunk_tokens:
                self._pending.remove(request)
                self._chunked.append(_Chunked(request))
                held[request.owner] += 1
                room -= 1
                continue
            if taken and tokens + len(request.input_ids) > self._prefill_tokens():
                self._admissible = True
                break
            self._pending.remove(request)
            taken.append(request)
            held[request.owner] += 1
            tokens += len(request.input_ids)
        if blocked is not None:
            self._kv_full = True
            self._refuse_late(blocked, taken)
        return taken

    def _kv_fits(self, needs: list[int]) -> bool:
        """Whether rows that may come to hold `needs` tokens each fit the KV budget (the
        cache is as wide as its longest row for every row: left padding)."""
        return self.kv_tokens is None or len(needs) * max(needs) <= self.kv_tokens

    def _refuse_late(self, blocked: GenRequest, taken: list[GenRequest]) -> None:
        """The KV cache is full: a request from `blocked` on (those before it wait for their
        owner's share, not for the cache) still waiting at its deadline gets a 503 and when to
        retry, rather than a first token ever later."""
        now = time.monotonic()
        behind = self._pending[self._pending.index(blocked):]
        for request in [r for r in behind if r.deadline < now or r.cancelled.is_set()]:
            self._pending.remove(request)
            if request.cancelled.is_set():
                request.future.set_exception(Cancelled("cancelled before it started"))
                continue
            request.future.set_exception(Overloaded(
                "the engine's KV cache is full: no room for this generation within its TTFT SLO",
                retry_after_s=self._kv_wait_s(_need(request), taken)))

    def _kv_wait_s(self, need: int, taken: list[GenRequest]) -> float:
        """Seconds until enough rows have finished for one of `need` tokens (each row at its
        token limit, at the measured decode speed); the node holds what reaches a caller to a
        minute at most, where the hint enters it from the sandbox."""
        step = self.decode_s if self.decode_s is not None else 0.05
        left = sorted([*((row.request, row.request.max_new_tokens - len(row.ids)) for row in self._rows),
                       *((request, request.max_new_tokens) for request in taken)], key=lambda x: x[1])
        staying = [_need(request) for request, _ in left] + [_need(job.request) for job in self._chunked]
        for request, tokens in left:
            staying.remove(_need(request))
            if self._kv_fits([*staying, need]):
                return max(0.1, tokens * step)
        return max(0.1, max((tokens for _, tokens in left), default=1) * step)

    def _receive(self, block: bool) -> bool:
        """Move what was submitted to the waiting list; False when closing."""
        while True:
            try:
                # Woken from idle: requests handed over together (a window's) arrive a
                # moment apart, through their handler threads; 2 ms lets them share.
                request = self._queue.get(block=block, timeout=0.002 if block and self._pending else None)
            except queue.Empty:
                return True
            if request is None:
                for early in self._pending:
                    self._fail_later(early)
                self._pending = []
                return False
            if isinstance(request, _Between):
                request.run()
                continue
            self._pending.append(request)

    def _prefill_tokens(self) -> float:
        if self.prefill_budget_s is None or self.tokens_per_s is None:
            return self.max_prefill_tokens
        return min(self.max_prefill_tokens, self.tokens_per_s * self.prefill_budget_s)

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache,
                 requests: list[GenRequest]) -> torch.Tensor:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        extra: dict[str, Any] = {}
        if self.route is not None and hasattr(self.model, "peft_config"):
            extra = self.route([r.adapter for r in requests])
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                         past_key_values=cache, use_cache=True, logits_to_keep=1, **extra)
        return out.logits[:, -1, :].float()

    def _prefill(self, requests: list[GenRequest]) -> None:
        started = time.monotonic()
        width = max(len(r.input_ids) for r in requests)
        ids = torch.full((len(requests), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, request in enumerate(requests):
            ids[i, width - len(request.input_ids):] = torch.tensor(request.input_ids)
            mask[i, width - len(request.input_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = DynamicCache()
        logits = self._forward(ids, mask, cache, requests)
        self._measured(ids.numel(), started)
        self.on_prefill(Prefill(len(requests), width, time.monotonic() - started))
        self._join(requests, cache, mask, logits)

    def _prefill_chunk(self) -> None:
        """The next chunk of the earliest-deadline long prompt; once it is all in, the
        request joins the batch with its first token."""
        job = min(self._chunked, key=lambda j: j.request.deadline)
        request = job.request
        if request.cancelled.is_set():
            self._chunked.remove(job)
            request.future.set_exception(Cancelled("the generation was cancelled"))
            return
        assert self.chunk_tokens is not None
        started = time.monotonic()
        end = min(len(request.input_ids), job.done + self.chunk_tokens)
        ids = torch.tensor([request.input_ids[job.done:end]], device=self.device)
        mask = torch.ones((1, end), dtype=torch.long, device=self.device)
        logits = self._forward(ids, mask, job.cache, [request])
        self._measured(ids.numel(), started)
        job.done = end
        if end == len(request.input_ids):
            self._chunked.remove(job)
            self.on_prefill(Prefill(1, end, time.monotonic() - started))
            self._join([request], job.cache, mask, logits)

    def _measured(self, tokens: int, started: float) -> None:
        if tokens >= 32:  # shorter ones measure overheads, not speed
            speed = tokens / max(time.monotonic() - started, 1e-6)
            self.tokens_per_s = speed if self.tokens_per_s is None else (
                self.tokens_per_s + 0.3 * (speed - self.tokens_per_s))

    def _join(self, requests: list[GenRequest], cache: DynamicCache, mask: torch.Tensor,
              logits: torch.Tensor) -> None:
        """Prefilled requests: their first token is chosen, and they join the running batch."""
        rows = [_Row(r, self.device) for r in requests]
        now = time.monotonic()
        for request in requests:
            request.first_token_at = now
            request.prefill_batch = len(requests)
            if request.on_first is not None:
                request.on_first()
        self._merge(rows, cache, mask)
        self._advance(rows, logits)

    def _decode(self) -> None:
        assert self._cache is not None and self._mask is not None
        started = time.monotonic()
        last = torch.tensor([[row.ids[-1]] for row in self._rows], device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self._rows), 1))], dim=1)
        logits = self._forward(last, self._mask, self._cache, [row.request for row in self._rows])
        self._advance(self._rows, logits)
        took = time.monotonic() - started
        self.decode_s = took if self.decode_s is None else self.decode_s + 0.3 * (took - self.decode_s)

    # --- the running batch --------------------------------------------------------------

    def _merge(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Add freshly prefilled rows to the running batch, left-padding the shorter side."""
        if self._cache is None or self._mask is None:
            self._rows, self._cache, self._mask = list(rows), cache, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        layers = [(torch.cat([pad(old.keys, -2), pad(new.keys, -2)]),
                   torch.cat([pad(old.values, -2), pad(new.values, -2)]))
                  for old, new in zip(self._cache.layers, cache.layers)]
        self._cache = DynamicCache(layers)
        self._mask = torch.cat([pad(self._mask, 1), pad(mask, 1)])
        self._rows += rows

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Choose each row's next token, stream it, and retire the rows that are done."""
        greedy = logits.argmax(-1).tolist()
        for i, row in enumerate(rows):
            token = greedy[i] if row.generator is None else self._sample(row, logits[i])
            row.ids.append(token)
            self._update(row)
        done = [i for i, row in enumerate(self._rows) if row.finish is not None
                or row.request.cancelled.is_set()]
        if done:
            self._retire(done)

    def _sample(self, row: _Row, logits: torch.Tensor) -> int:
        request = row.request
        probs = torch.softmax(logits / request.temperature, dim=-1)
        if request.top_p < 1.0:
            ordered, order = probs.sort(descending=True)
            # Keep the smallest head whose mass reaches top_p (the first token always).
            outside = ordered.cumsum(-1) - ordered >= request.top_p
            ordered[outside] = 0
            probs = torch.zeros_like(probs).scatter_(-1, order, ordered)
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def _update(self, row: _Row) -> None:
        request = row.request
        with self.tokenizer_lock:
            row.text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
        if self.eos is not None and row.ids[-1] == self.eos and not request.ignore_eos:
            row.finish = "stop"
        elif len(row.ids) >= request.max_new_tokens:
            row.finish = "length"
        cut = min((i for i in (row.text.find(s) for s in request.stop) if i >= 0), default=-1)
        if cut >= 0:
            row.text, row.finish = row.text[:cut], "stop"
        if request.on_delta is not None:
            self._stream(row)

    def _stream(self, row: _Row) -> None:
        """Send what is certain: not a character that may still be the start of a stop
        string, nor half of a multi-byte one."""
        end = len(row.text)
        if row.finish is None:
            end -= max((len(s) for s in row.request.stop), default=1) - 1
            # Bytes of a character still to come decode as one U+FFFD each; a trailing space
            # may still be cleaned up by the next token.
            end = min(end, len(row.text.rstrip("\ufffd").rstrip()))
        if end > row.streamed_chars or (row.finish is not None and len(row.ids) > row.streamed_ids):
            delta = row.text[row.streamed_chars:max(end, row.streamed_chars)]
            ids = row.ids[row.streamed_ids:]
            row.streamed_chars += len(delta)
            row.streamed_ids = len(row.ids)
            assert row.request.on_delta is not None
            row.request.on_delta(delta, ids)

    def _retire(self, done: list[int]) -> None:
        assert self._cache is not None and self._mask is not None
        leaving = [self._rows[i] for i in done]
        keep = [i for i in range(len(self._rows)) if i not in set(done)]
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
        else:
            mask = self._mask[keep]
            # Columns that are padding in every remaining row are dropped with them.
            start = int((mask.sum(0) > 0).nonzero()[0])
            index = torch.tensor(keep, device=self.device)
            self._cache = DynamicCache([(layer.keys.index_select(0, index)[:, :, start:],
                                         layer.values.index_select(0, index)[:, :, start:])
                                        for layer in self._cache.layers])
            self._mask = mask[:, start:]
            self._rows = [self._rows[i] for i in keep]
        for row in leaving:  # once out of the batch: whoever hears of it sees it gone
            request = row.request
            if row.finish is None:
                request.future.set_exception(Cancelled("the generation was cancelled"))
            else:
                request.future.set_result(Generation(
                    text=row.text, token_ids=row.ids, prompt_tokens=len(request.input_ids),
                    finish_reason=row.finish))
