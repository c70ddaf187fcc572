"""The wire protocol seen by a producer without our SDK (raw nats-py), and every error code:
each one is produced by a bad input or a fault, and the node keeps serving afterwards."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import msgpack
import nats
import pytest

from faas import BadRequest, Client, DeadlineExceeded, FunctionNotFound, HandlerError, Overloaded
from faas.protocol import HDR_REQUEST_ID, HDR_TIMEOUT_MS
from tests.conftest import (assert_still_serving, error_of, nodes_of, sandbox_host_pids, wait_all_gone,
                            wait_for_state, zygote_pid)


async def test_json_request_from_raw_nats_gets_json(nc):
    msg = await nc.request("faas.invoke.echo", b'{"x": 1, "y": [1, 2]}', timeout=30)
    reply = json.loads(msg.data)
    assert reply["output"] == {"echo": {"x": 1, "y": [1, 2]}, "keys": ["x", "y"]}
    assert set(reply["metrics"]) == {"request_id", "node", "queue_ms", "ttft_ms", "total_ms",
                                     "tokens_in", "tokens_out", "level", "batch"}
    assert reply["metrics"]["ttft_ms"] is None  # a plain function never generates


async def test_msgpack_request_gets_msgpack_and_request_id_is_echoed(nc):
    msg = await nc.request("faas.invoke.echo", msgpack.packb({"k": b"\x00\x01"}), timeout=30,
                           headers={HDR_REQUEST_ID: "req-42"})
    reply = msgpack.unpackb(msg.data)
    assert reply["output"]["echo"] == {"k": b"\x00\x01"}
    assert reply["metrics"]["request_id"] == "req-42"
    assert msg.headers[HDR_REQUEST_ID] == "req-42"


async def test_json_content_type_header_and_empty_body(nc):
    msg = await nc.request("faas.invoke.echo", b"", timeout=30,
                           headers={"Content-Type": "application/json"})
    assert json.loads(msg.data)["output"]["echo"] == {}


async def test_generation_metrics_over_raw_nats(nc):
    msg = await nc.request("faas.invoke.qwen-chat", b'{"prompt": "hello", "max_new_tokens": 4}',
                           timeout=120)
    metrics = json.loads(msg.data)["metrics"]
    assert metrics["tokens_out"] >= 1 and metrics["ttft_ms"] > 0


@pytest.mark.parametrize("body", [
    b"not json at all", b"[1, 2, 3]", msgpack.packb([1, 2]), b"\xc1\xff\x00",
    b"[" * 100_000 + b"]" * 100_000,          # nesting deeper than the decoder's recursion
    b"\x81\x91\x01\x01",                     # msgpack map whose key is a list
    b'{"n": ' + b"9" * 30 + b"}",             # an int msgpack cannot carry to the sandbox
], ids=["text", "json-array", "msgpack-array", "garbage", "deep", "list-key", "bigint"])
async def test_400_bad_body(nc, client, body):
    msg = await nc.request("faas.invoke.echo", body, timeout=30)
    code, message = error_of(msg)
    assert code == 400 and message
    await assert_still_serving(client)


async def test_400_bad_timeout_header(nc, client):
    msg = await nc.request("faas.invoke.echo", b"{}", timeout=30, headers={HDR_TIMEOUT_MS: "soon"})
    assert error_of(msg)[0] == 400
    await assert_still_serving(client)


async def test_404_unknown_function(nc, client):
    msg = await nc.request("faas.invoke.nope", b"{}", timeout=30)
    code, message = error_of(msg)
    assert code == 404 and "nope" in message
    with pytest.raises(FunctionNotFound):
        await client.invoke("nope", {})
    await assert_still_serving(client)


async def test_500_handler_exception_carries_type_and_message(client):
    with pytest.raises(HandlerError) as info:
        await client.invoke("boom", {"why": "testing"})
    assert info.value.code == 500
    assert info.value.message == "ValueError: bad things: testing"
    await assert_still_serving(client)


async def test_400_a_caller_mistake_in_a_lora_function_and_the_sandbox_goes_on(client):
    """The examples judge their events as a handler should: a caller's mistake is a 400."""
    with pytest.raises(BadRequest, match="non-empty 'message'"):
        await client.invoke("support", {}, timeout_s=120)
    ok = await client.invoke("support", {"message": "hi", "max_new_tokens": 2}, timeout_s=120)
    assert len(ok.output["token_ids"]) <= 2


async def test_500_crashed_sandbox_is_replaced(client):
    before = (await client.invoke("crash", {})).output["instance"]
    with pytest.raises(HandlerError, match="exited with code 3"):
        await client.invoke("crash", {"die": True})
    after = (await client.invoke("crash", {})).output["instance"]
    assert after != before
    await assert_still_serving(client)


async def test_500_unencodable_output(client):
    with pytest.raises(HandlerError, match="cannot be encoded"):
        await client.invoke("unencodable", {})
    await assert_still_serving(client)


async def test_500_reply_over_max_payload(client, nc):
    """Outputs swept across the server's limit, in steps smaller than the reply headers: each
    gets its output or a 500 naming the max payload, never silence, and the node's
    connection survives the ones that do not fit."""
    outcomes = set()
    for n in range(nc.max_payload - 400, nc.max_payload + 1, 10):
        try:
            result = await client.invoke("big", {"n": n}, timeout_s=10)
        except HandlerError as err:
            assert "max payload" in err.message
            outcomes.add("too big")
        else:
            assert len(result.output["blob"]) == n
            outcomes.add("fits")
    assert outcomes == {"fits", "too big"}
    await assert_still_serving(client)


async def test_500_huge_error_message_is_truncated_not_lost(client, nc):
    with pytest.raises(HandlerError) as info:
        await client.invoke("loud", {"n": 2 * nc.max_payload})
    assert info.value.message.startswith("ValueError: xxx")
    assert len(info.value.message) < 10_000
    await assert_still_serving(client)


async def test_500_unencodable_int_keeps_the_sandbox(client, node):
    with pytest.raises(HandlerError, match="cannot be encoded"):
        await client.invoke("huge-int", {})
    with pytest.raises(HandlerError, match="cannot be encoded"):
        await client.invoke("huge-int", {})
    (listing,) = await nodes_of(node)
    (state,) = [fn for fn in listing["functions"] if fn["name"] == "huge-int"]
    assert state["idle"] == 1  # the same sandbox answered both: it did not crash


async def test_500_sandbox_stuck_in_setup_is_killed_after_start_timeout(client, node):
    for _ in range(2):
        with pytest.raises(HandlerError, match="did not load within start_timeout_s=1.5"):
            await client.invoke("stuck-setup", {})
    (listing,) = await nodes_of(node)
    (state,) = [fn for fn in listing["functions"] if fn["name"] == "stuck-setup"]
    assert state["starting"] == 0 and state["idle"] == 0
    await assert_still_serving(client)


async def test_503_queue_full(client, node):
    """sleepy has one sandbox and max_queue=1: one runs, one waits, the third is refused."""
    await client.invoke("sleepy", {"s": 0}, timeout_s=30)  # warm: its sandbox exists
    # Long enough for the two states to be seen and the third to come while it runs.
    first = asyncio.create_task(client.invoke("sleepy", {"s": 4}, timeout_s=30))
    await wait_for_state(node, "sleepy", busy=1)
    second = asyncio.create_task(client.invoke("sleepy", {"s": 0}, timeout_s=30))
    await wait_for_state(node, "sleepy", queued=1)
    with pytest.raises(Overloaded, match="max_queue=1"):
        await client.invoke("sleepy", {"s": 0}, timeout_s=30)
    assert (await first).output["slept_s"] == 4
    assert (await second).output["slept_s"] == 0
    await assert_still_serving(client)


async def test_504_hung_sandbox_is_killed_and_replaced(client):
    instance = (await client.invoke("sleepy", {"s": 0})).output["instance"]
    with pytest.raises(DeadlineExceeded, match="in the handler"):
        await client.invoke("sleepy", {"s": 60}, timeout_s=1)
    fresh = await client.invoke("sleepy", {"s": 0}, timeout_s=30)
    assert fresh.output["instance"] != instance
    await assert_still_serving(client)


async def test_setup_runs_once_and_state_persists(client):
    first = (await client.invoke("counter", {})).output
    second = (await client.invoke("counter", {})).output
    assert second["calls"] == first["calls"] + 1
    assert first["setup_instance"] == first["instance"] == second["instance"]
    assert second["request_id"]


async def test_plain_json_error_reply_for_plain_text_body(nc):
    msg = await nc.request("faas.invoke.echo", b"hello?", timeout=30)
    assert msg.headers["Content-Type"] == "application/json"
    assert json.loads(msg.data)["error"]["code"] == 400



async def test_500_setup_failure_is_reported_on_every_request(client):
    for _ in range(2):  # each request retries the start and reports why it failed
        with pytest.raises(HandlerError, match="failed to load: RuntimeError: cannot reach"):
            await client.invoke("unready", {})
    await assert_still_serving(client)


async def test_500_handler_calling_sys_exit_reports_its_code(client):
    with pytest.raises(HandlerError, match="exited with code 7"):
        await client.invoke("crash", {"exit": 7})
    await assert_still_serving(client)


async def test_idle_sandbox_that_dies_is_dropped_at_once(client):
    """The next request gets a new sandbox (the pre-loader may have started it already),
    never the dead one."""
    first = (await client.invoke("crash", {})).output
    killed = sandbox_host_pids(first["uid"])
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    assert await asyncio.to_thread(wait_all_gone, set(killed)) == set()
    assert (await client.invoke("crash", {})).output["instance"] != first["instance"]


async def test_zygote_death_kills_its_sandboxes_and_it_is_restarted(client, node):
    first = (await client.invoke("crash", {})).output
    zygote = zygote_pid(node.proc.pid, light=True)
    killed = [zygote, *sandbox_host_pids(first["uid"])]
    os.kill(zygote, signal.SIGKILL)
    assert await asyncio.to_thread(wait_all_gone, set(killed)) == set()  # its sandboxes die with it
    again = (await client.invoke("crash", {}, timeout_s=60)).output
    assert again["instance"] != first["instance"] and zygote_pid(node.proc.pid, light=True) != zygote
    await assert_still_serving(client)


async def test_anonymous_clients_cannot_serve_or_snoop_faas_subjects(client, node):
    """Without the node's credentials a client has a producer's rights only: a rogue
    responder in the nodes' queue group is refused and never sees a request."""
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    rogue = await nats.connect(node.url, error_cb=on_error)
    try:
        stolen = await rogue.subscribe("faas.invoke.*", queue="faas-nodes")
        snoop = await rogue.subscribe(">")
        await rogue.flush()
        for i in range(20):
            assert (await client.invoke("echo", {"i": i})).output["echo"] == {"i": i}
        assert stolen.pending_msgs == 0 and snoop.pending_msgs == 0
        assert any("permissions violation" in str(e).lower() for e in errors)
    finally:
        await rogue.close()


async def test_handler_output_is_tagged_in_the_node_log(client, faas_home):
    """What a handler prints reaches the node's log as a `sandbox_output` event of its
    function, never raw on the node's stderr."""
    result = await client.invoke("counter", {})
    wanted = f"counter call {result.output['calls']} for {result.output['request_id']}"
    for _ in range(100):
        events = []
        for line in (faas_home / "node.log").read_text().splitlines():
            try:  # other processes of the node (zygote, loaders) share this file
                events.append(json.loads(line))
            except ValueError:
                continue
        if any(e.get("event") == "sandbox_output" and e.get("fn") == "counter"
               and e.get("line") == wanted for e in events):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"{wanted!r} not logged as counter's sandbox_output")
    raw = [line for line in (faas_home / "node.log").read_text().splitlines()
           if line.startswith("counter call")]
    assert raw == []


async def test_a_responder_that_never_acknowledges_gets_each_request_once(tmp_path):
    """A plain NATS service on a faas subject that answers after 5 s and sends no `Faas-Ack`:
    the client waits for it, and never sends a copy that would run the work twice."""
    import subprocess

    from faas.localnode import free_port
    from runtime.node.natsd import nats_server_binary

    port = free_port()
    server = subprocess.Popen([nats_server_binary(), "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"nats://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                responder = await nats.connect(url)
                break
            except Exception:
                await asyncio.sleep(0.1)
        received: list[str] = []

        async def answer(msg) -> None:
            await asyncio.sleep(5)
            await responder.publish(msg.reply, msgpack.packb({"output": {"seen": len(received)}}),
                                    headers={"Content-Type": "application/msgpack"})

        async def serve(msg) -> None:
            received.append(msg.headers[HDR_REQUEST_ID])
            asyncio.get_running_loop().create_task(answer(msg))

        await responder.subscribe("faas.invoke.legacy", cb=serve)
        async with Client(url) as client:
            result = await client.invoke("legacy", {"q": 1}, timeout_s=20)
            assert result.output == {"seen": 1}
            await asyncio.sleep(1.0)  # a copy sent at 3 s would have arrived by now
            assert len(received) == 1
        await responder.close()
    finally:
        server.terminate()
        server.wait(10)
