"""Every request a node holds, by id, whatever brought it (an invocation, a peer's forward,
an event): one id, one request. A second request under an id in flight is refused, so it
can never take over another's place in a sandbox or its reply; a cancel or a retry acts only
with the key its caller sent (`Faas-Request-Key`, never echoed), so an id alone is not a
capability."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from faas import protocol
from faas.errors import BadRequest


@dataclass(eq=False)
class Flight:
    """A request this node holds: where its reply goes (a caller's retry may move it), the
    key that may cancel or retry it (None: nobody may, as for events), when it arrived
    (time.monotonic()), whether this node acknowledges it again while it runs, its cancel
    signal."""

    reply: str | None
    key: str | None
    received: float
    acks: bool = False
    cancel: asyncio.Event = field(default_factory=asyncio.Event)

    def allows(self, key: str | None) -> bool:
        """Whether a cancel or retry carrying `key` may act on this request."""
        return protocol.same_key(self.key, key)


class InFlight:
    """The node's requests by id: taken when a request is admitted (before any await, so
    two of one id cannot both pass), released when it is answered."""

    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}

    def get(self, request_id: str) -> Flight | None:
        """The request held under `request_id`, if any."""
        return self._flights.get(request_id)

    def take(self, request_id: str, reply: str | None, key: str | None, received: float,
             acks: bool = False) -> Flight:
        """Hold `request_id` from now on; BadRequest when a request of that id is held."""
        if request_id in self._flights:
            raise BadRequest(f"a request with id {request_id!r} is already in flight")
        flight = self._flights[request_id] = Flight(reply, key, received, acks)
        return flight

    def held(self) -> list[Flight]:
        """Every request held now."""
        return list(self._flights.values())

    def release(self, request_id: str, flight: Flight) -> None:
        """`flight` is answered: its id is free again (unless another request holds it)."""
        if self._flights.get(request_id) is flight:
            del self._flights[request_id]
