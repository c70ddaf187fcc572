"""Event triggers with a real nats-server: every event published is processed at least once,
failures are retried with a growing delay and end as dead letters, slow handlers are not
redelivered, and a node killed mid-stream loses nothing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import httpx
import msgpack
import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from faas import Client
from faas.protocol import HDR_MSG_ID
from faas.top import answers
from tests.conftest import nodes_of


async def _admin(node) -> nats.NATS:
    """A connection with the node's credentials (reads the outcome streams)."""
    return await nats.connect(node.url, **node.node_credentials())


async def _outcomes(node, subject: str, run: str, want: int, timeout_s: float, until=None) -> list[dict]:
    """`_collect` on a connection of its own."""
    admin = await _admin(node)
    try:
        return await _collect(admin, subject, run, want, timeout_s, until)
    finally:
        await admin.drain()


def _kill(node) -> None:
    """SIGKILL the node (its server and sandboxes die with it) and wait for it."""
    os.kill(node.proc.pid, signal.SIGKILL)
    node.proc.wait()


async def _collect(nc: nats.NATS, subject: str, run: str, want: int, timeout_s: float,
                   until=None) -> list[dict]:
    """The messages on an outcome subject that belong to this run, until `want` of them (or
    `until(found)`), or the timeout."""
    js = nc.jetstream()
    sub = await js.subscribe(subject, ordered_consumer=True)
    found: list[dict] = []
    deadline = time.monotonic() + timeout_s
    done = until or (lambda found: len(found) >= want)
    try:
        while not done(found) and time.monotonic() < deadline:
            try:
                msg = await sub.next_msg(timeout=max(0.1, deadline - time.monotonic()))
            except nats.errors.TimeoutError:
                break
            body = msgpack.unpackb(msg.data, raw=False)
            try:
                event = body.get("output") or msgpack.unpackb(body.get("data") or b"\x80", raw=False)
            except (ValueError, msgpack.UnpackException):  # a letter of bytes that never decoded
                event = None
            if (event or {}).get("run") == run or run in str(body.get("error", "")):
                found.append(body)
    finally:
        await sub.unsubscribe()
    return found


async def _counted(node, function: str, until=None, timeout_s: float = 30) -> tuple[dict, float]:
    """The node's stats of `function` (`faas ls`; the same numbers as `faas top` reads from
    $SRV.STATS, checked equal) and its answered count in Prometheus; with `until`, once
    `until(stats)` holds. A success is counted just after its outcome is out (a reply, a
    result, an ack), a failure just before: a test that has seen a success waits for its
    count."""
    deadline = time.monotonic() + timeout_s
    while True:
        [stats] = [f["stats"] for n in await nodes_of(node) for f in n["functions"] if f["name"] == function]
        if until is None or until(stats):
            break
        assert time.monotonic() < deadline, f"{function}'s stats never got there: {stats}"
        await asyncio.sleep(0.1)
    nc = await nats.connect(node.url)
    try:
        [top] = [e["data"]["functions"][function] for a in await answers(nc, "STATS", 1.0)
                 for e in a["endpoints"] if function in e["data"]["functions"]]
    finally:
        await nc.close()
    assert (top["requests"], top["errors_by_code"]) == (stats["requests"], stats["errors_by_code"])
    async with httpx.AsyncClient() as http:
        text = (await http.get(node.metrics_url)).text
    answered = sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
                   if s.name == "faas_requests_total" and s.labels.get("function") == function
                   and s.labels.get("code") == "200")
    return stats, answered


async def test_events_published_by_raw_nats_are_all_processed(node):
    """Thirty events from a producer without credentials are each processed, and each counts
    in the node's stats and metrics as a request does."""
    run = uuid.uuid4().hex
    stats, answered = await _counted(node, "tally")
    producer = await nats.connect(node.url)  # no credentials: a producer's rights
    js = producer.jetstream()
    for n in range(30):
        await js.publish(f"events.tally.{n % 3}", msgpack.packb({"n": n, "run": run}),
                         headers={HDR_MSG_ID: f"{run}-{n}"})
    await producer.drain()
    results = await _outcomes(node, "faas.results.tally", run, 30, 60)
    outputs = [r["output"] for r in results]
    assert sorted(o["n"] for o in outputs) == list(range(30))
    assert {o["msg_id"] for o in outputs} == {f"{run}-{n}" for n in range(30)}
    assert all(o["subject"].startswith("events.tally.") and o["sequence"] > 0 for o in outputs)
    stats_after, answered_after = await _counted(node, "tally", lambda s: s["requests"] >= stats["requests"] + 30)
    assert stats_after["requests"] == stats["requests"] + 30
    assert answered_after == answered + 30
    assert stats_after["latency_p50_ms"] is not None


async def test_a_fetch_answered_late_is_an_empty_batch_not_the_end_of_the_loop(node):
    """nats-py raises asyncio's TimeoutError, none of its own errors, when its no-wait probe
    is answered after the fetch's deadline (a loaded machine): the node's fetch loops (events,
    async jobs) caught only nats-py's errors and ended, and fetched nothing again."""
    from faas.logs import get_logger
    from runtime.node.pull import fetch

    admin = await _admin(node)
    js = admin.jetstream()
    stream = f"PROBE_{uuid.uuid4().hex[:8]}"
    log = get_logger(component="test")
    try:
        await js.add_stream(name=stream, subjects=[f"probe.{stream}"])
        psub = await js.pull_subscribe(f"probe.{stream}", durable="late", stream=stream)
        # The event loop busy past the fetch's one-second deadline once it has asked.
        asyncio.get_running_loop().call_soon(time.sleep, 1.5)
        assert await fetch(psub, 4, log, "probe") == []
        await js.publish(f"probe.{stream}", b"after")
        assert [msg.data for msg in await fetch(psub, 4, log, "probe")] == [b"after"]
    finally:
        await js.delete_stream(stream)
        await admin.drain()


async def test_client_publish_sets_a_msg_id_that_deduplicates(node):
    run = uuid.uuid4().hex
    async with Client(node.url) as client:
        first = await client.publish("events.tally.sdk", {"n": 1, "run": run}, msg_id=f"{run}-once")
        again = await client.publish("events.tally.sdk", {"n": 1, "run": run}, msg_id=f"{run}-once")
        assert first == again  # the stream kept one copy
    results = await _outcomes(node, "faas.results.tally", run, 2, 5)
    assert len(results) == 1 and results[0]["output"]["msg_id"] == f"{run}-once"


async def test_a_poison_event_ends_in_the_dead_letters_while_the_others_flow(node):
    run = uuid.uuid4().hex
    stats, _ = await _counted(node, "picky")
    started = time.monotonic()
    async with Client(node.url) as client:
        for n in range(6):
            await client.publish("events.picky", {"n": n, "run": run, "poison": n == 2})
    results = await _outcomes(node, "faas.results.picky", run, 5, 30)
    letters = await _outcomes(node, "faas.dlq.picky", run, 1, 30)
    assert sorted(r["output"]["n"] for r in results) == [0, 1, 3, 4, 5]
    assert all(r["output"]["delivered"] == 1 for r in results)
    [letter] = letters
    assert letter["event"]["delivered"] == 3  # picky's max_deliver
    assert letter["error"]["code"] == 500 and "cannot digest event 2" in letter["error"]["message"]
    assert msgpack.unpackb(letter["data"])["poison"] is True  # the event itself, to replay
    assert time.monotonic() - started >= 3.0  # naks waited 1 s, then 2 s: not a hot loop
    errors = stats["errors_by_code"].get("500", 0) + 3  # each failed attempt is an error
    stats_after, _ = await _counted(node, "picky", lambda s: s["errors_by_code"].get("500", 0) >= errors)
    assert stats_after["errors_by_code"].get("500", 0) == errors

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "faas.cli", "events", "--nats", node.url,
                               "--state-dir", str(node.state_dir), *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    [row] = [r for r in json.loads(cli("--json")) if r["function"] == "picky"]
    assert row["triggers"] == ["events.picky"] and row["dead_letters"] >= 1
    listed = [x for x in json.loads(cli("dlq", "picky", "--json")) if "cannot digest event 2" in
              x["error"]["message"] and x["event"]["sequence"] == letter["event"]["sequence"]]
    assert len(listed) == 1
    assert "replayed" in cli("replay", "picky", str(listed[0]["seq"]))
    again = await _outcomes(node, "faas.dlq.picky", run, 2, 30)
    assert len(again) == 2 and again[1]["event"]["sequence"] != letter["event"]["sequence"]


async def test_an_event_that_does_not_decode_is_a_dead_letter_and_a_400_in_the_stats(node):
    garbage = b"\xc1 " + uuid.uuid4().hex.encode()  # neither msgpack nor JSON
    stats, _ = await _counted(node, "picky")
    producer = await nats.connect(node.url)
    await producer.jetstream().publish("events.picky", garbage)
    await producer.drain()
    refused = stats["errors_by_code"].get("400", 0)
    await _counted(node, "picky", lambda s: s["errors_by_code"].get("400", 0) > refused)
    admin = await _admin(node)
    deadline = time.monotonic() + 30
    try:  # a refusal is counted just before its dead letter is out
        while (letter := msgpack.unpackb((await admin.jetstream().get_last_msg(
                "FAAS_OUTCOMES", "faas.dlq.picky")).data, raw=False))["data"] != garbage:
            assert time.monotonic() < deadline, "the undecodable event has no dead letter"
            await asyncio.sleep(0.1)
    finally:
        await admin.drain()
    assert letter["error"]["code"] == 400


async def test_an_event_the_handler_refuses_as_bad_is_a_dead_letter_at_once(node):
    run = uuid.uuid4().hex
    async with Client(node.url) as client:
        await client.publish("events.picky", {"n": 7, "run": run, "invalid": True})
    [letter] = await _outcomes(node, "faas.dlq.picky", run, 1, 30)
    assert letter["event"]["delivered"] == 1  # not picky's 3
    assert letter["error"]["code"] == 400 and "refusing event 7" in letter["error"]["message"]


async def test_a_slow_handler_is_not_redelivered_and_a_killed_node_loses_nothing(models, tmp_path):
    """ack wait 1 s, handlers of 0.3-3 s: in-progress acks keep each event with its handler.
    Then SIGKILL mid-stream: the node that comes back on the same server processes every
    event at least once (the one in flight again, after the ack wait)."""
    from tests.conftest import second_node

    node = second_node(tmp_path, "--event-ack-wait-s", "1")
    run = uuid.uuid4().hex
    try:
        async with Client(node.url) as client:
            await client.publish("events.slow", {"n": -1, "run": run, "s": 3})
            for n in range(12):
                await client.publish("events.slow", {"n": n, "run": run, "s": 0.3})
        first = await _outcomes(node, "faas.results.slowpoke", run, 4, 60)
        assert [r["output"]["n"] for r in first[:1]] == [-1]
        assert first[0]["output"]["delivered"] == 1  # 3 s handler, 1 s ack wait: kept
        _kill(node)
    finally:
        node.stop()
    node = second_node(tmp_path, "--event-ack-wait-s", "1")
    try:
        every = set(range(-1, 12))
        results = await _outcomes(node, "faas.results.slowpoke", run, 0, 60, until=lambda found: {
            r["output"]["n"] for r in found} >= every)
        seen = [r["output"]["n"] for r in results]
        assert set(seen) == every  # every event, at least once
        assert len(seen) - len(set(seen)) <= 2  # duplicates: at most what was in flight
    finally:
        node.stop()


async def test_an_event_whose_last_attempt_died_with_its_node_ends_in_the_dead_letters(models, tmp_path):
    """lastchance has one attempt (max_deliver=1); its node is SIGKILLed during it. The node
    that comes back gets the event once more (the consumer allows one delivery beyond the
    function's) and sends it to the dead letters instead of running it again."""
    from tests.conftest import second_node

    run = uuid.uuid4().hex
    node = second_node(tmp_path, "--event-ack-wait-s", "1")
    try:
        async with Client(node.url) as client:
            await client.publish("events.lastchance", {"n": 1, "run": run, "s": 20})
        for _ in range(200):  # its handler is running
            async with Client(node.url) as client:
                [listing] = await nodes_of(node)
            if [f for f in listing["functions"] if f["name"] == "lastchance" and f["busy"]]:
                break
            await asyncio.sleep(0.05)
        _kill(node)
    finally:
        node.stop()
    node = second_node(tmp_path, "--event-ack-wait-s", "1")
    try:
        [letter] = await _outcomes(node, "faas.dlq.lastchance", run, 1, 30)
        assert letter["event"]["delivered"] == 2
        assert "went away" in letter["error"]["message"]
    finally:
        node.stop()


@pytest.mark.parametrize("subject", ["events.a b", "events..x", "events.>.x", "events.a*"])
def test_a_trigger_that_is_not_a_subject_is_refused(subject):
    from faas import SpecError, function

    with pytest.raises(SpecError, match="not a NATS subject"):
        function(name="bad", triggers=[subject])(lambda event, ctx: None)
