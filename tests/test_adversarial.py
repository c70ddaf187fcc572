"""Hostile producers and hostile functions against a real node (the session's: embedded
nats-server, as root where the suite runs as root). Each finding of the adversarial review is
attacked here and shown harmless: the node stays connected and serves, no bucket or stream
changes, no foreign data is received, errors are coded replies."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import msgpack
import nats
import nats.errors
import nats.js.errors
import pytest

from faas import BadRequest, Cancelled, Client, HandlerError, Overloaded, protocol
from faas.protocol import HDR_REQUEST_ID, HDR_REQUEST_KEY, HDR_RETRY
from tests.conftest import assert_still_serving, error_of, nodes_of, second_node, uid_range

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="a node that is not root isolates nothing")

def faas_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "faas.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
async def operator(node):
    """A connection with the node's own login: what an operator (or a node) may do."""
    nc = await nats.connect(node.url, **node.node_credentials())
    yield nc
    await nc.drain()


@pytest.fixture
async def target(operator):
    """A key the attacks aim at (as they could at a function's in faas_functions): its value
    and revision must not change. Its subject: `$KV.adversarial_target.<key>`."""
    kv = await operator.jetstream().create_key_value(bucket="adversarial_target", history=10)
    key = uuid.uuid4().hex
    revision = await kv.put(key, b"untouched")
    yield kv, key, revision


def aimed_at(target) -> str:
    return f"$KV.adversarial_target.{target[1]}"


async def assert_untouched(target) -> None:
    kv, key, revision = target
    entry = await kv.get(key)
    assert (entry.value, entry.revision) == (b"untouched", revision)


# --- 1. one oversized header disconnected a node ---------------------------------------------

@pytest.mark.parametrize("request_id", ["max", "x" * 65, "has space", "dot.ted", "*", "\u00fcml"],
                         ids=["max", "65", "space", "dot", "wildcard", "unicode"])
async def test_a_bad_request_id_gets_a_400_without_being_echoed(nc, client, request_id):
    """`max`: an id that just fits in a request; echoed into a reply it would not."""
    if request_id == "max":
        request_id = "x" * (nc.max_payload - 200)
    msg = await nc.request("faas.invoke.echo", b"{}", timeout=30, headers={HDR_REQUEST_ID: request_id})
    code, message = error_of(msg)
    assert code == 400 and (HDR_REQUEST_ID in message or "4096" in message), message
    assert msg.headers[HDR_REQUEST_ID] != request_id and len(msg.headers[HDR_REQUEST_ID]) <= 64
    await assert_still_serving(client)


async def test_headers_beyond_4_kib_get_a_400(nc, client):
    headers = {f"X-Junk-{i}": "y" * 200 for i in range(30)}
    code, message = error_of(await nc.request("faas.invoke.echo", b"{}", timeout=30, headers=headers))
    assert code == 400 and "4096" in message
    await assert_still_serving(client)


@pytest.mark.parametrize("headers", [
    {HDR_REQUEST_KEY: "too-short"}, {HDR_REQUEST_KEY: "\u00e9" * 20}, {HDR_REQUEST_KEY: "k" * 129},
    {HDR_RETRY: "again"}, {HDR_RETRY: "9" * 20}, {protocol.HDR_TIMEOUT_MS: "nan"},
    {protocol.HDR_DEADLINE_MS: "1e400"}], ids=["key-short", "key-unicode", "key-long", "retry-word",
                                              "retry-long", "timeout-nan", "deadline-inf"])
async def test_malformed_control_headers_get_a_400(nc, client, headers):
    code, _ = error_of(await nc.request("faas.invoke.echo", b"{}", timeout=30, headers=headers))
    assert code == 400
    await assert_still_serving(client)


async def test_a_header_as_large_as_a_message_on_micro_discovery_is_not_echoed(nc, client, node):
    """nats.micro put every request header into its answer: one such request took every
    node of a cluster off NATS at once."""
    for verb in ("PING", "INFO", "STATS"):
        reply = await nc.request(f"$SRV.{verb}.{protocol.SERVICE_NAME}", b"", timeout=10,
                                 headers={"X-Big": "z" * (nc.max_payload - 200)})
        assert json.loads(reply.data)["metadata"]["node"] == node.node_id
        assert not reply.headers or "X-Big" not in reply.headers
    await assert_still_serving(client)


async def test_a_node_whose_connection_is_closed_exits_non_zero(models, tmp_path, faas_home):
    """A revoked login: the server closes the node's connection and nats-py does not
    reconnect. The node exits with an error for its supervisor to restart it, instead of
    living on deaf. (At start it also removed the files of a node on this host that died
    before it could.)"""
    orphan = faas_home / "deployed" / "killed-node"
    (orphan / "fn").mkdir(parents=True)
    (faas_home / "deployed" / "killed-node.lock").touch()
    node = second_node(tmp_path, "--ack-every-s", "0.5")
    try:
        assert not orphan.exists()
        # Meanwhile: a request that asked for acknowledgements is acknowledged again while it
        # runs (what keeps its route through the producers' account alive).
        async with Client(node.url) as producer:
            inbox = producer.nc.new_inbox()
            sub = await producer.nc.subscribe(inbox)
            await producer.nc.publish("faas.invoke.sleepy", b'{"s": 2}', reply=inbox,
                                      headers={protocol.HDR_ACK: "true", "Content-Type": "application/json"})
            acks = 0
            while (msg := await sub.next_msg(timeout=30)).headers.get(protocol.HDR_ACK) and not msg.data:
                acks += 1
            assert json.loads(msg.data)["output"]["slept_s"] == 2 and acks >= 3
        config = tmp_path / "nats" / "nats-server.conf"
        settings = json.loads(config.read_text())
        settings["accounts"]["FAAS"]["users"][0]["password"] = "revoked"
        config.write_text(json.dumps(settings))
        (ports,) = (tmp_path / "nats").glob("nats-server_*.ports")
        os.kill(int(ports.stem.rsplit("_", 1)[1]), signal.SIGHUP)  # reload: the login is gone
        assert node.proc.wait(15) != 0
    finally:
        node.stop()


async def _raw_publish(url: str, subject: bytes, payload: bytes) -> None:
    """A publish straight on the wire (no client library would send such a subject)."""
    host, port = url.removeprefix("nats://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        await reader.readline()  # INFO
        writer.write(b'CONNECT {"verbose":false,"pedantic":false}\r\n'
                     + b"PUB " + subject + b" " + str(len(payload)).encode() + b"\r\n" + payload
                     + b"\r\nPING\r\n")
        await writer.drain()
        assert (await reader.readline()).startswith(b"PONG")
    finally:
        writer.close()


async def test_subjects_that_are_not_utf8_do_not_deafen_the_node(node, client, operator):
    """nats-py stopped reading at such a subject (every node hears cancels: one message took
    them all off NATS), and an event stored under one did it again at every restart."""
    run = uuid.uuid4().hex
    results = await operator.jetstream().subscribe("faas.results.tally", ordered_consumer=True,
                                                   deliver_policy=nats.js.api.DeliverPolicy.NEW)
    for subject in (b"faas.invoke.\xff", b"faas.cancel.\xc3", b"events.tally.\xff"):
        await _raw_publish(node.url, subject, json.dumps({"n": 1, "run": run}).encode())
    await assert_still_serving(client)
    while (result := msgpack.unpackb((await results.next_msg(timeout=30)).data))["output"]["run"] != run:
        pass
    assert result["output"]["subject"] == "events.tally.\ufffd"  # served, and acknowledged
    await results.unsubscribe()
    await assert_still_serving(client)


# --- 2. reply subjects and echoed headers wrote JetStream ------------------------------------

PURGE = {"KV-Operation": "PURGE", "Nats-Rollup": "sub"}


@pytest.mark.parametrize("subject", [
    "$SRV.PING.faas-node", "$SRV.INFO.faas-node", "$SRV.STATS.faas-node", "$SRV.PING",
    "faas.admin.ls", "faas.invoke.echo", "NODE.status", "NODE.ping"])
async def test_no_node_answer_goes_into_a_reserved_subject(operator, target, node, client, subject):
    """Aimed from inside the nodes' own account (as on a server with one account for all):
    the node must refuse the reply subject itself, for every subject it answers on."""
    subject = subject.replace("NODE", f"faas.node.{node.node_id}")
    await operator.publish(subject, b"{}", reply=aimed_at(target), headers=PURGE)
    await operator.publish(subject, b"{}", reply="faas.dlq.echo", headers=PURGE)
    await operator.flush()
    await asyncio.sleep(0.3)
    await assert_untouched(target)
    info = await operator.jetstream().stream_info(protocol.OUTCOMES_STREAM, subjects_filter="faas.dlq.echo")
    assert not (info.state.subjects or {}).get("faas.dlq.echo")
    await assert_still_serving(client)


async def test_a_producer_cannot_aim_any_reply_into_the_nodes_account(nc, target, client):
    """A producer's reply subjects are mapped into its own account: neither a node's answer
    nor JetStream's publish acknowledgement can land in a bucket."""
    await nc.publish("$SRV.PING.faas-node", b"", reply=aimed_at(target), headers=PURGE)
    await nc.publish("events.adversarial.aim", b"{}", reply=aimed_at(target))
    await nc.publish("faas.invoke.echo", b"{}", reply=aimed_at(target), headers=PURGE)
    await nc.flush()
    await asyncio.sleep(0.3)
    await assert_untouched(target)
    await assert_still_serving(client)


async def test_readers_of_streams_survive_junk(operator, node, client):
    """Dead letters, history and logs that are not what nodes write are skipped."""
    js = operator.jetstream()
    for junk in (b"\xc1not msgpack", msgpack.packb([1, 2]), msgpack.packb({"event": "x"}), b""):
        await js.publish("faas.dlq.junk-target", junk)
        await js.publish("faas.history.echo", junk)
        await js.publish("faas.logs.echo", junk + b"{[")
        await js.publish(f"$KV.{protocol.NODES_BUCKET}.junk-node", junk + b'{"functions": [1]}')
    # A letter of the right shape naming a subject no event belongs on: never replayed there.
    await js.publish("faas.dlq.junk-target", msgpack.packb({
        "event": {"subject": f"$JS.API.STREAM.DELETE.{protocol.EVENTS_STREAM}"},
        "error": {"message": "forged"}, "data": b"{}", "headers": {}}))
    state = ("--state-dir", str(node.state_dir), "--nats", node.url)
    dlq = faas_cli("events", "dlq", "junk-target", "--json", *state)
    assert dlq.returncode == 0, dlq.stderr
    (forged,) = json.loads(dlq.stdout)
    replay = faas_cli("events", "replay", "junk-target", str(forged["seq"]), *state)
    assert replay.returncode == 1 and "not replayed there" in replay.stderr, replay.stderr
    await js.stream_info(protocol.EVENTS_STREAM)  # still there
    assert faas_cli("events", *state).returncode == 0
    await client.invoke("echo", {"logged": True})
    logs = faas_cli("logs", "echo", "--json", *state)
    assert logs.returncode == 0, logs.stderr
    assert faas_cli("top", "--once", "--nats", node.url).returncode == 0
    await assert_still_serving(client)  # a cold peer's junk state is not a place to forward to


# --- 3. anonymous _INBOX.> subscribers saw the node's own traffic -----------------------------

async def test_an_inbox_snooper_sees_only_its_own_replies(node, client, nc):
    snooper = await nats.connect(node.url)
    try:
        everything = await snooper.subscribe("_INBOX.>")
        await snooper.flush()
        # Node traffic meanwhile: history records (its ordered consumer), KV warm state,
        # listings through the operator's account.
        for i in range(5):
            await client.invoke("echo", {"i": i})
        await nodes_of(node)
        await asyncio.sleep(2.5)
        seen = []
        while True:
            try:
                seen.append(await everything.next_msg(timeout=0.1))
            except nats.errors.TimeoutError:
                break
        own = await snooper.request("faas.invoke.echo", b"{}", timeout=10)
        assert json.loads(own.data)["output"]["echo"] == {}
        # Other producers' replies share this account (see the threat model); the nodes'
        # JetStream, KV and object store traffic never does.
        node_traffic = [m for m in seen if m.headers and any(h.startswith("Nats-") for h in m.headers)
                        or m.subject.startswith(protocol.NODE_INBOX_PREFIX)
                        or (m.reply or "").startswith("$JS")]
        assert node_traffic == []
    finally:
        await snooper.close()


async def test_producers_may_not_list_the_nodes(nc):
    """`faas.admin.ls` names paths: an operator's view only."""
    with pytest.raises(nats.errors.Error):
        await nc.request(protocol.ADMIN_LS_SUBJECT, b"", timeout=1)


# --- 4. a request id is not a capability ------------------------------------------------------

async def _event_request_id(operator, run: str) -> str:
    """The request id the `eventid` event of `run` runs under, from its log line."""
    lines = await operator.subscribe("faas.logs.eventid")
    try:
        while True:
            record = json.loads((await lines.next_msg(timeout=30)).data)
            if f"event {run} runs as" in record["line"]:
                return record["line"].rsplit(" ", 1)[1]
    finally:
        await lines.unsubscribe()


async def test_a_producer_cannot_take_or_cancel_an_events_request(operator, client, nc):
    run = uuid.uuid4().hex
    results = await operator.jetstream().subscribe("faas.results.eventid", ordered_consumer=True,
                                                   deliver_policy=nats.js.api.DeliverPolicy.NEW)
    learned = asyncio.create_task(_event_request_id(operator, run))
    await asyncio.sleep(0.2)
    await client.publish("events.adversarial.id", {"run": run, "s": 2})
    request_id = await learned
    assert request_id.isalnum() and len(request_id) >= 32  # unguessable: not its sequence
    with pytest.raises(BadRequest, match="already in flight"):
        await client.invoke("eventid", {"run": "thief"}, request_id=request_id, timeout_s=10)
    await nc.publish(protocol.cancel_subject(request_id), b"")
    await nc.publish(protocol.cancel_subject(request_id), b"", headers={HDR_REQUEST_KEY: "g" * 32})
    while True:
        result = msgpack.unpackb((await results.next_msg(timeout=30)).data)
        if result["output"]["run"] == run:
            break
    assert result["output"]["request_id"] == request_id  # it ran to its end, uncancelled
    await results.unsubscribe()


async def test_cancel_and_retry_act_only_with_the_callers_key(client, nc):
    """Knowing a request's id, an attacker can neither stop it nor move its reply to itself;
    the caller, with its key, can cancel it."""
    victim = asyncio.create_task(client.invoke(
        "writer", {"prompt": "hello", "max_new_tokens": 400, "ignore_eos": True},
        timeout_s=60, request_id="victim-1"))
    await asyncio.sleep(0.3)
    assert not protocol.same_key("k" * 32, "\u00e9" * 20)  # compared, not raised on
    for key in (None, "guess" * 8, "\u00e9" * 20, "k" * 3000):  # none, wrong, not ASCII, huge
        await nc.publish(protocol.cancel_subject("victim-1"), b"",
                         headers={HDR_REQUEST_KEY: key} if key else None)
    stolen = await nc.request("faas.invoke.writer", b"{}", timeout=10,
                              headers={HDR_REQUEST_ID: "victim-1", HDR_RETRY: "1",
                                       HDR_REQUEST_KEY: "guess" * 8})
    code, message = error_of(stolen)
    assert code == 400 and "already in flight" in message
    assert len((await victim).output["token_ids"]) == 400
    mine = asyncio.create_task(client.invoke(
        "writer", {"prompt": "hello", "max_new_tokens": 1000, "ignore_eos": True}, timeout_s=60,
        request_id="victim-2"))
    await asyncio.sleep(0.5)
    await client.cancel("victim-2")
    with pytest.raises(Cancelled):
        await mine


# --- 5 and 8. a deploy ran the files with the deployer's rights --------------------------------

SNOOP = '''
import json, os, socket
from faas import function

def _try(action):
    try:
        return "ALLOWED: " + str(action())[:40]
    except Exception as exc:
        return "blocked: " + type(exc).__name__

raise RuntimeError("found " + json.dumps({{
    "env": os.environ.get("FAAS_NATS_PASSWORD") or os.environ.get("DEPLOYER_SECRET") or "none",
    "credentials": _try(lambda: open({credentials!r}).read()),
    "network": _try(lambda: socket.create_connection(("127.0.0.1", {port}), timeout=2)),
}}))
'''


def _snoop(node, folder: Path) -> Path:
    folder.mkdir()
    (folder / "snoop.py").write_text(SNOOP.format(
        credentials=str(node.state_dir / "node-credentials"), port=int(node.url.rsplit(":", 1)[1])))
    return folder


def _found(message: str) -> dict:
    found = json.loads(message.split("found ", 1)[1])
    assert found["env"] == "none", found
    assert found["credentials"].startswith("blocked") and found["network"].startswith("blocked"), found
    return found


@ROOT_ONLY
def test_deploy_imports_files_without_credentials_environment_or_network(node, tmp_path):
    folder = _snoop(node, tmp_path / "snoop")
    out = faas_cli("deploy", str(folder), "--nats", node.url, "--state-dir", str(node.state_dir),
                   env={"DEPLOYER_SECRET": "top-secret"})
    assert out.returncode == 1 and "warning" not in out.stderr, out.stderr
    (failure,) = [line for line in out.stderr.splitlines() if line.startswith("error")]
    _found(failure)


async def test_a_deployer_that_is_not_root_imports_in_a_user_namespace(node, tmp_path, monkeypatch):
    """What `faas deploy` does for a user: the same walls, from a user namespace."""
    from runtime.functions.catalog import discover_file
    from runtime.proc.isolation import Isolation

    monkeypatch.setenv("DEPLOYER_SECRET", "top-secret")
    folder = _snoop(node, tmp_path / "snoop")
    isolation = Isolation(rootless=True, network=True, expose=(str(folder),), hide=(str(node.state_dir),))
    with pytest.raises(Exception) as failure:
        await discover_file(folder / "snoop.py", isolation)
    _found(str(failure.value))


def test_deploy_refuses_links_out_of_the_folder(node, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.py").write_text("SECRET = 'the deployer machine'\n")
    folder = tmp_path / "fn"
    folder.mkdir()
    (folder / "fn.py").write_text("from faas import function\n\n@function(name='linked')\n"
                                  "def linked(event, ctx):\n    return {}\n")
    (folder / "helper.py").symlink_to(outside / "secret.py")
    out = faas_cli("deploy", str(folder), "--nats", node.url, "--state-dir", str(node.state_dir))
    assert out.returncode == 1 and "links outside" in out.stderr, out.stderr


async def test_discovery_runs_with_the_allowed_environment_and_its_own_uid(client, node, faas_home):
    """The session node has a secret in its environment: its discovery did not see it (the
    function it declares is named for that), and it ran under a uid no loader uses."""
    assert (await client.invoke("discovery-clean", {})).output == {"saw": "clean"}
    served = {f["name"] for n in await nodes_of(node) for f in n["functions"]}
    assert "discovery-saw-secret" not in served
    if os.geteuid() == 0:
        lines = [json.loads(line) for line in (faas_home / "node.log").read_text().splitlines()
                 if '"helper_output"' in line and "hostile.py imported by uid" in line]
        discovery_uid = uid_range(faas_home / "node.log")[1] + 1
        assert {line["line"] for line in lines} == {f"hostile.py imported by uid {discovery_uid}"}


# --- 6. the GPU weight checksum missed permutations ---------------------------------------------

def test_weight_digests_see_swapped_rows():
    """What a GPU backbone checks its weights with, on the CPU (the CUDA run is tests/test_gpu.py)."""
    import torch

    from runtime.backbone.weights import corrupted, digest

    lm_head = torch.randn(64, 32, dtype=torch.bfloat16)
    baseline = {"lm_head": digest(lm_head)}
    lm_head[[3, 40]] = lm_head[[40, 3]]
    assert corrupted({"lm_head": lm_head}, baseline) == ["lm_head"]


# --- 7. a function reported fake memory and prefill times ---------------------------------------

async def test_a_functions_claims_about_itself_are_not_believed(client, node):
    assert (await client.invoke("liar", {})).output == {"ok": True}
    (listing,) = await nodes_of(node)
    liar = next(f for f in listing["functions"] if f["name"] == "liar")
    held = listing["memory"]["held_mib"]
    assert held["host"] < 16 << 10 and held["device"] == 0, listing["memory"]
    assert liar["window"]["t0_ms"] <= 5000 and liar["window"]["per_extra_ms"] <= 5000
    # Others still start cold: nothing made the node think it was full.
    assert (await client.invoke("discovery-clean", {})).output == {"saw": "clean"}
    await assert_still_serving(client)


async def test_a_sandbox_whose_frames_break_the_protocol_is_killed(client):
    """A step answered with another level than asked; a result whose fields are malformed
    (the node would have used them: a TTFT of "yesterday")."""
    with pytest.raises(HandlerError, match="another level"):
        await client.invoke("misleveled", {}, timeout_s=30)
    with pytest.raises(HandlerError, match="exited"):
        await client.invoke("garbler", {}, timeout_s=30)
    await assert_still_serving(client)


async def test_a_relayed_retry_hint_is_held_to_a_sane_range(client):
    """A sandbox answers 503 with a retry hint that is no number, negative, NaN, infinite or
    a year: the caller gets the 503 with a hint between 0.1 s and a minute, and the sandbox
    keeps serving (a bad hint is not worth a kill)."""
    from faas import Overloaded

    for hint, expected in (("nan", 1.0), ("inf", 1.0), ("huge", 1.0), ("year", 60.0),
                           ("negative", 1.0), ("text", 1.0), ("true", 1.0)):
        with pytest.raises(Overloaded, match="busy") as refused:
            await client.invoke("hinter", {"hint": hint}, timeout_s=30)
        assert refused.value.retry_after_s == expected, hint
    await assert_still_serving(client)


@ROOT_ONLY
async def test_a_function_cannot_run_the_host_out_of_processes(client):
    from runtime.proc.isolation import MAX_PROCESSES

    started = (await client.invoke("threadbomb", {"most": 2 * MAX_PROCESSES}, timeout_s=60)).output["started"]
    assert 0 < started < MAX_PROCESSES
    await assert_still_serving(client)


# --- 9. a deployed function could rewrite its code and fill the disk ----------------------------

@ROOT_ONLY
async def test_a_function_cannot_change_its_code_or_the_state_folder(client):
    result = (await client.invoke("selfwriter", {})).output
    assert all(v.startswith("blocked") for v in result.values()), result


DEPLOYED_WRITER = '''
import os
from faas import function

def _try(action):
    try:
        action()
    except OSError as exc:
        return "blocked: " + type(exc).__name__
    return "ALLOWED"

@function(name="deployed-writer", triggers=["events.adversarial.deployed"], timeout_s=30)
def writer(event, ctx):
    here = os.path.dirname(os.path.abspath(__file__))
    return {{"version": {version}, "folder": here,
            "rewrite_own_code": _try(lambda: open(os.path.abspath(__file__), "ab").close()),
            "write_own_folder": _try(lambda: open(os.path.join(here, "dropped.py"), "wb").close()),
            "write_faas_home": _try(lambda: open(os.path.join(os.environ["FAAS_HOME"], "x"), "wb").close())}}
'''


async def _served(client, function: str, version: int) -> dict:
    deadline = time.monotonic() + 60
    while True:
        try:
            output = (await client.invoke(function, {}, timeout_s=30)).output
            if output["version"] == version:
                return output
        except Exception:
            if time.monotonic() > deadline:
                raise
        assert time.monotonic() < deadline, f"{function} version {version} never served"
        await asyncio.sleep(0.2)


@ROOT_ONLY
async def test_a_deployed_function_cannot_change_itself_and_leaves_nothing_behind(
        node, client, operator, tmp_path):
    """Its files belong to root, readable by its own group only; it cannot write them or the
    state folder. A replaced version's folder goes once its sandbox stopped; `faas rm`
    stops it everywhere and drops its place in the events stream."""
    state = ("--nats", node.url, "--state-dir", str(node.state_dir))
    folder = tmp_path / "deployed"
    folder.mkdir()
    outputs = []
    for version in (1, 2):
        (folder / "writer.py").write_text(DEPLOYED_WRITER.format(version=version))
        deployed = faas_cli("deploy", str(folder), *state)
        assert deployed.returncode == 0, deployed.stderr
        outputs.append(await _served(client, "deployed-writer", version))
    first, second = outputs
    assert all(first[k].startswith("blocked") for k in ("rewrite_own_code", "write_own_folder",
                                                         "write_faas_home")), first
    code = Path(second["folder"]) / "writer.py"
    assert (code.stat().st_uid, code.stat().st_mode & 0o777) == (0, 0o640)
    assert Path(second["folder"]).stat().st_mode & 0o777 == 0o750
    deadline = time.monotonic() + 30
    while Path(first["folder"]).exists():  # v1's sandbox stops, then its files go
        assert time.monotonic() < deadline, "v1's folder was left behind"
        await asyncio.sleep(0.2)
    js = operator.jetstream()
    await js.consumer_info(protocol.EVENTS_STREAM, protocol.consumer_name("deployed-writer"))
    removed = faas_cli("rm", "deployed-writer", *state)
    assert removed.returncode == 0, removed.stderr
    with pytest.raises(nats.js.errors.NotFoundError):
        await js.consumer_info(protocol.EVENTS_STREAM, protocol.consumer_name("deployed-writer"))
    deadline = time.monotonic() + 30
    while Path(second["folder"]).exists():
        assert time.monotonic() < deadline, "the removed version's folder was left behind"
        await asyncio.sleep(0.2)


# --- 10. events near the max payload were lost --------------------------------------------------

async def test_an_event_near_the_max_payload_becomes_a_truncated_dead_letter(client, nc, operator, node):
    function = "lastchance"  # fails at once: max_deliver=1 and a handler that raises on junk
    event = {"s": "not a number", "pad": "p" * (nc.max_payload - 400)}  # publishable, barely
    seq = await client.publish("events.lastchance", event)
    letter = await _dead_letter(operator, function, seq)
    assert letter["truncated"] and letter["data_bytes"] > len(letter["data"])
    state = ("--state-dir", str(node.state_dir), "--nats", node.url)
    replay = faas_cli("events", "replay", function, str(letter["seq"]), *state)
    assert replay.returncode == 1 and "cannot be replayed" in replay.stderr


@pytest.mark.parametrize("over", ["frame", "result"])
async def test_an_output_too_large_for_a_result_is_dead_lettered_at_once(client, nc, operator, over):
    """It would never fit: running the handler again cannot help."""
    n = nc.max_payload + (200 << 10) if over == "frame" else nc.max_payload - 600
    seq = await client.publish("events.adversarial.big", {"n": n})
    letter = await _dead_letter(operator, "bigout", seq)
    assert letter["event"]["delivered"] == 1 and letter["error"]["code"] == 500


async def _dead_letter(operator, function: str, seq: int) -> dict:
    sub = await operator.jetstream().subscribe(protocol.DLQ_PREFIX + function, ordered_consumer=True)
    try:
        while True:
            msg = await sub.next_msg(timeout=60)
            letter = msgpack.unpackb(msg.data)
            if letter["event"]["sequence"] == seq:
                return {**letter, "seq": msg.metadata.sequence.stream}
    finally:
        await sub.unsubscribe()


# --- 11. streams without byte limits -------------------------------------------------------------

async def test_every_stream_has_a_byte_limit_and_a_documented_discard_policy(operator):
    from faas.streams import DEFAULT_MAX_MIB

    expected = {"FAAS_EVENTS": ("events", "new"), "FAAS_OUTCOMES": ("outcomes", "old"),
                "FAAS_HISTORY": ("history", "old"), "FAAS_LOGS": ("logs", "old"),
                "KV_faas_functions": ("functions", "new"), "OBJ_faas_artifacts": ("artifacts", "new"),
                "KV_faas_nodes": ("nodes", "new")}
    js = operator.jetstream()
    for stream, (name, discard) in expected.items():
        config = (await js.stream_info(stream)).config
        assert config.max_bytes == DEFAULT_MAX_MIB[name] << 20, stream
        assert getattr(config.discard, "value", config.discard) == discard, stream


def test_stream_sizes_come_from_the_environment_and_junk_in_it_is_ignored(monkeypatch):
    from faas.streams import DEFAULT_MAX_MIB, max_bytes

    monkeypatch.setenv("FAAS_STREAM_MAX_MIB", "logs=2, events=abc,history=-5,nosuch=9,outcomes")
    assert max_bytes("logs") == 2 << 20
    for name in ("events", "history", "outcomes"):
        assert max_bytes(name) == DEFAULT_MAX_MIB[name] << 20


async def test_a_full_events_stream_refuses_producers_and_keeps_what_it_holds(tmp_path, monkeypatch):
    """A stream at its limit, on a real server: the producer gets a 503, nothing is dropped."""
    from faas.localnode import free_port
    from faas.streams import ensure_stream
    from runtime.node.natsd import nats_server_binary

    monkeypatch.setenv("FAAS_STREAM_MAX_MIB", "events=1")
    port = free_port()
    server = subprocess.Popen([nats_server_binary(), "-p", str(port), "-js", "-sd", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with Client(f"nats://127.0.0.1:{port}") as producer:
            await ensure_stream(producer.nc.jetstream(), "events", protocol.EVENTS_STREAM, ["events.>"])
            with pytest.raises(Overloaded, match="refused"):
                for i in range(20):
                    await producer.publish("events.flood", {"pad": "f" * 100_000, "i": i})
            kept = (await producer.nc.jetstream().stream_info(protocol.EVENTS_STREAM)).state.messages
            assert 5 <= kept <= 10 and i == kept
    finally:
        server.terminate()
        server.wait(10)


# --- 12. a sandbox could make the node hold 256 MiB a frame --------------------------------------

async def test_a_frame_announced_too_large_kills_only_its_sandbox(client):
    """It would have had the node wait for (and hold) 200 MiB."""
    with pytest.raises(Exception, match="exited|sandbox"):
        await client.invoke("flooder", {"huge_frame": True}, timeout_s=30)
    assert (await client.invoke("flooder", {})).output == {"ok": True}
    await assert_still_serving(client)


FLOOD = """
import socket, sys
from runtime.proc import frames
sock = socket.socket(fileno=int(sys.argv[1]))
invoke = frames.recv_frame(sock)
sock.sendall(frames.pack({"type": "started", "request_id": invoke["request_id"]}))
blob = "x" * (1 << 20)
for _ in range(64):
    sock.sendall(frames.pack({"type": "chunk", "request_id": invoke["request_id"], "delta": blob,
                              "token_ids": []}))
sock.sendall(frames.pack({"type": "result", "request_id": invoke["request_id"], "output": "done"}))
sock.recv(1)
"""


async def test_frames_waiting_for_a_slow_caller_are_bounded_by_bytes(tmp_path):
    """A sandbox that streams faster than its caller takes: the node holds at most its budget
    (4 MiB here) of its frames, plus one, and the sandbox waits; every chunk still arrives."""
    import socket

    from runtime.sandbox.handles import Sandbox, SandboxConfig
    from runtime.sandbox.spawn import ForkedProcess

    ours, theirs = socket.socketpair()
    child = subprocess.Popen([sys.executable, "-c", FLOOD, str(theirs.fileno())], pass_fds=[theirs.fileno()])
    theirs.close()
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    sandbox = Sandbox("flood", ForkedProcess(child.pid), ours, reader, writer,
                      SandboxConfig(queued_bytes=4 << 20, max_frame_bytes=2 << 20))
    peak, chunks = 0, 0

    async def slow_caller(chunk: dict) -> None:
        nonlocal peak, chunks
        peak, chunks = max(peak, sandbox._queued), chunks + 1
        await asyncio.sleep(0.005)

    try:
        result = await sandbox.invoke("r1", {}, stream=True, on_chunk=slow_caller)
    finally:
        child.kill()
        child.wait()
        sandbox._reading.cancel()
        writer.close()
    assert result.output == "done" and chunks == 64
    assert 0 < peak <= (4 << 20) + (2 << 20)


# --- Low: the gateway, logs, listings ------------------------------------------------------------

async def test_gateway_bodies_are_bounded_and_checked(node):
    import httpx

    async with httpx.AsyncClient(base_url=node.http_url, timeout=30) as http:
        deep = await http.post("/v1/functions/echo", content=b"[" * 100_000 + b"]" * 100_000)
        assert deep.status_code == 400
        huge = await http.post("/v1/functions/echo", content=b'{"x": "' + b"y" * (2 << 20) + b'"}')
        assert huge.status_code == 413 and huge.json()["error"]["code"] == 413
        near = await http.post("/v1/functions/echo", json={"x": "y" * ((1 << 20) - 100)})
        assert near.status_code == 413
        nested = await http.post("/v1/chat/completions", content=b'{"model": ' + b"[" * 5000 + b"]" * 5000 + b"}")
        assert nested.status_code == 400
        for stream in (False, True):  # the body fits; the invocation it becomes does not
            chat = await http.post("/v1/chat/completions", json={
                "model": "support", "stream": stream,
                "messages": [{"role": "user", "content": "y" * ((1 << 20) - 200)}]})
            assert chat.status_code == 413, chat.text
        assert (await http.post("/v1/functions/echo", json={"ok": 1})).status_code == 200


async def test_gateway_model_list_says_503_when_no_node_answers(tmp_path):
    from faas.localnode import free_port
    from runtime.node.natsd import nats_server_binary

    nats_port, http_port = free_port(), free_port()
    server = subprocess.Popen([nats_server_binary(), "-p", str(nats_port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    gateway = subprocess.Popen([sys.executable, "-m", "faas.cli", "gateway", "--port", str(http_port),
                                "--nats", f"nats://127.0.0.1:{nats_port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import httpx

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=10) as http:
            for _ in range(200):
                try:
                    models = await http.get("/v1/models")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
            assert models.status_code == 503 and models.headers["retry-after"]
            assert (await http.get("/v1/models/anything")).status_code == 503
    finally:
        gateway.terminate()
        server.terminate()
        gateway.wait(10)
        server.wait(10)


async def test_a_line_too_deep_to_parse_does_not_end_a_functions_log(client, operator):
    marker = f"marker-{uuid.uuid4().hex}"
    lines = await operator.subscribe("faas.logs.deepline")
    try:
        await client.invoke("deepline", {"marker": marker})
        while json.loads((await lines.next_msg(timeout=15)).data)["line"] != marker:
            pass
    finally:
        await lines.unsubscribe()


async def test_a_chatty_function_does_not_crowd_out_the_others_log_lines(client, operator):
    """Three floods of 50000 lines at once; meanwhile another function prints one line: it
    reaches `faas logs` (each function's lines wait in a queue share of their own)."""
    lines = await operator.subscribe("faas.logs.counter")
    try:
        flood = [asyncio.create_task(client.invoke("chatty", {"lines": 50_000}, timeout_s=60))
                 for _ in range(3)]
        await asyncio.sleep(0.3)
        wanted = (await client.invoke("counter", {})).output
        await asyncio.gather(*flood)
        line = f"counter call {wanted['calls']} for {wanted['request_id']}"
        deadline = time.monotonic() + 15
        while True:
            assert time.monotonic() < deadline, f"{line!r} never reached the logs"
            try:
                if json.loads((await lines.next_msg(timeout=1)).data)["line"] == line:
                    break
            except nats.errors.TimeoutError:
                continue
    finally:
        await lines.unsubscribe()
