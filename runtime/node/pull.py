"""JetStream pull consumers, as the event loops (events.py) and the async jobs (jobs.py) use
them: fetch a batch, keep a message while its handler runs, ack or hand it back."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from faas.connection import raise_if_cancelled


async def keep_alive(msg: Msg, ack_wait_s: float, check: Callable[[], Awaitable[None]] | None = None) -> None:
    """In-progress acks while a handler runs (an event's, a job's): a slow one is not
    handed out again. `check` is awaited after each (a job's look at its record)."""
    while True:
        await asyncio.sleep(ack_wait_s / 3)
        try:
            await msg.in_progress()
        except NatsError:
            return
        if check is not None:
            await check()


async def fetch(psub: Any, batch: int, log: Any, kind: str) -> list[Msg]:
    """Up to `batch` messages of a pull consumer, waiting at most a second (an event
    loop's, the jobs'); none when none came or NATS failed (after a pause, logged). A cancel
    is raised, also one nats-py swallowed: what was fetched comes back after the ack wait."""
    try:
        msgs = await psub.fetch(batch, timeout=1.0)
    # nats-py raises asyncio's TimeoutError too (when its no-wait probe is answered late, as
    # on a loaded machine), which is none of its own: caught apart, it ended the loop.
    except (NatsError, TimeoutError) as exc:
        raise_if_cancelled()
        if not isinstance(exc, TimeoutError):
            log.warning(f"{kind}_fetch_failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(1.0)
        return []
    raise_if_cancelled()
    return msgs


async def ack(msg: Msg, log: Any, kind: str) -> None:
    """Ack a JetStream message; one that fails is logged (the message comes back)."""
    try:
        await msg.ack()
    except NatsError as exc:
        log.warning(f"{kind}_ack_failed", error=f"{type(exc).__name__}: {exc}")


async def nak(msg: Msg, delay_s: float, log: Any, kind: str) -> None:
    """Hand a JetStream message back, to come again after `delay_s`."""
    try:
        await msg.nak(delay=delay_s)
    except NatsError as exc:
        log.warning(f"{kind}_nak_failed", error=f"{type(exc).__name__}: {exc}")
