"""Clusters: functions deployed into NATS (KV + object store) and served by two `faas up`
nodes on one external nats-server; forwarding to the warm node, live redeploys, rollbacks
and removals, NATS micro discovery, refused adapters, and a node killed with SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nats
import nats.errors
import pytest

from faas import Client, FunctionNotFound, protocol
from faas.localnode import LocalNode, free_port
from runtime.node.natsd import nats_server_binary
from tests.conftest import EXAMPLES, ROOT

pytestmark = pytest.mark.slow

GREETER = '''
import time

from faas import function

@function(name="greeter", timeout_s=30, max_batch=8)
def greeter(event, ctx):
    time.sleep(event.get("sleep_s", 0))
    return {{"version": {version}, "hello": event.get("name", "world")}}
'''


def faas_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "faas.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def start_server(folder: Path, config: str = "", env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    conf = folder / "server.conf"
    conf.write_text(f'host: 127.0.0.1\nport: {port}\njetstream {{store_dir: "{folder / "js"}"}}\n{config}')
    proc = subprocess.Popen([nats_server_binary(), "-c", str(conf), "--ports_file_dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 10
    while not list(folder.glob("nats-server*.ports")):
        assert proc.poll() is None and time.monotonic() < deadline, "nats-server did not start"
        time.sleep(0.05)
    return proc, f"nats://127.0.0.1:{port}"


def node_on(url: str, node_id: str, uids: str, log: Path, env: dict[str, str] | None = None,
            *options: str) -> LocalNode:
    with open(log, "ab") as out:
        node = LocalNode(nats_url=url, stderr=out.fileno(), env=env,
                         extra_args=("--node-id", node_id, "--sandbox-uids", uids, *options))
        node.start()
    return node


async def until(check, timeout_s: float = 20.0, what: str = "condition"):
    """Poll `check()` (async) until it returns something true; that value."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = await check()
        except Exception:
            value = None
            if time.monotonic() > deadline:
                raise
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(models, tmp_path_factory):
    """An external nats-server (JetStream, no auth) and two nodes with no functions folder.
    Without pre-loading (a sandbox lives on the node that started it, for its keep-alive),
    so which node holds a function warm is up to the requests alone."""
    folder = tmp_path_factory.mktemp("cluster")
    server, url = start_server(folder)
    # A job held by a node that dies is handed to another after the ack wait (5 s here). The
    # jobs' retention is the first node's: node-b asks for another.
    nodes = [node_on(url, "node-a", "63000-63099", folder / "a.log", None, "--no-preload", "--event-ack-wait-s", "5",
                     "--job-retention-s", "3600"),
             node_on(url, "node-b", "63100-63199", folder / "b.log", None, "--no-preload", "--event-ack-wait-s", "5",
                     "--job-retention-s", "7200")]
    yield url, nodes, folder
    for node in nodes:
        node.stop()
    server.terminate()
    server.wait(10)


def write_greeter(folder: Path, version: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "greeter.py").write_text(GREETER.format(version=version))
    return folder


async def served_by(nc, node: str, function: str, event: dict) -> dict:
    """Invoke through one node's own subject (what a forwarding peer uses)."""
    msg = await nc.request(protocol.node_invoke_subject(node, function), json.dumps(event).encode(),
                           timeout=60, headers={"Content-Type": "application/json"})
    return json.loads(msg.data)


async def test_the_jobs_retention_is_the_first_node_s_on_every_node(cluster):
    """A job kept longer or shorter than its queue keeps it would run for no reader, or be
    dropped while its record says queued: the bucket's TTL, set by the node that made it,
    holds for all, and a node asking for another says so."""
    url, (a, b), folder = cluster
    async with Client(url) as c:
        nodes = await until(lambda: _both(c), what="both nodes to answer")
        assert {n["node"]: n["jobs"]["retention_s"] for n in nodes} == {"node-a": 3600, "node-b": 3600}
        stream = await c.nc.jetstream().stream_info(protocol.JOBS_STREAM)
        assert stream.config.max_age == 3600
    assert '"jobs_retention_kept"' in (folder / "b.log").read_text()


async def _both(c: Client) -> list[dict] | None:
    nodes = await c.nodes()
    return nodes if len(nodes) == 2 else None


async def test_deploy_once_every_node_serves(cluster, client):
    url, (a, b), folder = cluster
    out = faas_cli("deploy", str(write_greeter(folder / "v1", 1)), str(EXAMPLES / "support.py"), "--nats", url)
    assert out.returncode == 0, out.stderr
    assert "greeter: version 1" in out.stdout and "support: version 1" in out.stdout
    async with Client(url) as c:
        async def both_list() -> bool:
            nodes = await c.nodes()
            return len(nodes) == 2 and all({"greeter", "support"} <= {f["name"] for f in n["functions"]}
                                           for n in nodes)
        await until(both_list, what="both nodes to serve the deploy")
        for node in (a, b):
            reply = await served_by(c.nc, node.node_id, "greeter", {"name": "ada"})
            assert reply["output"] == {"version": 1, "hello": "ada"}
            assert reply["metrics"]["node"] == node.node_id
        # The deployed support (its adapter from the object store, the backbone found by
        # fingerprint) answers what the same function served from its folder does.
        event = {"message": "Where is my order?", "max_new_tokens": 12}
        deployed = await c.invoke("support", event, timeout_s=120)
        local = await client.invoke("support", event, timeout_s=120)
        assert deployed.output == local.output
        assert deployed.metrics["node"] in (a.node_id, b.node_id)


async def test_a_request_goes_to_the_node_where_its_function_is_warm(cluster):
    url, (a, b), _ = cluster
    async with Client(url) as c:
        # A node that served support in the test before holds it warm: its peer must know
        # (its warm state in KV, published soon after) before the first request here, or
        # that request may start it cold there too, and both would be warm.
        holding = [n["node"] for n in await c.nodes() for f in n["functions"] if f["name"] == "support" and f["levels"]]
        nodes_kv = await c.nc.jetstream().key_value(protocol.NODES_BUCKET)

        async def published_warm() -> bool:
            state = json.loads((await nodes_kv.get(holding[0])).value)
            return bool(state["functions"].get("support", {}).get("room"))
        if holding:
            await until(published_warm, what="the warm node's state in KV")
        warm = (await c.invoke("support", {"message": "hi", "max_new_tokens": 4}, timeout_s=120)).metrics["node"]
        # Whichever node the queue group hands a request to, it is served warm where the
        # first one started the function: the other node forwards it there.
        for _ in range(12):
            result = await c.invoke("support", {"message": "hi", "max_new_tokens": 4}, timeout_s=60)
            assert (result.metrics["level"], result.metrics["node"]) == ("loaded", warm)
        support = {node["node"]: f for node in await c.nodes() for f in node["functions"]
                   if f["name"] == "support"}
        cold = next(n for n in support if n != warm)
        assert support[cold]["stats"]["forwarded"] >= 1 and support[cold]["levels"] == []
        assert (a.node_id, b.node_id) == ("node-a", "node-b") and warm in support


async def test_redeploy_rollback_and_rm_are_picked_up_live(cluster):
    url, _, folder = cluster
    async with Client(url) as c:
        async def version() -> int | None:
            try:
                return (await c.invoke("greeter", {}, timeout_s=10)).output["version"]
            except FunctionNotFound:
                return None

        out = faas_cli("deploy", str(write_greeter(folder / "v2", 2)), "--nats", url)
        assert "greeter: version 2" in out.stdout, out.stderr
        await until(lambda: _eq(version(), 2), what="version 2")
        # Deploying the same thing again makes no new version.
        assert "(unchanged)" in faas_cli("deploy", str(folder / "v2"), "--nats", url).stdout
        out = faas_cli("rollback", "greeter", "--nats", url)
        assert out.returncode == 0 and "version 1 again" in out.stdout, out.stderr
        await until(lambda: _eq(version(), 1), what="the rollback to version 1")
        assert faas_cli("rm", "greeter", "--nats", url).returncode == 0
        await until(lambda: _eq(version(), None), what="greeter to be gone")
        with pytest.raises(FunctionNotFound):
            await c.invoke("greeter", {}, timeout_s=10)
        assert faas_cli("rm", "greeter", "--nats", url).returncode == 1
        # A removed function comes back with a rollback (its last version).
        assert faas_cli("rollback", "greeter", "--nats", url).returncode == 0
        await until(lambda: _eq(version(), 1), what="greeter back after the rollback")
        # What was deployed, when, by whom, and which version is live; a rollback to any.
        out = faas_cli("versions", "greeter", "--json", "--nats", url)
        rows = [json.loads(line) for line in out.stdout.splitlines()]
        assert [(r["version"], r["live"]) for r in rows] == [(1, True), (2, False)], out.stdout
        assert rows[1]["deployed_by"].endswith("@" + socket.gethostname()) and rows[1]["deployed_at"]
        assert rows[0]["rolled_back_at"] and rows[0]["digest"] != rows[1]["digest"]
        assert faas_cli("rollback", "greeter", "--to", "1", "--nats", url).returncode == 1  # live already
        out = faas_cli("rollback", "greeter", "--to", "9", "--nats", url)
        assert out.returncode == 1 and "has no version 9 (kept: 1, 2)" in out.stderr
        assert faas_cli("rollback", "greeter", "--to", "2", "--nats", url).returncode == 0
        await until(lambda: _eq(version(), 2), what="the rollback to version 2")
        listing = faas_cli("versions", "greeter", "--nats", url).stdout.splitlines()
        assert listing[0].split() == ["VERSION", "DEPLOYED", "BY", "DIGEST", "LIVE"]
        assert listing[2].split()[0] == "2" and "live (rollback" in listing[2]

        async def both_serve_2() -> bool:
            out = faas_cli("ls", "--deployed", "--json", "--nats", url)
            greeter = next(r for r in json.loads(out.stdout) if r["function"] == "greeter")
            return greeter["version"] == 2 and sorted(greeter["serving"].values()) == [2, 2]
        await until(both_serve_2, what="both nodes to report version 2 of greeter")


async def _eq(value_coro, expected) -> bool:
    return await value_coro == expected


async def test_a_bad_record_in_the_bucket_is_refused_and_takes_nothing_down(cluster):
    """Whatever lands in the functions bucket (someone with write access, a forged reply
    subject), nodes build no path from it and keep serving what they served."""
    url, (a, b), folder = cluster
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value("faas_functions")
        digest = "0" * 64
        evil = {"name": "evil", "version": 1, "spec": {}, "backbone": None, "adapter": None,
                "code": {"file": "../../../../tmp/evil.py", "files": {"../../../../tmp/evil.py": digest}}}
        await kv.put("evil", json.dumps(evil).encode())
        await kv.put("greeter", b'{"stream": "FAAS_EVENTS", "seq": 1}')  # an ack, not a record
        async with Client(url) as c:
            async def refused() -> bool:
                nodes = await c.nodes()
                return all({"evil", "greeter"} <= set(n["deployed"]["unavailable"]) for n in nodes)
            await until(refused, what="both nodes to refuse the records")
            assert (await c.invoke("greeter", {"name": "still"}, timeout_s=30)).output["hello"] == "still"
            # A deploy after the garbage is a new version as usual.
            out = faas_cli("deploy", str(write_greeter(folder / "v3", 3)), "--nats", url)
            assert "greeter: version 3" in out.stdout, out.stderr
            await until(lambda: _eq(_greeter_version(c), 3), what="version 3")
        assert not Path("/tmp/evil.py").exists()
    finally:
        await nc.drain()


async def _greeter_version(c: Client) -> int:
    return (await c.invoke("greeter", {}, timeout_s=10)).output["version"]


async def test_each_node_is_a_nats_micro_service(cluster):
    url, (a, b), _ = cluster
    nc = await nats.connect(url)
    try:
        from faas.client import gather

        pings = [json.loads(m.data) for m in await gather(nc, "$SRV.PING.faas-node")]
        assert sorted(p["metadata"]["node"] for p in pings) == sorted([a.node_id, b.node_id])
        infos = [json.loads(m.data) for m in await gather(nc, "$SRV.INFO.faas-node")]
        assert all(i["name"] == "faas-node" and i["endpoints"][0]["name"] == "status" for i in infos)
        assert all("support" in i["metadata"]["functions"].split(",") for i in infos)
        stats = [json.loads(m.data) for m in await gather(nc, "$SRV.STATS.faas-node")]
        assert len(stats) == 2
        for s in stats:
            data = s["endpoints"][0]["data"]
            assert "support" in data["functions"]
            assert {"level", "queued", "rps_1m", "ttft_p50_ms", "ttft_p99_ms"} <= set(data["functions"]["support"])
    finally:
        await nc.drain()
    ping = faas_cli("ping", "--nats", url)
    assert ping.returncode == 0 and sorted(ping.stdout.split()) == sorted([a.node_id, b.node_id])
    assert faas_cli("ping", "--node", "no-such-node", "--nats", url).returncode == 1
    top = faas_cli("top", "--once", "--nats", url)
    assert top.returncode == 0, top.stderr
    rows = [line.split() for line in top.stdout.splitlines()[1:]]
    assert {(r[0], r[1]) for r in rows if len(r) > 1} >= {(a.node_id, "support"), (b.node_id, "support")}


def test_a_bad_adapter_is_refused_at_deploy(cluster, models, tmp_path):
    url, _, _ = cluster
    support = models / "tiny-llama" / "adapters" / "support"
    cases = {
        "pickled": lambda d: (d / "adapter_model.bin").write_bytes(b"\x80\x04pickle"),
        "elsewhere": lambda d: _edit_config(d, target_modules=["q_proj", "not_a_proj"]),
    }
    for name, spoil in cases.items():
        folder = tmp_path / name
        shutil.copytree(support, folder / "adapter")
        spoil(folder / "adapter")
        (folder / "fn.py").write_text(
            "from faas import function\nfrom faas.bundled import model_path\n"
            f"@function(name='bad-{name}', backbone=model_path(), adapter='adapter')\n"
            "def handler(event, ctx):\n    return {}\n")
        out = faas_cli("deploy", str(folder), "--nats", url)
        assert out.returncode == 1, out.stdout
        assert {"pickled": "pickle file", "elsewhere": "['not_a_proj'] are not in the backbone"}[name] in out.stderr
    listed = faas_cli("ls", "--json", "--nats", url)
    assert "bad-" not in listed.stdout


def _edit_config(adapter: Path, **changes) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **changes}))


async def test_after_sigkill_of_a_node_the_other_serves_everything(cluster):
    url, (a, b), _ = cluster
    async with Client(url) as c:
        await c.invoke("support", {"message": "warm", "max_new_tokens": 2}, timeout_s=120)
        victim, survivor = a, b
        # Requests in flight when their node dies: the client sees the node it acknowledged
        # them from vanish and sends them again; every one is answered.
        slow = [asyncio.create_task(c.invoke("greeter", {"name": f"slow {i}", "sleep_s": 2}, timeout_s=60))
                for i in range(6)]
        # Jobs running when their node dies run again elsewhere (at least once).
        jobs = [await c.submit("greeter", {"name": f"job {i}", "sleep_s": 3}) for i in range(6)]
        await asyncio.sleep(1.0)
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)
        started = time.monotonic()
        answered = await asyncio.gather(*slow)
        assert [r.output["hello"] for r in answered] == [f"slow {i}" for i in range(6)]
        # Sent again once their node was found gone, not after their 60 s budget: the survivor
        # runs them with its own jobs (greeter takes 8 at a time), so a loaded machine may
        # take a while, but not that long.
        assert time.monotonic() - started < 30
        for i in range(10):
            for function, event in (("support", {"message": f"after {i}", "max_new_tokens": 4}),
                                    ("greeter", {"name": str(i)})):
                result = await c.invoke(function, event, timeout_s=120)
                assert result.metrics["node"] == survivor.node_id
        assert time.monotonic() - started < 120
        pings = await _pings(c)
        assert pings == [survivor.node_id]
        done = await asyncio.gather(*(c.result(job, timeout_s=60) for job in jobs))
        assert [r.output["hello"] for r in done] == [f"job {i}" for i in range(6)]


async def _pings(c: Client) -> list[str]:
    from faas.top import ping

    return await ping(c.nc)


async def test_with_auth_on_only_logged_in_clients_get_in(models, tmp_path):
    """The documented server config (docker/nats/auth.conf): nodes, operators and producers
    log in with their own users; a client without credentials is refused."""
    passwords = {"FAAS_NODE_PASSWORD": "node-secret", "FAAS_ADMIN_PASSWORD": "admin-secret",
                 "FAAS_PRODUCER_PASSWORD": "producer-secret"}
    auth_conf = os.path.relpath(ROOT / "docker" / "nats" / "auth.conf", tmp_path)
    server, url = start_server(tmp_path, f'include "{auth_conf}"\n', env=passwords)
    as_node = {"FAAS_NATS_USER": "faas-node", "FAAS_NATS_PASSWORD": "node-secret"}
    node = node_on(url, "node-auth", "63200-63299", tmp_path / "node.log", as_node)
    # A second node serving a function of its own: node-auth forwards its requests there.
    local = tmp_path / "local"
    local.mkdir()
    (local / "localonly.py").write_text(GREETER.format(version=0).replace('name="greeter"', 'name="localonly"'))
    other = node_on(url, "node-auth-2", "63300-63399", tmp_path / "node2.log", as_node, "--functions", str(local))
    try:
        folder = write_greeter(tmp_path / "fn", 7)
        as_producer = ("--user", "producer", "--password", "producer-secret")
        refused = faas_cli("deploy", str(folder), "--nats", url, *as_producer)
        assert refused.returncode == 1 and "ermission" in refused.stderr, refused.stderr
        out = faas_cli("deploy", str(folder), "--nats", url, "--user", "faas-admin",
                       "--password", "admin-secret")
        assert out.returncode == 0, out.stderr
        async with Client(url, user="producer", password="producer-secret",
                          inbox_prefix="_INBOX_producer") as c:
            reply = await until(lambda: _invoke_or_none(c, "greeter"), what="greeter under auth")
            assert reply.output["version"] == 7 and reply.metrics["node"] in ("node-auth", "node-auth-2")

            async def both_serve_localonly() -> bool:  # node-auth has seen node-auth-2
                return all([await _invoke_or_none(c, "localonly") for _ in range(4)])
            await until(both_serve_localonly, timeout_s=30, what="node-auth to forward localonly")
            # Half of these reach node-auth, which forwards them: node-auth-2 answers on
            # node-auth's _INBOX_faas_node inbox, which auth.conf did not let nodes publish to.
            served = await asyncio.gather(*(c.invoke("localonly", {"name": str(i)}, timeout_s=20)
                                            for i in range(16)))
            assert {r.metrics["node"] for r in served} == {"node-auth-2"}
            # Async jobs pass the accounts too (a job's run is answered on that inbox as well).
            job = await c.submit("greeter", {})
            assert (await c.result(job, timeout_s=30)).output["version"] == 7
            assert await c.cancel_job(job) is False  # a cancel reaches a node: it was done first
        with pytest.raises(nats.errors.Error, match="(?i)authorization"):
            await nats.connect(url, max_reconnect_attempts=0, allow_reconnect=False, connect_timeout=2)
        # A producer cannot read other clients' replies (nor any faas subject).
        denied: asyncio.Queue[Exception] = asyncio.Queue()

        async def on_error(exc: Exception) -> None:
            await denied.put(exc)
        producer = await nats.connect(url, user="producer", password="producer-secret",
                                      inbox_prefix="_INBOX_producer", error_cb=on_error)
        try:
            for subject in ("_INBOX.>", "faas.invoke.*"):
                await producer.subscribe(subject)
                assert "permissions violation" in str(await asyncio.wait_for(denied.get(), 5)).lower()
            # Nor tell the nodes to stop a job's run: that is theirs to say.
            await producer.publish("faas.jobs.cancelled", b"")
            await producer.flush()
            assert "permissions violation" in str(await asyncio.wait_for(denied.get(), 5)).lower()
        finally:
            await producer.close()
        anonymous = faas_cli("invoke", "greeter", "--nats", url)
        assert anonymous.returncode == 1 and "uthorization" in anonymous.stderr
        ping = faas_cli("ping", "--nats", url, "--user", "faas-admin", "--password", "admin-secret")
        assert sorted(ping.stdout.split()) == ["node-auth", "node-auth-2"]
    finally:
        other.stop()
        node.stop()
        server.terminate()
        server.wait(10)


async def _invoke_or_none(c: Client, function: str):
    try:
        return await c.invoke(function, {}, timeout_s=10)
    except FunctionNotFound:
        return None


def test_a_backbone_is_found_by_its_fingerprint_not_its_path(models, tmp_path):
    """A node serves a deployed function with whichever local model has the backbone's
    config fingerprint; the tools' bookkeeping keys in config.json do not change it."""
    from faas.artifacts import model_fingerprint
    from runtime.node.deployments import ModelFinder

    original = models / "tiny-llama"
    fingerprint = model_fingerprint(original)
    copy = tmp_path / "models" / "renamed-llama"
    copy.mkdir(parents=True)
    config = json.loads((original / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "_name_or_path": "/elsewhere",
                                                  "transformers_version": "0.0.1"}))
    other = tmp_path / "models" / "qwen"
    shutil.copytree(models / "tiny-qwen2", other, ignore=shutil.ignore_patterns("adapters"))
    finder = ModelFinder((tmp_path / "models",))
    assert finder.find(fingerprint, hint="/no/such/deployer/path") == copy
    assert finder.find(model_fingerprint(other), hint=None) == other
    assert finder.find("sha256:" + "0" * 64, hint=str(original)) is None


def test_one_node_owns_each_function_for_pre_loading():
    """Rendezvous ownership: among the live nodes serving a function exactly one plans to
    pre-load it; an overloaded or silent node is passed over; forwarding picks a peer with
    the function loaded and room, the least loaded first."""
    from runtime.node.cluster import Cluster

    def view(me: str, peers: dict[str, dict], seen: float | None = None) -> Cluster:
        cluster = Cluster(None, me, lambda: {})  # type: ignore[arg-type]
        cluster.peers = {n: (seen if seen is not None else time.monotonic(), s) for n, s in peers.items()}
        return cluster

    names = [f"fn{i}" for i in range(40)]
    state = {"functions": {n: {"level": "cold", "room": False, "load": 0.0} for n in names}}
    nodes = ["n1", "n2", "n3"]
    views = {me: view(me, {p: state for p in nodes if p != me}) for me in nodes}
    owners = {name: [me for me in nodes if views[me].share(name) == 1.0] for name in names}
    assert all(len(o) == 1 for o in owners.values())
    assert {o[0] for o in owners.values()} == set(nodes)  # spread, not one node for all
    name = next(n for n, o in owners.items() if o[0] == "n2")
    over = {**state, "overloaded": True}
    assert view("n1", {"n2": over, "n3": state}).share(name) + \
        view("n3", {"n1": state, "n2": over}).share(name) == 1.0
    assert view("n1", {"n2": state, "n3": state}, seen=time.monotonic() - 60).share(name) == 1.0

    warm = {"functions": {"f": {"level": "loaded", "room": True, "load": 0.5}}}
    light = {"functions": {"f": {"level": "loaded", "room": True, "load": 0.1}}}
    full = {"functions": {"f": {"level": "loaded", "room": False, "load": 1.0}}}
    assert view("n1", {"n2": warm, "n3": light}).pick("f", served_here=True) == "n3"
    assert view("n1", {"n2": full}).pick("f", served_here=True) is None
    assert view("n1", {"n2": full}).pick("f", served_here=False) == "n2"
    assert view("n1", {"n2": {**warm, "overloaded": True}}).pick("f", served_here=True) is None
    assert view("n1", {"n2": warm}).pick("g", served_here=False) is None


async def test_an_adapter_deployed_as_data_answers_as_the_reference_does(cluster, models):
    """`faas deploy --adapter DIR --name NAME --backbone MODEL`: no Python file of the user's."""
    from faas import BadRequest
    from tests.reference import decode, greedy_token_ids

    url, _, _ = cluster
    backbone, adapter = models / "tiny-llama", models / "tiny-llama" / "adapters" / "sql"
    out = faas_cli("deploy", "--adapter", str(adapter), "--name", "sql-as-data", "--backbone", str(backbone),
                   "--openai", "--nats", url)
    assert out.returncode == 0 and "sql-as-data: version 1" in out.stdout, out.stderr
    async with Client(url) as c:
        async def served() -> dict:
            return (await c.invoke("sql-as-data", {"prompt": "SELECT name FROM", "max_tokens": 6}, timeout_s=60)).output
        answer = await until(served, timeout_s=60, what="the adapter deployed as data")
        expected = decode(str(backbone), str(adapter), greedy_token_ids(str(backbone), str(adapter), "SELECT name FROM", 6))
        assert answer["text"] == expected
        with pytest.raises(BadRequest, match="max_tokens"):
            await c.invoke("sql-as-data", {"prompt": "x", "max_tokens": "many"}, timeout_s=60)
    refused = faas_cli("deploy", "--adapter", str(adapter), "--name", "no-backbone", "--nats", url)
    assert refused.returncode == 1 and "--adapter needs --name and --backbone" in refused.stderr
