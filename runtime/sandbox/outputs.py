"""What functions print and log, per function on NATS, for `faas logs` (any node's).

Each line a sandbox writes (its handlers' prints and `ctx.log` events, tagged with the
request id when a handler wrote it) is published as JSON `{"ts", "node", "fn", "req",
"line"}` on `faas.logs.<function>`; the JetStream stream FAAS_LOGS keeps the last
`keep` lines of each function for a day, so `faas logs FN` shows recent lines and
`--follow` new ones. Publishing never blocks a sandbox: each function may have at most
`per_function_bytes` of lines waiting to go out (so one chatty function cannot crowd out
the others' lines), all together at most `queue_bytes`; lines beyond are dropped and
counted per function.
"""

from __future__ import annotations

import asyncio
import json
import time

from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError

from faas import protocol
from faas.logs import get_logger
from faas.streams import ensure_stream


class FunctionOutputs:
    def __init__(self, nc: NATS, node_id: str, keep: int = 10_000, queue_bytes: int = 16 << 20,
                 per_function_bytes: int = 1 << 20) -> None:
        self.nc = nc
        self.node_id = node_id
        self.keep = keep
        self.queue_bytes = queue_bytes
        self.per_function_bytes = per_function_bytes
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._waiting: dict[str, int] = {}  # bytes waiting per function
        self._task: asyncio.Task[None] | None = None
        self.dropped: dict[str, int] = {}
        self.log = get_logger(component="outputs")

    async def start(self) -> None:
        try:
            await ensure_stream(self.nc.jetstream(), "logs", protocol.LOGS_STREAM, [protocol.LOGS_PREFIX + ">"],
                                max_msgs_per_subject=self.keep, max_age=86400.0)
        except (NatsError, TimeoutError) as exc:  # live lines still go out, unkept
            self.log.warning("logs_not_kept", error=f"{type(exc).__name__}: {exc}")
        self._task = asyncio.create_task(self._publish(), name="outputs")

    def add(self, function: str, request_id: str | None, line: str) -> None:
        record = {"ts": time.time(), "node": self.node_id, "fn": function, "req": request_id, "line": line}
        data = json.dumps(record).encode()
        waiting = self._waiting.get(function, 0)
        if waiting + len(data) > self.per_function_bytes or \
                sum(self._waiting.values()) + len(data) > self.queue_bytes:
            dropped = self.dropped[function] = self.dropped.get(function, 0) + 1
            if dropped % 1000 == 1:
                self.log.warning("log_lines_dropped", fn=function, dropped=dropped)
            return
        self._waiting[function] = waiting + len(data)
        self._queue.put_nowait((function, data))

    async def _publish(self) -> None:
        while True:
            function, data = await self._queue.get()
            self._waiting[function] -= len(data)
            if not self._waiting[function]:
                del self._waiting[function]
            try:
                await self.nc.publish(protocol.LOGS_PREFIX + function, data)
            except NatsError as exc:
                self.log.warning("log_publish_failed", error=str(exc))

    async def close(self) -> None:
        """After the sandboxes stopped: what they wrote last goes out first."""
        while not self._queue.empty() and self._task is not None and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
