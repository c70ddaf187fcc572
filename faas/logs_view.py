"""`faas logs FN [--follow]`: what a function's sandboxes printed and logged, on every node
(the lines runtime/sandbox/outputs.py publishes on `faas.logs.<fn>`, kept in JetStream)."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import datetime, timezone
from typing import Any

from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js.api import DeliverPolicy

from faas import protocol


def _format(record: dict[str, Any]) -> str:
    ts = datetime.fromtimestamp(record["ts"], timezone.utc).strftime("%H:%M:%S.%f")[:-3]
    return f"{ts} {record.get('node', '?')} {record.get('req') or '-'} {record.get('line', '')}"


def _record(data: bytes) -> dict[str, Any] | None:
    """A log line as nodes publish it, or None for anything else in the stream (whoever
    could publish there: the line is skipped, the reader goes on)."""
    try:
        record = json.loads(data)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("line"), str):
        return None
    ts = record.get("ts")
    if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not 0 <= ts < 1e11:
        return None
    return record


async def show_logs(nc: NATS, function: str, lines: int = 100, follow: bool = False,
                    as_json: bool = False) -> int:
    """Print the last `lines` kept lines of `function`, then (with `follow`) new ones until
    interrupted. Without JetStream, only new lines (with `follow`)."""
    if not protocol.valid_function_name(function):
        print(f"error: {function!r} is not a function name", file=sys.stderr)
        return 2
    subject = protocol.LOGS_PREFIX + function
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    caught_up = asyncio.Event()

    async def on_line(msg: Any) -> None:
        if (record := _record(msg.data)) is not None:
            await queue.put(record)
        if msg.metadata is None or msg.metadata.num_pending == 0:
            caught_up.set()

    try:
        stored = (await nc.jetstream().stream_info(protocol.LOGS_STREAM, subjects_filter=subject)).state
        kept = (stored.subjects or {}).get(subject, 0)
        sub = await nc.jetstream().subscribe(subject, cb=on_line, ordered_consumer=True,
                                            deliver_policy=DeliverPolicy.ALL)
        if not kept:
            caught_up.set()
    except (NatsError, TimeoutError):
        sub, kept = await nc.subscribe(subject, cb=on_line), 0
        caught_up.set()
    try:
        try:
            await asyncio.wait_for(caught_up.wait(), 10)
        except TimeoutError:  # print what came; the rest follows with --follow
            pass
        backlog = [queue.get_nowait() for _ in range(queue.qsize())]
        for record in backlog[-lines:]:
            print(json.dumps(record) if as_json else _format(record), flush=True)
        while follow:
            record = await queue.get()
            print(json.dumps(record) if as_json else _format(record), flush=True)
    finally:
        await sub.unsubscribe()
    return 0
