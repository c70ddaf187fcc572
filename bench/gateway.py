"""What the HTTP gateway adds over a direct NATS request.

    python -m bench.gateway [--requests 2000] [--out results/gateway.json]

One node with the gateway beside it (`faas up --http`, embedded nats-server), the plain
`echo` example. After a warm-up, `--requests` sequential calls each way, interleaved in
rounds of 100 so both see the same machine: a NATS request-reply in JSON (what any NATS
client sends), and `POST /v1/functions/echo` over one keep-alive HTTP connection (httpx).
The difference of the medians is the gateway's cost (parsing, the Client's request with its
acknowledgement, the JSON response); target: at most 3 ms at p50.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import nats

from bench import write_result
from faas.bundled import faas_home
from faas.localnode import LocalNode, free_port

ROOT = Path(__file__).resolve().parent.parent


def _ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)


async def measure(url: str, http_url: str, requests: int) -> dict[str, float]:
    nc = await nats.connect(url)
    event = json.dumps({"text": "hi"}).encode()
    direct: list[float] = []
    gateway: list[float] = []
    try:
        async with httpx.AsyncClient(base_url=http_url) as http:
            for _ in range(50):  # warm: the sandbox, the connections, both code paths
                await nc.request("faas.invoke.echo", event, timeout=30)
                (await http.post("/v1/functions/echo", content=event)).raise_for_status()
            for _ in range(requests // 100):
                for _ in range(100):
                    started = time.perf_counter()
                    await nc.request("faas.invoke.echo", event, timeout=30,
                                     headers={"Content-Type": "application/json"})
                    direct.append(time.perf_counter() - started)
                for _ in range(100):
                    started = time.perf_counter()
                    (await http.post("/v1/functions/echo", content=event)).raise_for_status()
                    gateway.append(time.perf_counter() - started)
    finally:
        await nc.drain()
    return {"requests": len(direct), "direct_p50_ms": _ms(direct, 0.5), "direct_p99_ms": _ms(direct, 0.99),
            "gateway_p50_ms": _ms(gateway, 0.5), "gateway_p99_ms": _ms(gateway, 0.99),
            "added_p50_ms": round(_ms(gateway, 0.5) - _ms(direct, 0.5), 3),
            "added_p99_ms": round(_ms(gateway, 0.99) - _ms(direct, 0.99), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("results/gateway.json"))
    args = parser.parse_args()
    node = LocalNode(ROOT / "functions", stderr=subprocess.DEVNULL,
                     state_dir=faas_home() / f"bench-gateway-{os.getpid()}",
                     extra_args=("--http", str(free_port()), "--sandbox-uids", "65300-65399"))
    url = node.start()
    try:
        result = asyncio.run(measure(url, node.http_url, args.requests))
    finally:
        node.stop()
    result = {"cpus": os.cpu_count(), "function": "echo", **result}
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
