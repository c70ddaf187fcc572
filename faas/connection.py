"""NATS connections that no message, sent or received, takes off NATS.

nats-py checks a message's body against the server's max payload but not its headers; the
server counts both, and closes the connection of a client that sends more. One header too
many (a caller's id echoed into a reply, say) would then take a node off NATS. Every faas
process (node, operator commands, `Client`) connects through here: a message over the
limit, headers included, raises `nats.errors.MaxPayloadError` before anything is sent,
and the connection stays up. On the receiving side, a message nats-py cannot build (a
subject that is not UTF-8) is decoded leniently, and one whose handling fails is dropped,
instead of ending nats-py's read loop; should that loop end anyway while connected, the
connection is closed, so its owner hears of it (a node then exits).
"""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.client import Client as NATS
from nats.errors import MaxPayloadError

from faas.logs import get_logger
from faas.protocol import wire_size


class SizedNats(NATS):
    """A nats-py client whose publishes (requests, JetStream and KV writes: all go through
    `publish`) are sized with their headers, and that one message cannot make deaf."""

    _abandoned: asyncio.Task[None] | None = None

    async def publish(self, subject: str, payload: bytes = b"", reply: str = "",
                      headers: dict[str, str] | None = None) -> None:
        if headers and wire_size(payload, headers) > self.max_payload:
            raise MaxPayloadError
        await super().publish(subject, payload, reply, headers)

    def _build_message(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                       headers: dict[str, str] | None) -> Any:
        # A subject is a caller's bytes: nats-py decodes them strictly, and one that is not
        # UTF-8 raised out of its read loop, which then stopped reading for good while the
        # connection stayed up.
        return self.msg_class(subject=subject.decode(errors="replace"), reply=reply.decode(errors="replace"),
                              data=data, headers=headers, _client=self, _sid=sid)

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes,
                           headers: bytes) -> None:
        try:
            await super()._process_msg(sid, subject, reply, data, headers)
        except Exception as exc:  # one message, whatever it holds, must not end the read loop
            get_logger().warning("nats_message_dropped", subject=subject[:200].decode(errors="replace"),
                                 error=f"{type(exc).__name__}: {exc}"[:500])

    async def _read_loop(self) -> None:
        await super()._read_loop()
        if self.is_connected:  # it ended on an error of its own: nothing is read any more
            get_logger().error("nats_read_loop_ended")
            self._abandoned = asyncio.ensure_future(self.close())  # its closed callback then runs


def raise_if_cancelled() -> None:
    """Raise CancelledError when the current task was asked to stop. A loop over nats-py
    calls checks this after each: nats-py waits with Python 3.11's `asyncio.wait_for`, which
    can swallow a cancel that lands as a message arrives (the call then returns, or raises
    one of nats-py's errors, as if nothing happened), so the loop would go on for ever."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def connect(servers: str | list[str], **options: Any) -> SizedNats:
    """`nats.connect`, with a `SizedNats`."""
    nc = SizedNats()
    await nc.connect(servers, **options)
    return nc
