"""Memory and cold start of N LoRA functions on one shared backbone, against the same
functions each holding its own backbone copy (classic serverless), in one run.

    python -m bench.sharing --counts 1,2,4,8,16 --out results/sharing

Model: a ~190M-parameter Llama (hidden 1024, 16 layers, 16 heads / 8 KV) in bf16, built
offline with fixed seeds, with one LoRA adapter (r=8, q/v) per function.

- shared: one node (`faas up`) serving N functions; functions are warmed one after another
  and the total PSS of the node's processes (agent, zygote, sandboxes; not nats-server) is
  read from /proc/PID/smaps_rollup after each. The first-token time of each function's
  first request (its sandbox not yet loaded) is the node's `ttft_ms`; after the first
  function the backbone is warm.
- copies: N fresh processes, each loading backbone + adapter itself and copying the weights
  into private memory (separate instances share no page cache); total PSS after each, and
  each process's time from spawn to its first token (a fresh-process cold start).

Writes sharing.json and sharing.png into --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.accounting import process_tree, pss_bytes
from bench.models import PROMPT, adapter_dir, build_model, write_functions
from faas import Client
from faas.bundled import faas_home
from faas.localnode import LocalNode

MIB = 1024 * 1024
_COPY_CHILD = """
import json, sys, time
import torch
torch.set_num_threads(1)
from runtime.engine import UsageMeter, load_engine
backbone, adapter, spawned_at = sys.argv[1], sys.argv[2], float(sys.argv[3])
engine = load_engine(backbone, adapter)
for p in engine.model.parameters():
    p.data = p.data.clone()   # a private copy, as in a separate container
meter = UsageMeter()
engine.generate({prompt!r}, meter, max_new_tokens=1)
print(json.dumps({{"ttft_ms": (meter.first_token_at - spawned_at) * 1000}}), flush=True)
sys.stdin.read()
""".format(prompt=PROMPT)


async def run_shared(model_dir: Path, counts: list[int], workdir: Path) -> dict:
    functions = workdir / "functions"
    write_functions(functions, model_dir, [f"fn{i}" for i in range(max(counts))])
    # Its own uid range: a `faas up` may be running beside the benchmark.
    node = LocalNode(functions, stderr=subprocess.DEVNULL, state_dir=workdir / "nats",
                     extra_args=("--sandbox-uids", "65000-65999"))
    url = node.start()
    points, ttfts = [], []
    try:
        async with Client(url) as client:
            for i in range(max(counts)):
                result = await client.invoke(f"fn{i}", {"prompt": PROMPT}, timeout_s=300)
                ttfts.append(result.metrics["ttft_ms"])
                if i + 1 in counts:
                    await asyncio.sleep(0.5)
                    points.append({"functions": i + 1, "pss_bytes": pss_bytes(process_tree(node.proc.pid, skip=b"nats-server"))})
                    print(f"shared  {i + 1:>3} functions: {points[-1]['pss_bytes'] / MIB:8.0f} MiB")
    finally:
        node.stop()
    return {"points": points, "first_request_ttft_ms": ttfts}


def run_copies(model_dir: Path, counts: list[int]) -> dict:
    procs, points, ttfts = [], [], []
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    try:
        for i in range(max(counts)):
            spawned = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, "-c", _COPY_CHILD, str(model_dir), str(adapter_dir(model_dir, i)),
                 str(spawned)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, env=env)
            procs.append(proc)
            line = proc.stdout.readline() if proc.stdout else b""
            ttfts.append(json.loads(line)["ttft_ms"])
            if i + 1 in counts:
                points.append({"functions": i + 1, "pss_bytes": pss_bytes([p.pid for p in procs])})
                print(f"copies  {i + 1:>3} functions: {points[-1]['pss_bytes'] / MIB:8.0f} MiB")
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    return {"points": points, "fresh_process_ttft_ms": ttfts}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, ttft) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in ("shared", "copies"):
        pts = result[mode]["points"]
        mem.plot([p["functions"] for p in pts], [p["pss_bytes"] / MIB for p in pts], "o-", label=mode)
    mem.set_xlabel("warm LoRA functions")
    mem.set_ylabel("total PSS (MiB)")
    mem.set_title("memory: one shared backbone vs a copy each")
    mem.legend()
    shared_cold = result["shared"]["first_request_ttft_ms"][1:]
    fresh = result["copies"]["fresh_process_ttft_ms"]
    ttft.bar(["not-yet-loaded fn,\nwarm backbone", "fresh process"],
             [sorted(shared_cold)[len(shared_cold) // 2], sorted(fresh)[len(fresh) // 2]])
    ttft.set_ylabel("time to first token, median (ms)")
    ttft.set_yscale("log")
    ttft.set_title("cold start")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1,2,4,8,16")
    parser.add_argument("--out", default="results/sharing")
    args = parser.parse_args(argv)
    counts = sorted({int(c) for c in args.counts.split(",")})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = faas_home() / "bench-sharing"
    model_dir = build_model(faas_home() / "bench-models", max(counts), "m200")
    backbone_bytes = (model_dir / "model.safetensors").stat().st_size
    print(f"backbone: {backbone_bytes / MIB:.0f} MiB bf16, functions: {counts}")

    result = {"benchmark": "sharing", "counts": counts, "backbone_bytes": backbone_bytes,
              "machine": {"cpus": os.cpu_count()}}
    result["shared"] = asyncio.run(run_shared(model_dir, counts, workdir))
    result["copies"] = run_copies(model_dir, counts)
    shared_cold = sorted(result["shared"]["first_request_ttft_ms"][1:])
    fresh = sorted(result["copies"]["fresh_process_ttft_ms"])
    result["summary"] = {
        "cold_ttft_warm_backbone_p50_ms": shared_cold[len(shared_cold) // 2] if shared_cold else None,
        "fresh_process_ttft_p50_ms": fresh[len(fresh) // 2],
    }
    if shared_cold:
        result["summary"]["cold_start_cut_x"] = (result["summary"]["fresh_process_ttft_p50_ms"]
                                                 / result["summary"]["cold_ttft_warm_backbone_p50_ms"])
    if 8 in counts:
        shared8 = next(p for p in result["shared"]["points"] if p["functions"] == 8)["pss_bytes"]
        result["summary"]["shared_8_bytes"] = shared8
        result["summary"]["target_8_bytes"] = 1.5 * backbone_bytes + 8 * 100 * MIB
    (out / "sharing.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "sharing.png")

    print(f"\n{'functions':>9} {'shared MiB':>11} {'copies MiB':>11}")
    for s, c in zip(result["shared"]["points"], result["copies"]["points"]):
        print(f"{s['functions']:>9} {s['pss_bytes'] / MIB:>11.0f} {c['pss_bytes'] / MIB:>11.0f}")
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {out / 'sharing.json'} and {out / 'sharing.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
