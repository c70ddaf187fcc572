"""The synchronous client (scripts, notebooks) and `Client.map`, against the session node."""

from __future__ import annotations

import asyncio

import pytest

from faas import Client, FaasError, HandlerError, Invocation, SyncClient
from tests.conftest import wait_for_state


async def test_map_keeps_order_and_reports_each_error_in_its_place(node):
    events = [{"n": i} if i != 2 else {"why": "item 2"} for i in range(6)]
    async with Client(node.url) as client:
        echoes = await client.map("echo", events, concurrency=2)
        assert [r.output["echo"] for r in echoes] == events
        mixed = await client.map("boom", [{"why": "a"}, {"why": "b"}], concurrency=5)
        assert [type(r) for r in mixed] == [HandlerError, HandlerError]
        assert "bad things: a" in mixed[0].message and "bad things: b" in mixed[1].message
        assert await client.map("echo", []) == []
        with pytest.raises(ValueError, match="concurrency"):
            await client.map("echo", [{}], concurrency=0)


def test_the_sync_client_invokes_maps_publishes_and_streams(node, client):
    with SyncClient(node.url) as sync:
        result = sync.invoke("echo", {"text": "hi"})
        assert isinstance(result, Invocation) and result.output["echo"] == {"text": "hi"}
        with pytest.raises(FaasError) as raised:
            sync.invoke("no-such-function", {})
        assert raised.value.code == 404
        with pytest.raises(HandlerError, match="invalid literal"):
            sync.invoke("writer", {"prompt": "x", "max_new_tokens": "many"})
        assert sync.publish("events.tally.sync", {"n": 1, "run": "sync"}) > 0
        results = sync.map("echo", [{"i": i} for i in range(4)], concurrency=2)
        assert [r.output["echo"]["i"] for r in results] == [0, 1, 2, 3]
        event = {"prompt": "Hello", "max_new_tokens": 12, "ignore_eos": True}
        chunks = list(sync.stream("writer", event))
        assert len(chunks) > 1 and "".join(c.delta for c in chunks) == sync.invoke("writer", event).output["text"]
    with pytest.raises(FaasError, match="closed"):
        sync.invoke("echo", {})
    sync.close()  # a second close does nothing


async def test_the_sync_client_works_where_an_event_loop_already_runs(node):
    """As in a notebook: called from a thread whose loop is running."""
    assert asyncio.get_running_loop().is_running()
    with SyncClient(node.url) as sync:
        assert sync.invoke("echo", {"in": "a loop"}).output["echo"] == {"in": "a loop"}


async def test_leaving_a_stream_early_cancels_the_request(node):
    with SyncClient(node.url) as sync:
        stream = sync.stream("writer", {"prompt": "Hello", "max_new_tokens": 1000, "ignore_eos": True})
        assert next(stream).token_ids
        stream.close()
        # 1000 tokens take several seconds here: the node heard the cancel and the row stopped.
        await wait_for_state(node, "writer", active=0)


def test_a_sync_client_without_a_server_says_so():
    with pytest.raises(FaasError, match="cannot connect to NATS"):
        SyncClient("nats://127.0.0.1:1")
