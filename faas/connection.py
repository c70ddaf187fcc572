"""NATS connections that never send a message the server would refuse.

nats-py checks a message's body against the server's max payload but not its headers; the
server counts both, and closes the connection of a client that sends more. One header too
many (a caller's id echoed into a reply, say) would then take a node off NATS. Every faas
process (node, operator commands, `Client`) connects through here: a message over the
limit, headers included, raises `nats.errors.MaxPayloadError` before anything is sent,
and the connection stays up.
"""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client as NATS
from nats.errors import MaxPayloadError

from faas.protocol import wire_size


class SizedNats(NATS):
    """A nats-py client whose publishes (requests, JetStream and KV writes: all go through
    `publish`) are sized with their headers."""

    async def publish(self, subject: str, payload: bytes = b"", reply: str = "",
                      headers: dict[str, str] | None = None) -> None:
        if headers and wire_size(payload, headers) > self.max_payload:
            raise MaxPayloadError
        await super().publish(subject, payload, reply, headers)


async def connect(servers: str | list[str], **options: Any) -> SizedNats:
    """`nats.connect`, with a `SizedNats`."""
    nc = SizedNats()
    await nc.connect(servers, **options)
    return nc
