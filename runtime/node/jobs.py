"""Async jobs on the node (faas/jobs.py says what a producer sees): taking submits, answering
results, running queued jobs.

- submit (`faas.jobs.submit.<fn>`, one queue group of every node): headers and body are
  checked as an invocation's, the function must be known here (served here or by a live
  peer, or deployed), then the job is recorded `queued` in `faas_jobs` and queued in
  FAAS_JOBS, and the producer is answered at once. The same id submitted again is answered
  as the first submit was, and queues nothing more (a job still queued is queued again under
  its message id, which JetStream keeps once: a retry after a lost answer heals).
- result (`faas.jobs.result`): the job's state, and its outcome once done, for whoever sends
  the job's id (its request id, what logs show, reads nothing).
- cancel (`faas.jobs.cancel`, the job's id too): a job not done is recorded done with a 499
  outcome, and every node is told (`faas.jobs.cancelled`): the one running it cancels its
  invocation, as a caller's cancel does; a node taking it later acks it unrun. The record is
  only ever written over while it is not done (compare-and-set), so the first outcome stays:
  a cancel's, or a run's that finished first.
- running: every node fetches from one durable consumer of FAAS_JOBS (a work queue: a job
  goes once acked), at most `concurrency` jobs at a time, and invokes each through
  `faas.invoke.<fn>` as any caller does (so it is forwarded to a warm node, retried when the
  node serving it dies, batched and counted like a request), keeping it with in-progress
  acks while it runs. The outcome goes into the record, then the ack: a node that dies
  holding a job does not ack, and JetStream hands the job to a node after the ack wait (at
  least once). A job refused for want of room (503) is tried again later, backing off; after
  `max_attempts` takes its outcome is the last error.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable

import msgpack
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.errors import MaxPayloadError
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy
from nats.js.errors import BadRequestError, KeyNotFoundError, KeyWrongLastSequenceError

from faas import jobs, protocol
from faas.client import Client
from faas.errors import BadRequest, Cancelled, FaasError, FunctionNotFound, Overloaded, PayloadTooLarge
from faas.jobs import JobRecord
from faas.logs import get_logger
from faas.protocol import Encoding
from faas.streams import ensure_stream, key_value
from runtime.node.pull import ack, fetch, keep_alive, nak
from runtime.node.replies import answer


@dataclass(frozen=True)
class JobsConfig:
    """How a node takes and runs jobs. `retention_s`: how long a job may wait to run and its
    outcome is kept (set when the bucket and stream are first made); `budget_s`: a job's
    budget when its submit names none (its function's `timeout_s` caps it)."""

    enabled: bool = True
    retention_s: float = 86400.0
    concurrency: int = 16
    ack_wait_s: float = 30.0
    max_attempts: int = 10
    budget_s: float = 3600.0


# How long JetStream remembers a queued job's message id: a submit retried within it queues
# the job once.
DUPLICATE_WINDOW_S = 120.0
# Pauses between tries to keep a job's outcome (the bucket unreachable for a moment).
_SAVE_PAUSES_S = (0.0, 1.0, 2.0, 4.0)
# Compare-and-set tries of a record written by others meanwhile (a cancel, a run).
_SWAP_TRIES = 5
# An answer to a producer: its body and headers.
_Reply = tuple[bytes, dict[str, str]]


def retry_delay_s(attempt: int) -> float:
    """How long a job refused for want of room waits before its next try: doubling, capped."""
    return min(60.0, 2.0 ** (attempt - 1))


def _error(err: FaasError) -> dict[str, Any]:
    return {"error": {"code": err.code, "message": err.message[:protocol.MAX_ERROR_MESSAGE]}}


class Jobs:
    """The node's part of async jobs. `knows(fn)`: whether a submit for `fn` is taken."""

    def __init__(self, nc: NATS, node_id: str, knows: Callable[[str], bool], config: JobsConfig) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.node_id = node_id
        self.knows = knows
        self.config = config
        self.client = Client.over(nc)
        self._kv: Any = None
        self._subs: list[Subscription] = []
        self._loop: asyncio.Task[None] | None = None
        self._psub: Any = None
        self._running: dict[str, asyncio.Task[None]] = {}
        self._invoking: dict[str, asyncio.Future[Any]] = {}  # a running job's invocation
        self._freed = asyncio.Event()
        self.retention_s = config.retention_s
        self.ack_wait_s = config.ack_wait_s
        self.log = get_logger(component="jobs")

    async def start(self) -> None:
        """Make the stream and the bucket if they are missing, take submits and results, and
        run queued jobs."""
        if not self.config.enabled:
            return
        try:
            # The bucket's TTL, set by the node that made it, is the retention of all: a queue
            # keeping jobs longer or shorter than their records would run jobs no one can read,
            # or drop jobs whose records say queued.
            self._kv = await key_value(self.js, "job_results", protocol.JOBS_BUCKET, history=1,
                                       ttl=self.config.retention_s)
            self.retention_s = (await self._kv.status()).ttl or self.config.retention_s
            if self.retention_s != self.config.retention_s:
                self.log.warning("jobs_retention_kept", retention_s=self.retention_s,
                                 asked_s=self.config.retention_s, why="the jobs' bucket was made with it")
            await ensure_stream(self.js, "jobs", protocol.JOBS_STREAM, [protocol.JOBS_QUEUE_PREFIX + ">"],
                                max_age=self.retention_s, retention=RetentionPolicy.WORK_QUEUE,
                                duplicate_window=min(DUPLICATE_WINDOW_S, self.retention_s))
            consumer = ConsumerConfig(durable_name=protocol.JOBS_CONSUMER, ack_policy=AckPolicy.EXPLICIT,
                                      ack_wait=self.config.ack_wait_s,
                                      max_ack_pending=max(1024, self.config.concurrency * 8))
            try:
                await self.js.add_consumer(protocol.JOBS_STREAM, consumer)
            except BadRequestError as exc:  # made by a node with other settings: it is shared
                self.log.warning("jobs_consumer_kept", error=str(exc))
            # The consumer is shared and the last node's settings win: jobs are renewed by the
            # ack wait it has, not this node's.
            info = await self.js.consumer_info(protocol.JOBS_STREAM, protocol.JOBS_CONSUMER)
            self.ack_wait_s = info.config.ack_wait or self.config.ack_wait_s
            psub = await self.js.pull_subscribe_bind(durable=protocol.JOBS_CONSUMER, stream=protocol.JOBS_STREAM)
        except (NatsError, TimeoutError) as exc:
            self.log.warning("jobs_unavailable", error=f"{type(exc).__name__}: {exc}",
                             hint="async jobs need a NATS server with JetStream")
            return
        self._subs = [
            await self.nc.subscribe(protocol.JOBS_SUBMIT_WILDCARD, queue=protocol.NODE_QUEUE_GROUP,
                                    cb=self._on_submit),
            await self.nc.subscribe(protocol.JOBS_RESULT_SUBJECT, queue=protocol.NODE_QUEUE_GROUP,
                                    cb=self._on_result),
            await self.nc.subscribe(protocol.JOBS_CANCEL_SUBJECT, queue=protocol.NODE_QUEUE_GROUP,
                                    cb=self._on_cancel),
            await self.nc.subscribe(protocol.JOBS_CANCELLED_SUBJECT, cb=self._on_cancelled)]
        self._psub = psub
        self._loop = asyncio.create_task(self._fetch(psub), name="jobs")
        self._loop.add_done_callback(lambda task: self._log_failure(task, "jobs_loop_failed"))

    def _log_failure(self, task: asyncio.Task[None], event: str, **fields: Any) -> None:
        """What a task of this part ended with, when it raised (nobody awaits it)."""
        if not task.cancelled() and task.exception() is not None:
            self.log.error(event, error=repr(task.exception()), **fields)

    # --- submits and results ----------------------------------------------------------

    async def _on_submit(self, msg: Msg) -> None:
        function = protocol.function_from_subject(msg.subject)
        log = self.log.bind(fn=function[:64])
        encoding = protocol.request_encoding(msg.data, msg.headers)
        request_id = protocol.new_request_id()  # until the job's own is known
        try:
            request = protocol.parse_request_headers(msg.headers)
            if request.key is None:
                raise BadRequest(f"a job's id goes in {protocol.HDR_REQUEST_KEY}: 16-128 printable "
                                 "characters, a secret of the producer's")
            request_id = jobs.request_id_of(request.key)
            log = log.bind(job=request_id)
            if not self.knows(function):
                raise FunctionNotFound(f"no function named {function[:64]!r}")
            event = protocol.decode_event(msg.data, encoding)
            budget_ms = min(request.timeout_ms or self.config.budget_s * 1000, self.config.budget_s * 1000)
            state = await self._submit(function, request_id, event, budget_ms, log)
        except FaasError as err:
            log.warning("job_refused", code=err.code, error=err.message)
            await answer(self.nc, msg.reply, *protocol.error_reply(err, encoding, request_id), log)
            return
        body = protocol.encode({"request_id": request_id, "function": function, "state": state}, encoding)
        await answer(self.nc, msg.reply, body, {**protocol.reply_headers(encoding, request_id),
                                                protocol.HDR_JOB_STATE: state}, log)

    async def _submit(self, function: str, request_id: str, event: dict[str, Any], budget_ms: float,
                      log: Any) -> str:
        """Record and queue a job; its state (an id submitted before: as recorded then)."""
        revision: int | None = None  # of a record this submit made
        try:
            revision = await self._kv.create(request_id, jobs.queued(function).pack())
        except KeyWrongLastSequenceError:  # the same id again (a producer's retry)
            record = await self._record(request_id)
            if record is None or record.function != function:
                raise BadRequest("this job id was used for another job: make a new one") from None
            if record.state != "queued" or record.attempts or time.time() - record.submitted >= DUPLICATE_WINDOW_S:
                return record.state
            # Its queueing may not have been confirmed (the submit this retries timed out):
            # queued again under the same message id, which JetStream keeps once while it
            # remembers the id (a job taken since, or older, is not queued again).
        except NatsError as exc:
            raise Overloaded(f"the job could not be recorded: {type(exc).__name__}: {exc}") from None
        headers = {protocol.HDR_MSG_ID: request_id, protocol.HDR_REQUEST_ID: request_id,
                   protocol.HDR_TIMEOUT_MS: str(int(budget_ms))}
        try:
            await self.js.publish(protocol.JOBS_QUEUE_PREFIX + function, msgpack.packb(event, use_bin_type=True),
                                  headers=headers)
        except (NatsError, TimeoutError) as exc:
            if isinstance(exc, TimeoutError):  # it may be queued all the same: its record stays
                raise Overloaded("the job's queueing was not confirmed in time: submit it again with "
                                 "its id (it is queued once)") from None
            if revision is not None:  # unless it was taken or cancelled since (it was queued after all)
                try:
                    await self._kv.delete(request_id, last=revision)
                except NatsError:
                    pass
            if isinstance(exc, MaxPayloadError):
                raise PayloadTooLarge("the event does not fit a queued job beside its headers") from None
            raise Overloaded(f"the job could not be queued: {type(exc).__name__}: {exc}") from None
        log.info("job_queued")
        return "queued"

    async def _on_result(self, msg: Msg) -> None:
        await self._by_job_id(msg, self._result)

    async def _on_cancel(self, msg: Msg) -> None:
        await self._by_job_id(msg, self._cancel_answer)

    async def _by_job_id(self, msg: Msg, handle: Callable[[str, Encoding], Awaitable[_Reply]]) -> None:
        """Answer a producer's request about a job, named by its id in `Faas-Request-Key`:
        `handle(request_id, encoding)`'s reply, or the error it raised."""
        encoding = protocol.request_encoding(b"", msg.headers)
        request_id = protocol.new_request_id()
        try:
            request = protocol.parse_request_headers(msg.headers)
            if request.key is None:
                raise BadRequest(f"send the job's id in {protocol.HDR_REQUEST_KEY}")
            request_id = jobs.request_id_of(request.key)
            body, headers = await handle(request_id, encoding)
        except FaasError as err:
            body, headers = protocol.error_reply(err, encoding, request_id)
        await answer(self.nc, msg.reply, body, headers, self.log)

    async def _result(self, request_id: str, encoding: Encoding) -> _Reply:
        if (record := await self._record(request_id)) is None:
            raise self._no_such_job()
        headers = {**protocol.reply_headers(encoding, request_id), protocol.HDR_JOB_STATE: record.state}
        if record.state != "done":
            return protocol.encode({"state": record.state, "function": record.function,
                                    "submitted": record.submitted}, encoding), headers
        if (stored := record.error()) is not None:
            body, headers = protocol.error_reply(stored, encoding, request_id)
            return body, {**headers, protocol.HDR_JOB_STATE: "done"}
        try:
            return protocol.encode({"output": record.outcome["output"],
                                    "metrics": record.outcome.get("metrics", {})}, encoding), headers
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"the job's output cannot be sent as {encoding.value}: {exc}") from None

    async def _cancel_answer(self, request_id: str, encoding: Encoding) -> _Reply:
        cancelled = await self._cancel(request_id, self.log.bind(job=request_id))
        return (protocol.encode({"request_id": request_id, "state": "done", "cancelled": cancelled}, encoding),
                {**protocol.reply_headers(encoding, request_id), protocol.HDR_JOB_STATE: "done"})

    def _no_such_job(self) -> FunctionNotFound:
        return FunctionNotFound("no such job: never submitted, or its result expired "
                                f"(results are kept {self.retention_s:g}s)")

    async def _cancel(self, request_id: str, log: Any) -> bool:
        """Record the job done with a 499 and tell the nodes; False when it was done first
        (by a run: its outcome stays)."""
        for _ in range(_SWAP_TRIES):
            entry = await self._entry(request_id)
            record = self._unpack(request_id, entry)
            if record is None:
                raise self._no_such_job()
            if record.state == "done":
                # Cancelled before (told again: that cancel's answer, or its word to the
                # nodes, may be what was lost), or finished first.
                cancelled = (record.outcome or {}).get("cancelled") is True
                if cancelled:
                    await self._tell_cancelled(request_id, log)
                return cancelled
            # Marked: a run can end in a 499 of its own (its node shutting down).
            outcome = {**_error(Cancelled("the job was cancelled")), "cancelled": True}
            try:
                await self._kv.update(request_id, replace(record, state="done", outcome=outcome).pack(),
                                      last=entry.revision)
            except KeyWrongLastSequenceError:  # taken, or finished, meanwhile: look again
                continue
            except (NatsError, TimeoutError) as exc:
                raise Overloaded(f"the job's record could not be written: {type(exc).__name__}: {exc}") from None
            log.info("job_cancelled", was=record.state, node=record.node)
            await self._tell_cancelled(request_id, log)
            return True
        raise Overloaded("the job's record kept changing: cancel it again")

    async def _tell_cancelled(self, request_id: str, log: Any) -> None:
        """Tell the nodes at once; one that misses it finds the record done at its next
        in-progress ack (a third of the ack wait), and an outcome never goes over it."""
        try:
            await self.nc.publish(protocol.JOBS_CANCELLED_SUBJECT, b"",
                                  headers={protocol.HDR_REQUEST_ID: request_id})
        except NatsError as exc:
            log.warning("job_cancel_not_told", error=f"{type(exc).__name__}: {exc}")

    async def _on_cancelled(self, msg: Msg) -> None:
        await self._stop_if_done((msg.headers or {}).get(protocol.HDR_REQUEST_ID, ""))

    async def _stop_if_done(self, request_id: str) -> None:
        """Cancel the job's invocation running here when its record is done (cancelled, or
        finished by another run: this outcome would be dropped). Only what the record
        says: a message naming the job alone stops nothing."""
        if (invoking := self._invoking.get(request_id)) is None:
            return
        try:
            record = await self._record(request_id)
        except FaasError:  # looked at again at the next in-progress ack
            return
        if record is not None and record.state == "done":
            invoking.cancel()

    async def _entry(self, request_id: str) -> Any:
        """The job's entry in the bucket, None when there is none; Overloaded when NATS fails."""
        try:
            return await self._kv.get(request_id)
        except KeyNotFoundError:
            return None
        except (NatsError, TimeoutError) as exc:
            raise Overloaded(f"the job's record could not be read: {type(exc).__name__}: {exc}") from None

    def _unpack(self, request_id: str, entry: Any) -> JobRecord | None:
        if entry is None or not entry.value:
            return None
        try:
            return JobRecord.unpack(entry.value)
        except ValueError as exc:
            self.log.error("job_record_malformed", job=request_id, error=str(exc))
            raise FaasError(f"the job's record is malformed ({exc})") from None

    async def _record(self, request_id: str) -> JobRecord | None:
        return self._unpack(request_id, await self._entry(request_id))

    # --- running ----------------------------------------------------------------------

    async def _fetch(self, psub: Any) -> None:
        while True:
            room = self.config.concurrency - len(self._running)
            if room <= 0:
                self._freed.clear()
                await self._freed.wait()
                continue
            for msg in await fetch(psub, room, self.log, "jobs"):
                request_id = (msg.headers or {}).get(protocol.HDR_REQUEST_ID, "")
                if request_id in self._running:  # taken again while it runs here: it is kept
                    continue
                task = self._running[request_id] = asyncio.create_task(self._run(request_id, msg))
                task.add_done_callback(lambda task, rid=request_id: self._done(rid, task))

    def _done(self, request_id: str, task: asyncio.Task[None]) -> None:
        self._running.pop(request_id, None)
        self._freed.set()
        self._log_failure(task, "job_failed", job=request_id)  # unacked: it comes back

    async def _run(self, request_id: str, msg: Msg) -> None:
        function = msg.subject[len(protocol.JOBS_QUEUE_PREFIX):]
        attempt = msg.metadata.num_delivered
        log = self.log.bind(fn=function, job=request_id, attempt=attempt)
        try:
            record = await self._record(request_id)
        except FaasError:
            record = None
        if record is not None and record.state == "done":  # cancelled, or its ack was lost
            await ack(msg, log, "job")
            return
        base = record or jobs.queued(function)
        if attempt > self.config.max_attempts:  # its last try ended with its node
            await self._finish(msg, base, _error(Overloaded(
                f"no outcome after {self.config.max_attempts} tries (the nodes running it went away)")), log)
            return
        keep = asyncio.create_task(keep_alive(msg, self.ack_wait_s, lambda: self._stop_if_done(request_id)))
        invoking: asyncio.Future[Any] | None = None
        try:
            claimed = await self._put(request_id, replace(base, state="running", node=self.node_id,
                                                          attempts=attempt), log)
            if claimed is None:  # cancelled since
                await ack(msg, log, "job")
                return
            if not claimed:  # the bucket falters: not run blind (a cancel may be there), later
                await nak(msg, retry_delay_s(attempt), log, "job")
                return
            event = msgpack.unpackb(msg.data, raw=False, strict_map_key=False)
            budget_s = float((msg.headers or {}).get(protocol.HDR_TIMEOUT_MS, "0")) / 1000 or self.config.budget_s
            # Its own id per delivery: found by the job's in the logs, and never taken for a
            # copy of an earlier delivery's invocation that a node still holds.
            invoking = self._invoking[request_id] = asyncio.ensure_future(self.client.invoke(
                function, event, timeout_s=budget_s, request_id=f"{request_id}-{attempt}"))
            await asyncio.wait([invoking])
            if invoking.cancelled():  # by _stop_if_done: the record is done (cancelled)
                log.info("job_run_cancelled")
                await ack(msg, log, "job")
                return
            result = invoking.result()
            outcome: dict[str, Any] = {"output": result.output, "metrics": result.metrics}
        # Refused for room, or cancelled by no one here (its node shutting down): later.
        except (Overloaded, Cancelled) as err:
            if attempt < self.config.max_attempts:
                delay = retry_delay_s(attempt)
                log.warning("job_deferred", error=err.message, retry_in_s=delay)
                if await self._put(request_id, replace(base, state="queued", node=None, attempts=attempt),
                                   log) is None:  # cancelled meanwhile
                    await ack(msg, log, "job")
                else:
                    await nak(msg, delay, log, "job")
                return
            outcome = _error(err)
        except FaasError as err:
            outcome = _error(err)
        except (NatsError, TimeoutError) as exc:  # this node's NATS: the job comes back, to run again
            log.warning("job_interrupted", error=f"{type(exc).__name__}: {exc}")
            await nak(msg, retry_delay_s(attempt), log, "job")
            return
        except (ValueError, TypeError) as exc:  # only nodes queue jobs: a bug, or a forgery
            outcome = _error(BadRequest(f"the queued job is malformed: {type(exc).__name__}"))
        finally:
            keep.cancel()
            self._invoking.pop(request_id, None)
            if invoking is not None and not invoking.done():  # this run is cancelled (closing): so is it
                invoking.cancel()
                await asyncio.wait([invoking])  # its cancel reaches the node serving it
        await self._finish(msg, base, outcome, log)

    async def _finish(self, msg: Msg, base: JobRecord, outcome: dict[str, Any], log: Any) -> None:
        """Keep the outcome (one too large for the bucket as the error saying so), trying
        again for a few seconds, then ack. A job is not run again for want of a place for its
        outcome: another run's would find none either (a full bucket)."""
        request_id = (msg.headers or {}).get(protocol.HDR_REQUEST_ID, "")
        done = replace(base, state="done", node=self.node_id, attempts=msg.metadata.num_delivered,
                       outcome=outcome)
        if (size := len(done.pack())) > self.nc.max_payload:
            done = replace(done, outcome=_error(PayloadTooLarge(
                f"the job's output takes {size} bytes, over the {self.nc.max_payload} a job's result may carry")))
        keep = asyncio.create_task(keep_alive(msg, self.ack_wait_s))
        try:
            for pause in _SAVE_PAUSES_S:
                await asyncio.sleep(pause)
                if (kept := await self._put(request_id, done, log)) is None:
                    log.info("job_outcome_dropped", why="the job's record was done already (cancelled, "
                                                        "finished by another run, or by this one's last try)")
                    break
                if kept:
                    log.info("job_done", error=(done.outcome or {}).get("error", {}).get("code"))
                    break
            else:
                log.error("job_outcome_lost", hint="the jobs' bucket is full or unreachable: its record "
                                                   "stays as it was")
        finally:
            keep.cancel()
        await ack(msg, log, "job")

    async def _put(self, request_id: str, record: JobRecord, log: Any) -> bool | None:
        """Write the job's record unless it is done (cancelled, or finished by another run):
        True when written, None when it was done, False when NATS failed (logged)."""
        try:
            for _ in range(_SWAP_TRIES):
                entry = await self._entry(request_id)
                try:
                    if (current := self._unpack(request_id, entry)) is not None and current.state == "done":
                        return None
                except FaasError:  # malformed: written over
                    pass
                try:
                    if entry is None:
                        await self._kv.create(request_id, record.pack())
                    else:
                        await self._kv.update(request_id, record.pack(), last=entry.revision)
                    return True
                except KeyWrongLastSequenceError:  # written meanwhile: look again
                    continue
            error = "written by others at every try"
        except (NatsError, TimeoutError, Overloaded) as exc:
            error = f"{type(exc).__name__}: {exc}"
        log.warning("job_record_failed", state=record.state, error=error)
        return False

    def state(self) -> dict[str, Any]:
        return {"running": len(self._running), "concurrency": self.config.concurrency,
                "retention_s": self.retention_s}

    async def close(self, timeout_s: float) -> None:
        """Take no more submits or jobs; jobs running get `timeout_s` to finish, the rest are
        left unacked (JetStream hands them out again)."""
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
        # A fetch cut short would hold the connection's drain.
        for sub in [*self._subs, *([self._psub] if self._psub is not None else [])]:
            try:
                await sub.unsubscribe()
            except NatsError as exc:
                self.log.warning("unsubscribe_failed", error=str(exc))
        self._subs, self._psub = [], None
        running = set(self._running.values())
        if running:
            _, pending = await asyncio.wait(running, timeout=timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
