"""What functions print and log, per function on NATS, for `faas logs` (any node's).

Each line a sandbox writes (its handlers' prints and `ctx.log` events, tagged with the
request id when a handler wrote it) is published as JSON `{"ts", "node", "fn", "req",
"line"}` on `faas.logs.<function>`; the JetStream stream FAAS_LOGS keeps the last
`keep` lines of each function for a day, so `faas logs FN` shows recent lines and
`--follow` new ones. Publishing never blocks a sandbox: lines beyond a full queue are
dropped and counted.
"""

from __future__ import annotations

import asyncio
import json
import time

from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js.api import DiscardPolicy, StorageType
from nats.js.errors import BadRequestError

from faas import protocol
from faas.logs import get_logger


class FunctionOutputs:
    def __init__(self, nc: NATS, node_id: str, keep: int = 10_000, queue: int = 10_000) -> None:
        self.nc = nc
        self.node_id = node_id
        self.keep = keep
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(queue)
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0
        self.log = get_logger(component="outputs")

    async def start(self) -> None:
        config = dict(name=protocol.LOGS_STREAM, subjects=[protocol.LOGS_PREFIX + ">"],
                      max_msgs_per_subject=self.keep, max_age=86400.0, storage=StorageType.FILE,
                      max_bytes=512 << 20,
                      discard=DiscardPolicy.OLD, num_replicas=protocol.js_replicas())
        js = self.nc.jetstream()
        try:
            try:
                await js.add_stream(**config)
            except BadRequestError:
                await js.update_stream(**config)
        except (NatsError, TimeoutError) as exc:  # live lines still go out, unkept
            self.log.warning("logs_not_kept", error=f"{type(exc).__name__}: {exc}")
        self._task = asyncio.create_task(self._publish(), name="outputs")

    def add(self, function: str, request_id: str | None, line: str) -> None:
        record = {"ts": time.time(), "node": self.node_id, "fn": function, "req": request_id, "line": line}
        try:
            self._queue.put_nowait((protocol.LOGS_PREFIX + function, json.dumps(record).encode()))
        except asyncio.QueueFull:
            if self.dropped % 1000 == 0:
                self.log.warning("log_lines_dropped", fn=function, dropped=self.dropped + 1)
            self.dropped += 1

    async def _publish(self) -> None:
        while True:
            subject, data = await self._queue.get()
            try:
                await self.nc.publish(subject, data)
            except NatsError as exc:
                self.log.warning("log_publish_failed", error=str(exc))

    async def close(self) -> None:
        """After the sandboxes stopped: what they wrote last goes out first."""
        while not self._queue.empty() and self._task is not None and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
