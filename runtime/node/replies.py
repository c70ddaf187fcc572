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
from faas.errors import FaasError, HandlerError, Overloaded
from faas.protocol import Encoding, Metrics
from runtime.node.inflight import Flight


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


class Reply:
    """A caller's request's outcome (runtime/node/invocation.py `Answer`): its chunks, then
    exactly one reply (the output or an error), in the encoding the caller used, with the
    last one marked final when it streams. Sent to `to`, or where the request held as
    `flight` is answered now (a caller's retry may move it)."""

    def __init__(self, nc: NATS, to: str | None, encoding: Encoding, request_id: str, stream: bool,
                 log: Any, flight: Flight | None = None) -> None:
        self.nc = nc
        self._to = to
        self.flight = flight
        self.encoding = encoding
        self.request_id = request_id
        self.stream = stream
        self.log = log

    @property
    def to(self) -> str | None:
        return self.flight.reply if self.flight is not None else self._to

    async def chunk(self, chunk: dict[str, Any]) -> None:
        await answer(self.nc, self.to, *protocol.chunk_message(chunk, self.encoding, self.request_id), self.log)

    async def output(self, output: Any, metrics: Metrics) -> None:
        try:
            body, headers = protocol.ok_reply(output, metrics, self.encoding)
        except (TypeError, ValueError) as exc:
            raise HandlerError(f"output cannot be encoded as {self.encoding.value}: {exc}") from None
        self._mark_final(headers)
        size = protocol.wire_size(body, headers)
        if size > self.nc.max_payload:
            raise HandlerError(f"reply of {size} bytes exceeds the server's max payload "
                               f"of {self.nc.max_payload} bytes")
        await answer(self.nc, self.to, body, headers, self.log)

    async def error(self, err: FaasError, ran: bool = False) -> None:
        body, headers = protocol.error_reply(err, self.encoding, self.request_id)
        self._mark_final(headers)
        await answer(self.nc, self.to, body, headers, self.log)

    async def shutdown(self) -> FaasError:
        err = Overloaded("the node shut down before the request completed")
        await self.error(err, True)
        return err

    def _mark_final(self, headers: dict[str, str]) -> None:
        if self.stream:
            headers[protocol.HDR_FINAL] = "true"
