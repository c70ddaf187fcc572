"""Memory and cold start of N LoRA functions on one shared backbone, against the same
functions each holding its own backbone copy (classic serverless), in one run.

    python -m bench.sharing --counts 1,2,4,8,16 --out results/sharing

Model: a ~190M-parameter Llama (hidden 1024, 16 layers, 16 heads / 8 KV) in bf16, built
offline with fixed seeds, with one LoRA adapter (r=8, q/v) per function.

- engine / sandbox: one node (`faas up`) serving N functions, generating in the node's
  engine (the default) or each in its own sandbox with the backbone mapped (the paper's
  path); functions are warmed one after another and the total PSS of the node's processes
  (agent, zygotes, engine, sandboxes; not nats-server) is read from /proc/PID/smaps_rollup
  after each, with the engine's own share. The first-token time of each function's first
  request (its sandbox not yet loaded) is the node's `ttft_ms`; after the first function
  the backbone (and the engine) is warm.
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

from bench.accounting import process_tree, processes, pss_bytes
from bench.models import PROMPT, adapter_dir, build_model, write_functions
from faas import Client
from faas.bundled import faas_home
from faas.localnode import LocalNode

MIB = 1024 * 1024
_COPY_CHILD = """
import json, sys, time
import torch
torch.set_num_threads(1)
from runtime.sandbox.meter import UsageMeter
from runtime.sandbox.model import load_lora_model
backbone, adapter, spawned_at = sys.argv[1], sys.argv[2], float(sys.argv[3])
lora = load_lora_model(backbone, adapter)
for p in lora.model.parameters():
    p.data = p.data.clone()   # a private copy, as in a separate container
meter = UsageMeter()
lora.generate({prompt!r}, meter, max_new_tokens=1)
print(json.dumps({{"ttft_ms": (meter.first_token_at - spawned_at) * 1000}}), flush=True)
sys.stdin.read()
""".format(prompt=PROMPT)


async def run_shared(model_dir: Path, counts: list[int], workdir: Path, engine: str) -> dict:
    functions = workdir / f"functions-{engine}"
    write_functions(functions, model_dir, [f"fn{i}" for i in range(max(counts))], engine)
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
                    tree = process_tree(node.proc.pid, skip=b"nats-server")
                    engines = [p.pid for p in processes() if p.pid in tree and b"runtime.engine.server" in p.cmdline]
                    points.append({"functions": i + 1, "pss_bytes": pss_bytes(tree),
                                   "engine_pss_bytes": pss_bytes(engines)})
                    print(f"{engine:<8}{i + 1:>3} functions: {points[-1]['pss_bytes'] / MIB:8.0f} MiB")
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
    for mode in ("engine", "sandbox", "copies"):
        pts = result[mode]["points"]
        mem.plot([p["functions"] for p in pts], [p["pss_bytes"] / MIB for p in pts], "o-", label=mode)
    mem.set_xlabel("warm LoRA functions")
    mem.set_ylabel("total PSS (MiB)")
    mem.set_title("memory: one shared backbone vs a copy each")
    mem.legend()
    engine_cold = sorted(result["engine"]["first_request_ttft_ms"][1:])
    sandbox_cold = sorted(result["sandbox"]["first_request_ttft_ms"][1:])
    fresh = sorted(result["copies"]["fresh_process_ttft_ms"])
    ttft.bar(["not-yet-loaded fn,\nwarm engine", "not-yet-loaded fn,\nwarm backbone\n(own sandbox)",
              "fresh process"],
             [engine_cold[len(engine_cold) // 2], sandbox_cold[len(sandbox_cold) // 2], fresh[len(fresh) // 2]])
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
    for engine in ("engine", "sandbox"):
        result[engine] = asyncio.run(run_shared(model_dir, counts, workdir,
                                                "shared" if engine == "engine" else "sandbox"))
    result["copies"] = run_copies(model_dir, counts)
    fresh = sorted(result["copies"]["fresh_process_ttft_ms"])
    result["summary"] = {"fresh_process_ttft_p50_ms": fresh[len(fresh) // 2]}
    for engine in ("engine", "sandbox"):
        cold = sorted(result[engine]["first_request_ttft_ms"][1:])
        if cold:
            result["summary"][f"{engine}_cold_ttft_warm_backbone_p50_ms"] = cold[len(cold) // 2]
        if 8 in counts:
            point = next(p for p in result[engine]["points"] if p["functions"] == 8)
            result["summary"][f"{engine}_8_bytes"] = point["pss_bytes"]
            if engine == "engine":  # the node, all told, within the engine + 40 MiB a function
                result["summary"]["engine_process_8_bytes"] = point["engine_pss_bytes"]
                result["summary"]["target_8_bytes"] = point["engine_pss_bytes"] + 8 * 40 * MIB
    (out / "sharing.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "sharing.png")

    print(f"\n{'functions':>9} {'engine MiB':>11} {'sandbox MiB':>12} {'copies MiB':>11}")
    for e, s, c in zip(result["engine"]["points"], result["sandbox"]["points"], result["copies"]["points"]):
        print(f"{e['functions']:>9} {e['pss_bytes'] / MIB:>11.0f} {s['pss_bytes'] / MIB:>12.0f} "
              f"{c['pss_bytes'] / MIB:>11.0f}")
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {out / 'sharing.json'} and {out / 'sharing.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
