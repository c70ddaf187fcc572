"""Two nodes on one nats-server: what clustering costs and how fast it heals.

    python -m bench.cluster [--requests 300] [--rate-rps 20] [--out results/cluster.json]

- deploy: from `faas deploy` returning to the new version answering on both nodes.
- forwarding: a plain function warm on one node only (`--no-preload`: the first request
  starts its sandbox there, the keep-alive keeps it), `--requests` sequential requests
  through `faas.invoke.<fn>`: the queue group hands about half of them to the other node,
  which forwards them. Latency p50/p99 of those served where they arrived and of those
  forwarded, told apart by the node that acknowledged them (`Faas-Ack`) and the one whose
  metrics are in the reply.
- failover: `--rate-rps` requests per second (each sleeping 0.2 s in its handler) for 12 s;
  the node holding the warm sandbox is SIGKILLed at 4 s. Failed requests, latency before and
  after, and the time from the kill to the first reply of a request sent after it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nats

from bench import write_result
from faas import Client, protocol
from faas.bundled import faas_home
from faas.localnode import LocalNode, free_port
from runtime.node.natsd import EmbeddedNats

FUNCTION = """import time

from faas import function

@function(name="pong", max_batch=16, timeout_s=30)
def pong(event, ctx):
    time.sleep(event.get("sleep_s", 0))
    return {{"version": {version}}}
"""


def _ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)


def _deploy(url: str, login: list[str], folder: Path) -> None:
    subprocess.run([sys.executable, "-m", "faas.cli", "deploy", str(folder), "--nats", url, *login],
                   check=True, capture_output=True, timeout=300)


async def _version_on(nc: Any, node: str) -> int | None:
    try:
        msg = await nc.request(protocol.node_invoke_subject(node, "pong"), b"{}", timeout=5,
                               headers={"Content-Type": "application/json"})
    except nats.errors.Error:
        return None
    return json.loads(msg.data).get("output", {}).get("version")


def _write(work: Path, version: int) -> Path:
    folder = work / f"v{version}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pong.py").write_text(FUNCTION.format(version=version))
    return folder


async def deploy_latency(url: str, login: list[str], work: Path, nodes: list[str], version: int) -> float:
    """Seconds from the deploy's return until every node answers with `version` (asked on
    each node's own subject, which only nodes may publish to)."""
    _deploy(url, login, _write(work, version))
    started = time.monotonic()
    nc = await nats.connect(url, user=login[1], password=login[3])
    try:
        while [await _version_on(nc, n) for n in nodes] != [version] * len(nodes):
            await asyncio.sleep(0.02)
    finally:
        await nc.drain()
    return time.monotonic() - started


async def forwarding(url: str, requests: int) -> dict[str, Any]:
    nc = await nats.connect(url)
    local: list[float] = []
    forwarded: list[float] = []
    try:
        for _ in range(requests):
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            started = time.monotonic()
            await nc.publish(protocol.invoke_subject("pong"), b"{}", reply=inbox,
                             headers={"Content-Type": "application/json", protocol.HDR_ACK: "true"})
            ack = await sub.next_msg(timeout=30)
            reply = await sub.next_msg(timeout=30)
            elapsed = time.monotonic() - started
            await sub.unsubscribe()
            served_by = json.loads(reply.data)["metrics"]["node"]
            (local if served_by == ack.headers[protocol.HDR_ACK] else forwarded).append(elapsed)
    finally:
        await nc.drain()
    return {"requests": requests, "local": len(local), "forwarded": len(forwarded),
            "local_p50_ms": _ms(local, 0.5), "local_p99_ms": _ms(local, 0.99),
            "forwarded_p50_ms": _ms(forwarded, 0.5), "forwarded_p99_ms": _ms(forwarded, 0.99),
            "added_p50_ms": (round(_ms(forwarded, 0.5) - _ms(local, 0.5), 3)
                             if local and forwarded else None)}


async def failover(url: str, victim: LocalNode, rate_rps: float, seconds: float = 12.0,
                   kill_at_s: float = 4.0) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []

    async def one(client: Client, sent: float) -> None:
        try:
            result = await client.invoke("pong", {"sleep_s": 0.2}, timeout_s=30)
            rows.append({"sent": sent, "done": time.monotonic(), "ok": True, "node": result.metrics["node"]})
        except Exception as exc:  # what failed is the measurement
            rows.append({"sent": sent, "done": time.monotonic(), "ok": False, "error": repr(exc)})

    async with Client(url) as client:
        start = time.monotonic()
        tasks = []
        killed_at = None
        n = 0
        while (now := time.monotonic()) - start < seconds:
            if killed_at is None and now - start >= kill_at_s:
                victim.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
                killed_at = time.monotonic()
            tasks.append(asyncio.create_task(one(client, now)))
            n += 1
            await asyncio.sleep(max(0.0, start + n / rate_rps - time.monotonic()))
        await asyncio.gather(*tasks)
    assert killed_at is not None
    before = [r["done"] - r["sent"] for r in rows if r["ok"] and r["done"] < killed_at]
    spanning = [r["done"] - r["sent"] for r in rows if r["ok"] and r["sent"] < killed_at <= r["done"]]
    after = [r for r in rows if r["sent"] >= killed_at]
    first_after = min((r["done"] for r in after if r["ok"]), default=None)
    return {"rate_rps": rate_rps, "requests": len(rows), "failed": sum(not r["ok"] for r in rows),
            "errors": sorted({r["error"] for r in rows if not r["ok"]})[:5],
            "before_kill_p50_ms": _ms(before, 0.5), "before_kill_p99_ms": _ms(before, 0.99),
            "in_flight_at_kill": len(spanning), "in_flight_max_ms": _ms(spanning, 1.0),
            "after_kill_p50_ms": _ms([r["done"] - r["sent"] for r in after if r["ok"]], 0.5),
            "after_kill_p99_ms": _ms([r["done"] - r["sent"] for r in after if r["ok"]], 0.99),
            "after_kill_served_by_victim": sum(1 for r in after if r.get("node") == victim.node_id),
            "kill_to_first_reply_ms": round((first_after - killed_at) * 1000, 3) if first_after else None}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = faas_home() / f"bench-cluster-{os.getpid()}"
    server = EmbeddedNats(free_port(), work / "nats")
    await server.start()
    login = ["--user", server.node_user, "--password", server.node_password]
    nodes: list[LocalNode] = []
    try:
        for i, uids in enumerate(("65100-65199", "65200-65299")):
            node = LocalNode(nats_url=server.url, stderr=subprocess.DEVNULL, env={
                "FAAS_NATS_USER": server.node_user, "FAAS_NATS_PASSWORD": server.node_password},
                extra_args=("--node-id", f"bench-{i}", "--sandbox-uids", uids, "--no-preload"))
            node.start()
            nodes.append(node)
        ids = [n.node_id for n in nodes]
        deploy_s = [await deploy_latency(server.url, login, work, ids, v) for v in (1, 2, 3)]
        # A fresh version, started on one node only (the first request's).
        _deploy(server.url, login, _write(work, 4))
        # The listing is an operator's view: with the nodes' login.
        async with Client(server.url, user=server.node_user, password=server.node_password) as client:
            while [f.get("version") for n in await client.nodes() for f in n["functions"]] != [4, 4]:
                await asyncio.sleep(0.05)
            warm = (await client.invoke("pong", {}, timeout_s=30)).metrics["node"]
        result = {"deploy_to_served_s": [round(s, 3) for s in deploy_s],
                  "forwarding": await forwarding(server.url, args.requests)}
        victim = next(n for n in nodes if n.node_id == warm)
        result["failover"] = await failover(server.url, victim, args.rate_rps)
        return result
    finally:
        for node in nodes:
            node.stop()
        await server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rate-rps", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=Path("results/cluster.json"))
    args = parser.parse_args()
    write_result(args.out, {"cpus": os.cpu_count(), **asyncio.run(run(args))})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
