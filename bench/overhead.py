"""Round-trip overhead of faas for a plain function.

Times `faas.invoke.echo` (NATS -> node agent -> sandbox process -> reply) against a bare
nats-py echo responder in another process on the same nats-server, interleaved in rounds
within one run so both see the same machine noise. Prints p50/p99 of both and the
difference, and writes JSON.

    python -m bench.overhead --requests 2000 --out results/overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import nats

from bench.accounting import percentile
from faas.localnode import LocalNode

ROOT = Path(__file__).resolve().parent.parent
BARE_SUBJECT = "bench.bare.echo"
_BARE_RESPONDER = f"""
import asyncio, json, sys, nats, msgpack
async def main():
    nc = await nats.connect(sys.argv[1], **json.loads(sys.stdin.readline()))
    async def echo(msg):
        await msg.respond(msgpack.packb({{"output": msgpack.unpackb(msg.data)}}))
    await nc.subscribe({BARE_SUBJECT!r}, cb=echo)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def summary(samples_ms: list[float]) -> dict[str, float]:
    return {"n": len(samples_ms), "p50_ms": percentile(samples_ms, 0.50),
            "p99_ms": percentile(samples_ms, 0.99), "mean_ms": statistics.fmean(samples_ms)}


async def time_requests(nc: nats.NATS, subject: str, body: bytes, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await nc.request(subject, body, timeout=10)
        samples.append((time.perf_counter() - start) * 1000)
    return samples


async def measure(url: str, credentials: dict[str, str], requests: int, rounds: int,
                  warmup: int) -> dict[str, list[float]]:
    nc = await nats.connect(url, **credentials)
    body = msgpack.packb({"text": "hello"})
    paths = {"bare": BARE_SUBJECT, "faas": "faas.invoke.echo"}
    try:
        for subject in paths.values():
            await time_requests(nc, subject, body, warmup)
        samples: dict[str, list[float]] = {name: [] for name in paths}
        per_round = max(1, requests // rounds)
        for _ in range(rounds):
            for name, subject in paths.items():
                samples[name] += await time_requests(nc, subject, body, per_round)
        return samples
    finally:
        await nc.drain()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per path")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--out", default="results/overhead.json")
    args = parser.parse_args(argv)

    # Its own uid range: a `faas up` may be running beside the benchmark.
    node = LocalNode(ROOT / "functions", stderr=subprocess.DEVNULL,
                     extra_args=("--sandbox-uids", "65000-65999"))
    url = node.start()
    # A responder needs more than a producer's rights: it logs in as the node does.
    bare = subprocess.Popen([sys.executable, "-c", _BARE_RESPONDER, url], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        if bare.stdin is not None:
            bare.stdin.write(json.dumps(node.node_credentials()).encode() + b"\n")
            bare.stdin.close()
        if bare.stdout is None or bare.stdout.readline().strip() != b"ready":
            raise RuntimeError("bare responder did not start")
        samples = asyncio.run(measure(url, node.node_credentials(), args.requests, args.rounds,
                                      args.warmup))
    finally:
        bare.kill()
        bare.wait()
        node.stop()

    result = {
        "benchmark": "overhead",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "params": vars(args),
        "bare": summary(samples["bare"]),
        "faas": summary(samples["faas"]),
    }
    result["added_p50_ms"] = result["faas"]["p50_ms"] - result["bare"]["p50_ms"]
    result["added_p99_ms"] = result["faas"]["p99_ms"] - result["bare"]["p99_ms"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    print(f"{'path':<6} {'n':>6} {'p50_ms':>8} {'p99_ms':>8} {'mean_ms':>8}")
    for name in ("bare", "faas"):
        s = result[name]
        print(f"{name:<6} {s['n']:>6} {s['p50_ms']:>8.3f} {s['p99_ms']:>8.3f} {s['mean_ms']:>8.3f}")
    print(f"added by faas: p50 {result['added_p50_ms']:.3f} ms, p99 {result['added_p99_ms']:.3f} ms")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
