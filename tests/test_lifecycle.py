"""A node's processes: SIGTERM drains (in-flight requests answered, then everything stops);
SIGKILL of the node leaves no nats-server or sandbox behind; one embedded server per state
folder."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from bench.accounting import process_tree
from faas import Client
from faas.localnode import free_port
from tests.conftest import assert_still_serving, nodes_of, second_node, wait_all_gone
from tests.test_cli import faas


def descendants(pid: int) -> set[int]:
    return set(process_tree(pid)) - {pid}


async def test_a_second_embedded_server_on_a_state_folder_in_use_is_refused(node, client):
    """`faas demo` beside a running `faas up` started a second nats-server on the same
    JetStream store: it removed the first's message blocks (every write to the jobs' stream
    then failed: "lmb missing") and rewrote its config and node credentials."""
    credentials = (node.state_dir / "node-credentials").read_bytes()
    second = faas("up", "--port", str(free_port()), "--state-dir", str(node.state_dir))
    assert second.returncode == 1 and "in use by another node's embedded nats-server" in second.stderr, second.stderr
    assert (node.state_dir / "node-credentials").read_bytes() == credentials
    assert (await client.submit("echo", {"after": "refused"})) is not None
    await assert_still_serving(client)


@pytest.fixture
def own_node(models, faas_home, tmp_path):
    node = second_node(tmp_path)
    yield node
    node.stop()


async def test_idle_sandbox_stops_after_keep_alive_and_next_request_is_cold(models, faas_home,
                                                                            tmp_path):
    # Long enough that the first cold start (seconds, on a loaded machine) is well inside it:
    # idle time counts from the last arrival.
    keep_alive_s = 5.0
    node = second_node(tmp_path, "--sandbox-keep-alive-s", str(keep_alive_s))
    try:
        async with Client(node.url) as client:
            assert (await client.invoke("echo", {})).metrics["level"] == "cold"
            last = time.monotonic()
            assert (await client.invoke("echo", {})).metrics["level"] == "loaded"
            sandboxes = descendants(node.proc.pid)
            while True:
                [listing] = await nodes_of(node)
                echo = next(f for f in listing["functions"] if f["name"] == "echo")
                if (echo["idle"], echo["busy"]) == (0, 0):
                    break
                assert time.monotonic() - last < keep_alive_s + 20, echo
                await asyncio.sleep(0.2)
            assert time.monotonic() - last >= keep_alive_s - 0.5  # kept alive that long
            assert (await client.invoke("echo", {})).metrics["level"] == "cold"
        assert len(sandboxes - descendants(node.proc.pid)) >= 1  # the expired one is gone
    finally:
        node.stop()


async def test_sigkill_of_node_leaves_no_process(own_node):
    async with Client(own_node.url) as client:
        await client.invoke("echo", {})
        await client.invoke("qwen-chat", {"prompt": "hi", "max_new_tokens": 2}, timeout_s=120)
    children = descendants(own_node.proc.pid)
    assert len(children) >= 3  # nats-server + two sandboxes
    os.kill(own_node.proc.pid, signal.SIGKILL)
    own_node.proc.wait()
    assert wait_all_gone(children) == set()


async def test_sigterm_answers_in_flight_then_stops_everything(own_node):
    async with Client(own_node.url) as client:
        await client.invoke("sleepy", {"s": 0})
        children = descendants(own_node.proc.pid)
        in_flight = asyncio.create_task(client.invoke("sleepy", {"s": 1.5}, timeout_s=30))
        await asyncio.sleep(0.5)
        own_node.proc.send_signal(signal.SIGTERM)
        result = await in_flight
    assert result.output["slept_s"] == 1.5
    assert await asyncio.to_thread(own_node.proc.wait, 30) == 0
    assert wait_all_gone(children) == set()
