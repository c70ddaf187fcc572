"""The one way a node publishes to a subject a caller named (replies, chunks, acks, pings,
listings, the NATS micro answers): never into a reserved namespace, never with a header the
node did not write itself, never over the server's max payload.

A reply subject is the caller's choice. Published with the node's rights, one naming
`$KV.faas_functions.<fn>` would write the functions bucket, one naming `faas.dlq.<fn>` a
dead letter; so subjects under `$`, `faas.` and `events.` are refused here, for every
message, whatever the entry point. Sizes are checked by the connection (faas/connection.py).
"""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError

from faas import protocol


async def answer(nc: NATS, subject: str | None, body: bytes, headers: dict[str, str] | None,
                 log: Any) -> bool:
    """Publish `body` with `headers` (the node's own) on the caller's reply `subject`. False
    (and logged) when the subject is refused or the publish failed (too large, no
    connection): the caller then gets nothing from this message."""
    if not subject or not protocol.valid_reply_subject(subject):
        log.warning("reply_subject_refused", reply=(subject or "")[:200])
        return False
    try:
        await nc.publish(subject, body, headers=headers or None)
    except NatsError as exc:
        log.error("reply_failed", error=f"{type(exc).__name__}: {exc}", bytes=len(body))
        return False
    return True
