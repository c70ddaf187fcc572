"""Events per second through a plain triggered function: publish N events with JetStream
acks, then time until the function's consumer has nothing pending or unacked.

    python -m bench.events [--events 2000] [--max-batch 1] [--out results/events.json]

One node (`faas up`, embedded nats-server) serving one function, `sink`, triggered by
`events.bench.>`; `--max-batch` is how many of its handlers run at once in its sandbox.
One event first starts its sandbox; the clock starts after it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import msgpack
import nats

from bench import write_result
from faas.bundled import faas_home
from faas.localnode import LocalNode

SINK = """from faas import function

@function(name="sink", triggers=["events.bench.>"], max_batch={max_batch}, max_queue=100000)
def sink(event, ctx):
    return {{"n": event.get("n")}}
"""


async def _drained(js: Any) -> Any:
    """Wait until the sink's consumer has nothing pending or unacked; its last info."""
    while True:
        info = await js.consumer_info("FAAS_EVENTS", "faas-sink")
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return info
        await asyncio.sleep(0.02)


async def measure(url: str, credentials: dict[str, str], events: int) -> dict[str, float]:
    nc = await nats.connect(url, **credentials)
    js = nc.jetstream()
    try:
        await js.publish("events.bench.warm", msgpack.packb({"n": -1}))  # its sandbox starts
        await _drained(js)
        started = time.monotonic()
        for n in range(events):
            await js.publish(f"events.bench.{n % 8}", msgpack.packb({"n": n}))
        published = time.monotonic()
        info = await _drained(js)
        done = time.monotonic()
        return {"events": events, "publish_s": round(published - started, 3),
                "total_s": round(done - started, 3),
                "events_per_s": round(events / (done - started), 1),
                "publish_per_s": round(events / (published - started), 1),
                "redelivered": info.num_redelivered}
    finally:
        await nc.drain()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--max-batch", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results/events.json"))
    args = parser.parse_args()
    work = faas_home() / "bench-events"
    functions = work / "functions"
    functions.mkdir(parents=True, exist_ok=True)
    (functions / "sink.py").write_text(SINK.format(max_batch=args.max_batch))
    node = LocalNode(functions, stderr=subprocess.DEVNULL,
                     state_dir=work / f"nats-{os.getpid()}", extra_args=("--sandbox-uids", "65000-65999"))
    url = node.start()
    try:
        result = asyncio.run(measure(url, node.node_credentials(), args.events))
    finally:
        node.stop()
    write_result(args.out, {"max_batch": args.max_batch, "cpus": os.cpu_count(), **result})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
