"""The one path every invocation takes, whatever brought it (a caller's request, a peer's
forward, a JetStream event): admit -> record -> window -> lease -> serve -> answer.

What differs between entry points is only where the outcome goes (an `Answer`: a caller's
reply subject, or an event's ack, retry or dead letter). What every invocation must pass
through (the invocation history the pre-loader predicts from, the statistics behind
`faas top`, `$SRV.STATS` and Prometheus) are `Hook`s on this path, dramatiq's middleware,
so no entry point can skip one.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from faas import protocol
from faas.errors import DeadlineExceeded, FaasError, HandlerError
from faas.protocol import Metrics
from faas.record import FunctionRecord
from runtime.pool.leases import FunctionPool
from runtime.preload.history import History


def ttft_ms(first_token_at: float | None, received: float) -> float | None:
    """Milliseconds from receipt to the first token, from the sandbox's clock reading (held
    within the request's span: the sandbox may lie)."""
    if first_token_at is None:
        return None
    first = min(max(first_token_at, received), time.monotonic())
    return round((first - received) * 1000, 3)


def deadline_of(spec: FunctionRecord, received: float, request: protocol.RequestHeaders | None = None) -> float:
    """When an invocation that arrived at `received` (time.monotonic()) must end: its
    function's `timeout_s` later, or sooner where its caller asks (`Faas-Timeout-Ms`,
    `Faas-Deadline-Ms` in Unix time; the function's own limit wins, so a caller cannot pin a
    sandbox longer). DeadlineExceeded when the caller's deadline has passed already."""
    budget = spec.timeout_s
    if request is not None and request.timeout_ms is not None:
        budget = min(budget, request.timeout_ms / 1000)
    if request is not None and request.deadline_ms is not None:
        left = request.deadline_ms / 1000 - time.time()
        if left <= 0:
            raise DeadlineExceeded(f"the request's deadline passed {-left:.3f}s before it arrived")
        budget = min(budget, left)
    return received + budget


class Hook:
    """Sees every invocation of a function this node serves. Each method does nothing
    unless overridden. A hook never refuses an invocation: what one raises is logged and the
    invocation goes on."""

    async def admitting(self, function: str) -> None:
        """An invocation of `function` asks to be admitted (demand, even when refused)."""

    def answered(self, function: str, metrics: Metrics) -> None:
        """An invocation of `function` got its output."""

    def failed(self, function: str, err: FaasError) -> None:
        """An invocation of `function` ended with `err` (refused, or failed running)."""


class Arrivals(Hook):
    """Records every admission in the invocation history the pre-loader predicts from."""

    def __init__(self, history: History) -> None:
        self.history = history

    async def admitting(self, function: str) -> None:
        await self.history.record(function)


class Answer(Protocol):
    """Where an invocation's outcome goes."""

    stream: bool  # whether chunks go out as they come

    async def chunk(self, chunk: dict[str, Any]) -> None:
        """One streamed chunk (only when `stream`)."""

    async def output(self, output: Any, metrics: Metrics) -> None:
        """The handler's output; a FaasError when it cannot be delivered (it then gets the
        error instead)."""

    async def error(self, err: FaasError, ran: bool) -> None:
        """The invocation failed; `ran`: it was admitted (its handler may have run)."""

    async def shutdown(self) -> FaasError | None:
        """The node is shutting down before the invocation got its outcome: the error it was
        answered with, if any (an event is left for JetStream to deliver again)."""


@dataclass(frozen=True)
class Call:
    """One admitted invocation: its id (unique among what the node holds), its event, when
    it arrived and by when it must end (time.monotonic()), what cancels it, and where an
    event came from (for the handler's context)."""

    request_id: str
    event: dict[str, Any]
    received: float
    deadline: float
    cancel: asyncio.Event | None = None
    event_info: dict[str, Any] | None = None


class Invocations:
    """The node's invocation path over its pools, with its hooks."""

    def __init__(self, pools: dict[str, FunctionPool], hooks: Sequence[Hook], node_id: str) -> None:
        self.pools = pools
        self.hooks = tuple(hooks)
        self.node_id = node_id

    async def refuse(self, function: str, err: FaasError, answer: Answer, log: Any) -> None:
        """An invocation that ends with `err` without being served here: refused before
        admission (its headers, its body, its function), or forwarded to a peer that
        failed it."""
        await self._fail(function, err, answer, False, log)

    async def admit(self, pool: FunctionPool, answer: Answer, log: Any) -> bool:
        """Record the demand, then take the invocation into `pool`'s queue; False (and the
        refusal answered) when the pool refuses it (full, shutting down)."""
        await self._notify(log, "admitting", pool.name)
        try:
            pool.admit()
        except FaasError as err:
            await self._fail(pool.name, err, answer, False, log)
            return False
        return True

    async def serve(self, pool: FunctionPool, call: Call, answer: Answer, log: Any) -> None:
        """Serve an admitted invocation in `pool` (its batch window, a leased sandbox, the
        handler) and answer it, exactly once."""
        try:
            served = await pool.serve(call.request_id, call.event, call.deadline, received=call.received,
                                      stream=answer.stream, on_chunk=answer.chunk if answer.stream else None,
                                      cancel=call.cancel, event_info=call.event_info)
        except FaasError as err:
            await self._fail(pool.name, err, answer, True, log)
            return
        except asyncio.CancelledError:
            told = await answer.shutdown()
            if told is not None:
                await self._count(pool.name, told, log)
            raise
        except Exception:
            log.exception("serve_failed")
            await self._fail(pool.name, HandlerError("internal error in the node"), answer, True, log)
            return
        result = served.result
        metrics = Metrics(request_id=call.request_id, node=self.node_id,
                          queue_ms=round((served.leased_at - call.received) * 1000, 3),
                          ttft_ms=ttft_ms(result.first_token_at, call.received),
                          tokens_in=result.tokens_in, tokens_out=result.tokens_out,
                          level=served.level.label, batch=result.batch)
        metrics.total_ms = round((time.monotonic() - call.received) * 1000, 3)
        try:
            await answer.output(result.output, metrics)
        except FaasError as err:
            await self._fail(pool.name, err, answer, True, log)
            return
        await self._notify(log, "answered", pool.name, metrics)
        log.info("invoked", found=served.level.label, queue_ms=metrics.queue_ms, ttft_ms=metrics.ttft_ms,
                 total_ms=metrics.total_ms, batch=result.batch)

    async def _fail(self, function: str, err: FaasError, answer: Answer, ran: bool, log: Any) -> None:
        await self._count(function, err, log)
        await answer.error(err, ran)

    async def _count(self, function: str, err: FaasError, log: Any) -> None:
        log.warning("invoke_failed", code=err.code, error=err.message)
        if function in self.pools:  # not for names nobody serves: no unbounded table
            await self._notify(log, "failed", function, err)

    async def _notify(self, log: Any, event: str, *args: Any) -> None:
        """Tell every hook of `event`; one that raises is logged, and the invocation goes on."""
        for hook in self.hooks:
            try:
                told = getattr(hook, event)(*args)
                if inspect.isawaitable(told):
                    await told
            except Exception:
                log.exception("hook_failed", hook=type(hook).__name__, hook_event=event)

