"""Event triggers: JetStream events invoke functions, at least once.

The node makes sure the events stream (`FAAS_EVENTS` over `events.>`, limits retention: an
event published before any function listens is kept) and the outcomes stream
(`FAAS_OUTCOMES` over `faas.dlq.>` and `faas.results.>`) exist, and one durable pull
consumer per function with triggers (`faas-<function>`, filtered on its triggers, shared by
every node serving it). It fetches in batches no larger than the function has room for and
hands each event to the path every request takes (runtime/node/invocation.py: admission,
the history, the batch window, a sandbox, the stats; the budget of the function's
`timeout_s`), then:

- success: ack (after publishing the output on `faas.results.<fn>` when the function asks);
- failure: `nak` with a delay that doubles with each delivery (a plain nak would redeliver
  at once: the consumer's backoff does not apply to naks), until the function's
  `max_deliver`-th attempt failed: then the event goes to `faas.dlq.<fn>` with the error,
  and is acked;
- a slow handler keeps its event with an in-progress ack every third of the ack wait, so
  it is not redelivered while it runs;
- a node that dies mid-event does not ack: the event is redelivered after the ack wait, to
  this node when it is back or to another. The consumer's own `max_deliver` is one more
  than the function's, so an event whose last attempt died with its node comes back once
  more, and is sent to the dead letters then instead of vanishing silently.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import msgpack
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import BadRequestError, NotFoundError

from faas import protocol
from faas.errors import BadRequest, FaasError, HandlerError
from faas.logs import get_logger
from faas.protocol import Metrics
from faas.schedule import Cron
from faas.streams import ensure_stream
from runtime.node.inflight import InFlight
from runtime.node.invocation import Call, Invocations, deadline_of
from runtime.node.pull import ack, fetch, keep_alive, nak
from runtime.pool.leases import FunctionPool
from runtime.sandbox.handles import OutputTooLarge

_WEEK_S = 7 * 86400


@dataclass(frozen=True)
class EventsConfig:
    """How the node consumes events; `ack_wait_s` is how long an event may go without an
    ack (or an in-progress ack) before JetStream redelivers it."""

    enabled: bool = True
    subjects: tuple[str, ...] = protocol.EVENTS_SUBJECTS
    ack_wait_s: float = 30.0
    fetch_batch: int = 16
    retry_base_s: float = 1.0
    retry_max_s: float = 60.0


def retry_delay_s(delivered: int, config: EventsConfig) -> float:
    """The nak delay after the `delivered`-th attempt failed: doubling, capped."""
    return min(config.retry_max_s, config.retry_base_s * 2 ** (delivered - 1))


def _decode(msg: Msg) -> dict[str, Any]:
    encoding = protocol.request_encoding(msg.data, msg.headers)
    return protocol.decode_event(msg.data, encoding)


def dead_letter(function: str, data: bytes, headers: dict[str, str], info: dict[str, Any],
                err: FaasError, room: int) -> bytes:
    """A dead letter (msgpack) of at most `room` bytes: the function, the event's place,
    the error, the event's headers and bytes. One that would not fit keeps all but the
    event's bytes whole and the first of those (`truncated`, `data_bytes`: how many there
    were): an event near the max payload is never lost for want of room beside it."""
    letter: dict[str, Any] = {"function": function, "event": info,
                              "error": {"code": err.code, "message": err.message[:protocol.MAX_ERROR_MESSAGE]},
                              "data": data, "headers": headers}
    packed = msgpack.packb(letter, use_bin_type=True)
    if len(packed) <= room:
        return packed
    letter.update(data=b"", truncated=True, data_bytes=len(data))
    if len(msgpack.packb(letter, use_bin_type=True)) > room // 2:  # headers too large to keep
        letter["headers"] = {}
    left = room - len(msgpack.packb(letter, use_bin_type=True)) - 8  # the bytes' own length prefix
    letter["data"] = data[:max(0, left)]
    return msgpack.packb(letter, use_bin_type=True)


class EventConsumers:
    """The node's event loops, one per function with triggers."""

    def __init__(self, nc: NATS, pools: dict[str, FunctionPool], invocations: Invocations,
                 inflight: InFlight, config: EventsConfig) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.pools = {name: pool for name, pool in pools.items() if pool.spec.triggers}
        # The node's: events are invocations like requests (the history, `faas top`,
        # $SRV.STATS and Prometheus count them), and an event's id is never a request's.
        self.invocations = invocations
        self.inflight = inflight
        self.config = config
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._subs: dict[str, Any] = {}
        self._events: set[asyncio.Task[None]] = set()
        self._running: dict[str, int] = {name: 0 for name in self.pools}
        self._streams = False
        self._ticks: asyncio.Task[None] | None = None
        self.processed = self.failed = self.dead = 0
        self.log = get_logger(component="events")

    async def start(self) -> None:
        """Keep events from now on (also before any function with triggers is deployed) and
        consume those of this node's functions."""
        if self.config.enabled:
            try:
                await self._ensure_streams()
            except NatsError as exc:
                self.log.warning("events_unavailable", error=f"{type(exc).__name__}: {exc}")
        for name, pool in list(self.pools.items()):
            await self.add(name, pool)
        if self.config.enabled:
            self._ticks = asyncio.create_task(self._tick(), name="schedules")
        if self._loops:
            self.log.info("events_consuming", functions=sorted(self._loops),
                          ack_wait_s=self.config.ack_wait_s)

    async def add(self, name: str, pool: FunctionPool) -> None:
        """Consume the events of `name` (a function added or replaced while the node runs:
        its durable consumer keeps its place, with the new version's triggers)."""
        await self.remove(name)
        if not self.config.enabled or not pool.spec.triggers:
            return
        try:
            await self._ensure_streams()
            psub = await self._consumer(name, pool)
        except NatsError as exc:
            self.log.error("event_consumer_failed", fn=name, error=f"{type(exc).__name__}: {exc}")
            return
        self.pools[name] = pool
        self._running.setdefault(name, 0)
        self._subs[name] = psub
        self._loops[name] = asyncio.create_task(self._fetch(name, pool, psub), name=f"events-{name}")

    async def remove(self, name: str) -> None:
        """Stop fetching events for `name`; those in flight finish (their acks still go)."""
        self.pools.pop(name, None)
        loop, psub = self._loops.pop(name, None), self._subs.pop(name, None)
        if loop is not None:
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)
        if psub is not None:  # a fetch cut short would hold the connection's drain
            try:
                await psub.unsubscribe()
            except NatsError as exc:
                self.log.warning("event_unsubscribe_failed", fn=name, error=str(exc))

    async def _ensure_streams(self) -> None:
        if not self._streams:
            await ensure_stream(self.js, "events", protocol.EVENTS_STREAM, list(self.config.subjects),
                                max_age=_WEEK_S, duplicate_window=120.0)
            await ensure_stream(self.js, "outcomes", protocol.OUTCOMES_STREAM,
                                [protocol.DLQ_PREFIX + ">", protocol.RESULTS_PREFIX + ">"],
                                max_age=_WEEK_S, duplicate_window=120.0)
            self._streams = True

    async def _consumer(self, name: str, pool: FunctionPool) -> Any:
        triggers = list(pool.spec.triggers)
        durable = protocol.consumer_name(name)
        config = ConsumerConfig(
            durable_name=durable, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.NEW,
            ack_wait=self.config.ack_wait_s, max_deliver=pool.spec.max_deliver + 1,
            filter_subjects=triggers if len(triggers) > 1 else None,
            filter_subject=triggers[0] if len(triggers) == 1 else None,
            max_ack_pending=max(64, self.capacity(pool) * 4),
            # What `faas events` shows of a schedule (its next run): JetStream keeps it.
            description=f"schedule {pool.spec.schedule}" if pool.spec.schedule else None)
        try:
            info = await self.js.consumer_info(protocol.EVENTS_STREAM, durable)
        except NotFoundError:
            await self.js.add_consumer(protocol.EVENTS_STREAM, config)
        else:  # it keeps its position; its settings follow the function's where they may
            config.deliver_policy = info.config.deliver_policy
            try:
                await self.js.add_consumer(protocol.EVENTS_STREAM, config)
            except BadRequestError as exc:
                self.log.warning("event_consumer_kept", fn=name, error=str(exc))
        return await self.js.pull_subscribe_bind(durable=durable, stream=protocol.EVENTS_STREAM)

    @staticmethod
    def capacity(pool: FunctionPool) -> int:
        """How many events of a function may be in flight on this node at once."""
        return pool.max_batch * pool.spec.max_instances

    async def _fetch(self, name: str, pool: FunctionPool, psub: Any) -> None:
        """Fetch `name`'s events while this task is its loop (`remove` ends it, also should
        nats-py lose the cancel)."""
        room_freed = asyncio.Event()
        this = asyncio.current_task()
        while self._loops.get(name) is this:
            room = self.capacity(pool) - self._running[name]
            if room <= 0:
                room_freed.clear()
                await room_freed.wait()
                continue
            for msg in await fetch(psub, min(room, self.config.fetch_batch), self.log.bind(fn=name), "event"):
                self._running[name] += 1
                task = asyncio.create_task(self._handle(name, pool, msg))
                self._events.add(task)
                task.add_done_callback(self._events.discard)
                task.add_done_callback(lambda _task: self._done(name, room_freed))

    def _done(self, name: str, room_freed: asyncio.Event) -> None:
        self._running[name] -= 1
        room_freed.set()

    async def _handle(self, name: str, pool: FunctionPool, msg: Msg) -> None:
        received = time.monotonic()
        meta = msg.metadata
        delivered = meta.num_delivered
        info = {"subject": msg.subject, "sequence": meta.sequence.stream,
                "msg_id": (msg.headers or {}).get(protocol.HDR_MSG_ID), "delivered": delivered}
        log = self.log.bind(fn=name, seq=info["sequence"], delivered=delivered)
        outcome = _Outcome(self, name, pool, msg, info, log)
        max_deliver = pool.spec.max_deliver
        if delivered > max_deliver:  # its last attempt ended with its node (or was refused)
            err = FaasError(f"no outcome after {max_deliver} deliveries (the node serving the "
                            "last one went away, or refused it)")
            await self.dead_letter(name, msg, info, err, log)
            return
        try:
            event = _decode(msg)
        except BadRequest as err:  # as a request's body that does not decode
            await self.invocations.refuse(name, err, outcome, log)
            return
        if not await self.invocations.admit(pool, outcome, log):
            return
        # Unguessable, and held with the node's requests: nobody can cancel it, or take its
        # place (and its output) by sending a request under its id.
        request_id = protocol.new_request_id()
        flight = self.inflight.take(request_id, None, None, received)
        keep = asyncio.create_task(keep_alive(msg, self.config.ack_wait_s))
        try:
            await self.invocations.serve(pool, Call(request_id, event, received, deadline_of(pool.spec, received),
                                                    event_info=info), outcome, log)
        finally:
            keep.cancel()
            self.inflight.release(request_id, flight)

    def room(self) -> int:
        """The most bytes an outcome message may take (its Nats-Msg-Id header aside)."""
        return self.nc.max_payload - 1024

    async def dead_letter(self, name: str, msg: Msg, info: dict[str, Any], err: FaasError,
                           log: Any) -> None:
        """Publish the event and why it failed on `faas.dlq.<fn>` (kept, replayable), then ack."""
        self.dead += 1
        log.error("event_dead_lettered", code=err.code, error=err.message)
        letter = dead_letter(name, msg.data, dict(msg.headers or {}), info, err, self.room())
        if await self.publish(protocol.DLQ_PREFIX + name, letter, f"dlq-{name}-{info['sequence']}", log):
            await ack(msg, log, "event")

    async def publish(self, subject: str, body: bytes, msg_id: str, log: Any) -> bool:
        try:
            await self.js.publish(subject, body, headers={protocol.HDR_MSG_ID: msg_id})
            return True
        except NatsError as exc:  # unacked: it comes back and retries
            log.error("event_outcome_publish_failed", subject=subject, error=f"{type(exc).__name__}: {exc}")
            return False

    def state(self) -> dict[str, Any]:
        return {"functions": sorted(self.pools), "in_flight": dict(self._running),
                "processed": self.processed, "failed": self.failed, "dead_lettered": self.dead}

    async def _tick(self) -> None:
        """Publish each scheduled function's ticks as events. Every node serving it does,
        with the same `Nats-Msg-Id` per tick: the stream keeps one (its duplicate window is
        two minutes), so a tick runs once per cluster, at least once, as any event."""
        while True:
            now = datetime.now(timezone.utc)
            due = {name: Cron.parse(pool.spec.schedule).next_after(now)
                   for name, pool in self.pools.items() if pool.spec.schedule}
            wait_s = min([(t - now).total_seconds() for t in due.values()] + [1.0])
            await asyncio.sleep(max(wait_s, 0.0))  # at most a second: functions come and go
            now = datetime.now(timezone.utc)
            for name, tick in due.items():
                if tick <= now:
                    await self._publish_tick(name, tick)

    async def _publish_tick(self, name: str, tick: datetime) -> None:
        event = {"scheduled_for": tick.isoformat()}
        headers = {protocol.HDR_MSG_ID: f"schedule-{name}-{int(tick.timestamp())}",
                   protocol.HDR_CONTENT_TYPE: "application/json"}
        try:
            await self.js.publish(protocol.schedule_subject(name), json.dumps(event).encode(), headers=headers)
        except NatsError as exc:  # another node may publish it; the next tick comes anyway
            self.log.warning("schedule_tick_failed", fn=name, tick=event["scheduled_for"],
                             error=f"{type(exc).__name__}: {exc}")

    async def close(self, timeout_s: float) -> None:
        """Stop fetching; events in flight get `timeout_s` to finish, the rest are left
        unacked (JetStream redelivers them)."""
        if self._ticks is not None:
            self._ticks.cancel()
            await asyncio.gather(self._ticks, return_exceptions=True)
        for name in list(self._loops):
            await self.remove(name)
        if self._events:
            _, pending = await asyncio.wait(set(self._events), timeout=timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


class _Outcome:
    """Where an event's outcome goes (runtime/node/invocation.py `Answer`): its output to the
    results when its function asks, then an ack; a failure retried later (nak) or, when
    retrying cannot help or this was its last delivery, a dead letter. A node shutting
    down leaves it unacked: JetStream redelivers it."""

    stream = False

    def __init__(self, consumers: EventConsumers, name: str, pool: FunctionPool, msg: Msg,
                 info: dict[str, Any], log: Any) -> None:
        self.consumers = consumers
        self.name = name
        self.pool = pool
        self.msg = msg
        self.info = info
        self.log = log

    async def chunk(self, chunk: dict[str, Any]) -> None:
        raise AssertionError("events do not stream")

    async def output(self, output: Any, metrics: Metrics) -> None:
        consumers, name, log = self.consumers, self.name, self.log
        if self.pool.spec.results:
            result = msgpack.packb({"output": output, "event": self.info}, use_bin_type=True)
            room = consumers.room()
            if len(result) > room:  # it will never fit: running it again cannot help
                err = HandlerError(f"the output takes {len(result)} bytes, over the {room} a result "
                                   "may carry: it is kept here instead of in the results")
                await consumers.dead_letter(name, self.msg, self.info, err, log)
                return
            if not await consumers.publish(protocol.RESULTS_PREFIX + name, result,
                                           f"result-{name}-{self.info['sequence']}", log):
                await nak(self.msg, retry_delay_s(self.info["delivered"], consumers.config), log, "event")
                return
        await ack(self.msg, log, "event")  # redelivered when it fails: at least once
        consumers.processed += 1

    async def error(self, err: FaasError, ran: bool) -> None:
        consumers, delivered = self.consumers, self.info["delivered"]
        if ran:
            consumers.failed += 1
        # The event itself is bad (it does not decode, or the handler judged it so), or its
        # output is more than an outcome may carry, or this was its last try: a dead letter.
        if isinstance(err, (BadRequest, OutputTooLarge)) or ran and delivered >= self.pool.spec.max_deliver:
            await consumers.dead_letter(self.name, self.msg, self.info, err, self.log)
            return
        # Refused before it ran (queue full, shutting down): soon again. Failed: backing off.
        delay = retry_delay_s(delivered if ran else 1, consumers.config)
        self.log.warning("event_failed", code=err.code, error=err.message, retry_in_s=delay)
        await nak(self.msg, delay, self.log, "event")

    async def shutdown(self) -> FaasError | None:
        return None
