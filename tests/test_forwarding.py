"""Forwarding's failure paths, against a real nats-server and a peer that misbehaves: the
caller always gets a final answer, and the node lets go of the request."""

from __future__ import annotations

import asyncio
import json
import time

import nats
from nats.aio.msg import Msg

from faas import protocol
from faas.logs import get_logger
from faas.protocol import Encoding
from runtime.node.cluster import Cluster
from runtime.node.forwarding import Forwarder
from runtime.node.inflight import InFlight
from runtime.node.invocation import Invocations
from runtime.node.replies import Reply
from runtime.node.stats import NodeStats
from tests.test_cluster import start_server


async def test_a_stream_whose_peer_dies_midway_ends_with_a_final_503(tmp_path):
    """The peer relays one chunk, then is gone (nothing answers its pings): the caller has
    its chunk, then a final 503 (a stream cannot be replayed here), and nothing is held."""
    server, url = start_server(tmp_path)
    node = await nats.connect(url)
    caller = await nats.connect(url)
    try:
        async def dying_peer(msg: Msg) -> None:
            await node.publish(msg.reply, json.dumps({"delta": "a"}).encode(),
                               headers={protocol.HDR_CONTENT_TYPE: "application/json"})

        await node.subscribe(protocol.node_invoke_subject("peer-x", "fn"), cb=dying_peer)
        inbox = await caller.subscribe(caller.new_inbox())
        await caller.flush()
        headers = {protocol.HDR_REQUEST_ID: "r1", protocol.HDR_STREAM: "true",
                   protocol.HDR_TIMEOUT_MS: "30000", protocol.HDR_CONTENT_TYPE: "application/json"}
        request = protocol.parse_request_headers(headers)
        inflight, stats = InFlight(), NodeStats()
        flight = inflight.take("r1", inbox.subject, None, time.monotonic())
        taken_back: list[Msg] = []

        async def serve_here(msg: Msg, _flight: object) -> None:
            taken_back.append(msg)

        forwarder = Forwarder(node, "node-y", Cluster(node, "node-y", lambda: {}), inflight, stats,
                              Invocations({}, (stats,), "node-y"), serve_here)
        msg = Msg(node, subject=protocol.invoke_subject("fn"), reply=inbox.subject, data=b"{}",
                  headers=headers)
        reply = Reply(node, None, Encoding.JSON, "r1", True, get_logger(), flight)
        await asyncio.wait_for(forwarder.forward(msg, request, "peer-x", "fn", flight, reply), 20)

        chunk = await inbox.next_msg(timeout=5)
        assert json.loads(chunk.data) == {"delta": "a"} and not protocol.is_final(chunk.headers)
        final = await inbox.next_msg(timeout=5)
        assert protocol.is_final(final.headers) and final.headers[protocol.HDR_ERROR_CODE] == "503"
        assert "middle of the stream" in json.loads(final.data)["error"]["message"]
        assert taken_back == [] and inflight.get("r1") is None
    finally:
        await caller.close()
        await node.close()
        server.terminate()
        server.wait(10)
