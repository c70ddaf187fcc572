"""`faas ping` and `faas top`: the cluster as the nodes' NATS micro service reports it
(`$SRV.PING.faas-node`, `$SRV.STATS.faas-node`; see runtime/node/service.py)."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from nats.aio.client import Client as NATS

from faas import protocol
from faas.client import gather


async def answers(nc: NATS, verb: str, wait_s: float = 0.5) -> list[dict[str, Any]]:
    """Every node's answer to `$SRV.<verb>.faas-node` (PING, INFO, STATS) that is a JSON
    object; anything else on the inbox is skipped."""
    found = []
    for msg in await gather(nc, f"$SRV.{verb}.{protocol.SERVICE_NAME}", wait_s):
        try:
            answer = json.loads(msg.data)
        except ValueError:
            continue
        if isinstance(answer, dict):
            found.append(answer)
    return found


def _metadata(answer: dict[str, Any]) -> dict[str, str]:
    metadata = answer.get("metadata")
    return metadata if isinstance(metadata, dict) else {}


async def ping(nc: NATS, wait_s: float = 0.5) -> list[str]:
    """The id of every node that answers `$SRV.PING.faas-node`, once per node."""
    return sorted(str(_metadata(a).get("node", "?")) for a in await answers(nc, "PING", wait_s))


async def served(nc: NATS, wait_s: float = 0.5) -> list[tuple[str, set[str], set[str]]]:
    """(service id, its functions with openai=True, all its functions) of every node, from
    its INFO metadata: what a producer may see of the cluster."""
    def names(text: object) -> set[str]:
        return {n for n in text.split(",") if n} if isinstance(text, str) else set()

    return [(str(a.get("id")), names(_metadata(a).get("openai")), names(_metadata(a).get("functions")))
            for a in await answers(nc, "INFO", wait_s)]


async def cluster_stats(nc: NATS, wait_s: float = 0.5) -> list[dict[str, Any]]:
    """Each node's stats data (its functions, their levels, queues, rates and latencies)."""
    nodes = []
    for answer in await answers(nc, "STATS", wait_s):
        for endpoint in answer.get("endpoints") or []:
            if isinstance(endpoint, dict) and endpoint.get("name") == "status" \
                    and isinstance(endpoint.get("data"), dict):
                nodes.append(endpoint["data"])
    return sorted(nodes, key=lambda n: str(n.get("node", "")))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def render(nodes: list[dict[str, Any]], width: int | None = None) -> str:
    """One table row per (node, function), its lines fitting in `width` columns when
    given (long node ids and names cut with an ellipsis, the tails of the latencies and
    the version left out first)."""
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
    table = format_table(rows, width, squeeze={"NODE": 12, "FUNCTION": 12},
                         drop=("TTFT_P99", "LAT_P99", "VER", "NODE_MIB", "ACTIVE", "ERRS", "LAT_P50"))
    return table + f"\n{len(nodes)} node(s)"


async def run_top(nc: NATS, interval_s: float = 1.0, once: bool = False) -> int:
    """Redraw the table every `interval_s` until interrupted (or once)."""
    from faas.cli import table_width

    while True:
        text = render(await cluster_stats(nc), table_width())  # again each time: a resized window
        if once:
            print(text)
            return 0
        sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")  # home, clear: a live view in place
        sys.stdout.flush()
        await asyncio.sleep(interval_s)
