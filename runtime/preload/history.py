"""Invocation history in NATS: one message per invocation on `faas.history.<function>`,
kept in the JetStream stream FAAS_HISTORY (created if missing), so every node and a node
that restarts predict from the same history.

Each node publishes its own invocations (a plain publish: the stream stores it, the request
path never waits for an ack) and reads the whole stream with an ordered consumer: first
what is stored, then every new invocation of any node, in order. Without JetStream (a
server started without `-js`) the history is this node's own, in memory, and it says so.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from typing import Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.api import DeliverPolicy

from faas import protocol
from faas.logs import get_logger
from faas.streams import ensure_stream


class History:
    """Arrival times (Unix seconds, ascending) per function, at most `keep` each."""

    def __init__(self, nc: NATS, node_id: str, functions: set[str], keep: int = 1000,
                 max_age_s: float = 7 * 86400,
                 on_arrival: Callable[[str], None] = lambda _fn: None) -> None:
        self.nc = nc
        self.node_id = node_id
        self.functions = functions  # records of others (not served here) are skipped
        self.keep = keep
        self.max_age_s = max_age_s
        self.on_arrival = on_arrival
        self.arrivals: dict[str, list[float]] = {}
        self.shared = False  # True once it reads the JetStream stream
        self._read = 0
        self._read_all = asyncio.Event()
        self._sub = None
        self.log = get_logger(component="history")

    async def start(self, timeout_s: float = 10.0) -> None:
        """Read what the stream holds (up to `timeout_s`): plans made before would predict
        from part of the history."""
        js = self.nc.jetstream()
        try:
            await ensure_stream(js, "history", protocol.HISTORY_STREAM, [protocol.HISTORY_PREFIX + ">"],
                                max_msgs_per_subject=self.keep, max_age=self.max_age_s)
            stored = (await js.stream_info(protocol.HISTORY_STREAM)).state.messages
            self._sub = await js.subscribe(protocol.HISTORY_PREFIX + ">", cb=self._on_message,
                                           ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
            self.shared = True
            if stored:
                await self._caught_up(timeout_s)
        except (NatsError, TimeoutError) as exc:
            self.log.warning("history_local_only", error=f"{type(exc).__name__}: {exc}",
                             hint="start nats-server with JetStream (-js) to share the history")

    async def _caught_up(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self._read_all.wait(), timeout_s)
        except TimeoutError:
            pass
        self.log.info("history_read", records=self._read, functions=len(self.arrivals),
                      complete=self._read_all.is_set())

    async def record(self, function: str) -> None:
        """An invocation of `function` arrived now."""
        now = time.time()
        if not self.shared:
            if function in self.functions:
                self._add(function, now)
            return
        try:
            await self.nc.publish(protocol.history_subject(function),
                                  protocol.history_record(now, self.node_id))
        except NatsError as exc:
            self.log.warning("history_publish_failed", fn=function, error=str(exc))

    async def _on_message(self, msg: Msg) -> None:
        self._read += 1
        if msg.metadata.num_pending == 0:  # nothing stored beyond this one
            self._read_all.set()
        try:
            function, at = protocol.parse_history(msg.subject, msg.data)
        except ValueError as exc:
            self.log.warning("history_record_ignored", subject=msg.subject, error=str(exc))
            return
        if function in self.functions:
            self._add(function, at)

    def _add(self, function: str, at: float) -> None:
        times = self.arrivals.setdefault(function, [])
        bisect.insort(times, at)  # nodes' clocks differ a little: keep them sorted
        if len(times) > self.keep:
            del times[:len(times) - self.keep]
        self.on_arrival(function)

    async def close(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except NatsError:
                pass
