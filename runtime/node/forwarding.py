"""Forwarding: a request that would start cold here (its function is not served here, or
no loaded sandbox of it has room) goes to a peer where its function is warm
(runtime/node/cluster.py picks it), and what the peer answers is relayed to the caller.
This node keeps the request in its in-flight table meanwhile, and serves it itself when the
peer goes away before answering."""

from __future__ import annotations

import time
from typing import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeout

from faas import protocol
from faas.client import node_alive
from faas.errors import DeadlineExceeded, FaasError, Overloaded
from runtime.node.cluster import Cluster
from runtime.node.inflight import Flight, InFlight
from runtime.node.invocation import Invocations
from runtime.node.replies import Reply, answer
from runtime.node.stats import NodeStats

# How long past the request's deadline a forwarding node waits for its peer's 504.
_FORWARD_GRACE_S = 5.0


class Forwarder:
    """Forwards requests to peers; `serve_here` takes a request back when its peer is gone."""

    def __init__(self, nc: NATS, node_id: str, cluster: Cluster, inflight: InFlight, stats: NodeStats,
                 invocations: Invocations, serve_here: Callable[[Msg, Flight], Awaitable[None]]) -> None:
        self.nc = nc
        self.node_id = node_id
        self.cluster = cluster
        self.inflight = inflight
        self.stats = stats
        self.invocations = invocations
        self.serve_here = serve_here

    async def forward(self, msg: Msg, request: protocol.RequestHeaders, peer: str, function: str,
                      flight: Flight, reply: Reply) -> None:
        """Send the request to `peer` and relay what it answers (chunks, then the reply) to
        the caller (where its retry moved it, if it did). When the peer is gone before its
        reply (no responder, or its pings go unanswered) the request is served here
        instead, unless chunks were relayed already: a stream cannot be replayed, so it
        gets a 503. The request keeps its place in this node's in-flight table meanwhile."""
        self.stats[function].forwarded += 1
        log = reply.log.bind(peer=peer)
        handed_over = False

        async def fail(err: FaasError) -> None:
            await self.invocations.refuse(function, err, reply, log)

        headers = {**request.forwarded(self.node_id, time.time() * 1000),
                   protocol.HDR_CONTENT_TYPE: reply.encoding.content_type}  # the peer answers in kind
        deadline = int(headers[protocol.HDR_DEADLINE_MS]) / 1000 + _FORWARD_GRACE_S
        relayed = silent = 0
        sub = None
        try:
            sub = await self.nc.subscribe(self.nc.new_inbox())
            await self.nc.publish(protocol.node_invoke_subject(peer, function), msg.data,
                                  reply=sub.subject, headers=headers)
            while time.time() < deadline:
                try:
                    got = await sub.next_msg(timeout=1.0)
                except NatsTimeout:
                    alive = await node_alive(self.nc, peer)
                    silent = 0 if alive else silent + 1
                    if alive is False or silent >= 3:
                        break
                    continue
                if (got.headers or {}).get("Status") == "503":  # nobody subscribes: it is gone
                    break
                await answer(self.nc, flight.reply, got.data, got.headers, log)
                relayed += 1
                if not request.stream or protocol.is_final(got.headers):
                    return
            if time.time() >= deadline:  # the peer lives but never answered (it lost the request)
                await fail(DeadlineExceeded(f"node {peer} did not answer in time"))
                return
            self.cluster.forget(peer)
            if relayed:
                await fail(Overloaded(f"node {peer} stopped answering in the middle of the stream"))
                return
            log.warning("forward_failed_serving_here")
            handed_over = True
            await self.serve_here(msg, flight)
        except NatsError as exc:
            log.warning("forward_error", error=f"{type(exc).__name__}: {exc}")
            await fail(Overloaded(f"cannot forward: {exc}"))
        finally:
            if sub is not None:
                try:
                    await sub.unsubscribe()
                except NatsError:
                    pass
            if not handed_over:
                self.inflight.release(request.request_id, flight)

