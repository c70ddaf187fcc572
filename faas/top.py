"""`faas ping` and `faas top`: the cluster as the nodes' NATS micro service reports it
(`$SRV.PING.faas-node`, `$SRV.STATS.faas-node`; see runtime/service.py)."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from nats.aio.client import Client as NATS

from faas import protocol
from faas.client import gather


async def ping(nc: NATS, wait_s: float = 0.5) -> list[str]:
    """The id of every node that answers `$SRV.PING.faas-node`, once per node."""
    replies = await gather(nc, f"$SRV.PING.{protocol.SERVICE_NAME}", wait_s)
    return sorted(json.loads(msg.data).get("metadata", {}).get("node", "?") for msg in replies)


async def cluster_stats(nc: NATS, wait_s: float = 0.5) -> list[dict[str, Any]]:
    """Each node's stats data (its functions, their levels, queues, rates and latencies)."""
    nodes = []
    for msg in await gather(nc, f"$SRV.STATS.{protocol.SERVICE_NAME}", wait_s):
        for endpoint in json.loads(msg.data).get("endpoints") or []:
            if endpoint.get("name") == "status" and endpoint.get("data"):
                nodes.append(endpoint["data"])
    return sorted(nodes, key=lambda n: n.get("node", ""))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def render(nodes: list[dict[str, Any]]) -> str:
    """One table row per (node, function)."""
    from faas.cli import format_table

    rows: list[tuple[Any, ...]] = [("NODE", "FUNCTION", "VER", "LEVEL", "IDLE", "BUSY", "ACTIVE",
                                    "QUEUED", "REQS", "ERRS", "RPS", "TTFT_P50", "TTFT_P99",
                                    "LAT_P50", "LAT_P99", "NODE_MIB")]
    for node in nodes:
        memory = f"{node.get('memory', {}).get('host_bytes', 0) / 2**20:.0f}"
        for name, fn in sorted(node.get("functions", {}).items()):
            rows.append((node["node"], name, fn.get("version") or "-", fn["level"], fn["idle"],
                         fn["busy"], fn["active"], fn["queued"], fn["requests"], fn["errors"],
                         f"{fn['rps_1m']:.2f}", _ms(fn["ttft_p50_ms"]), _ms(fn["ttft_p99_ms"]),
                         _ms(fn["latency_p50_ms"]), _ms(fn["latency_p99_ms"]), memory))
        if not node.get("functions"):
            rows.append((node["node"], "(none)", *["-"] * 13, memory))
    return format_table(rows) + f"\n{len(nodes)} node(s)"


async def run_top(nc: NATS, interval_s: float = 1.0, once: bool = False) -> int:
    """Redraw the table every `interval_s` until interrupted (or once)."""
    while True:
        text = render(await cluster_stats(nc))
        if once:
            print(text)
            return 0
        sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")  # home, clear: a live view in place
        sys.stdout.flush()
        await asyncio.sleep(interval_s)
