"""`faas bench`: replay a workload against serving modes, one after another on the same
requests, and write results.json, PNG plots and a table.

    faas bench --workload trace --functions 12 --minutes 3 --seed 1 --modes ours --out results/

The modes (bench/modes.py) run one after another on the same requests, each through its
own NATS front door and with the same memory capacity; the replay samples what each holds
and bills it as its kind of system is billed (bench/accounting.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.accounting import GIB, MemoryTrace, latency_summary, slo_attainment
from bench.models import BENCH_MODELS, build_model
from bench.modes import MODES, Mode, ModeConfig
from bench.workloads import (
    DEFAULT_TRACE,
    WORKLOADS,
    Request,
    WorkloadSpec,
    function_names,
    generate,
    history,
    load_trace,
    time_scale,
)
from faas import FaasError
from faas.cli import DefaultsHelpFormatter
from faas.bundled import faas_home



def add_workload_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    """The options that define a workload and its history (faas bench, bench.predictors)."""
    parser.add_argument("--workload", choices=WORKLOADS, default=default)
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--functions", type=int, default=12)
    parser.add_argument("--minutes", type=float, default=3.0)
    # A request of the default size costs ~2.2 core-seconds here (bench model, 1 thread):
    # 0.5 rps keeps a 2-core machine about half busy, where modes differ by design, not by
    # which one drowns first.
    parser.add_argument("--rate-rps", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--history-periods", type=int, default=10,
                        help="earlier runs of the workload fed to the invocation history first "
                             "(modes that keep one: ours); 0 starts with none")


def workload_spec(args: argparse.Namespace) -> WorkloadSpec:
    return WorkloadSpec(workload=args.workload, functions=args.functions,
                        duration_s=args.minutes * 60, rate_rps=args.rate_rps, seed=args.seed)


@dataclass
class Outcome:
    function: str
    at_s: float
    ttft_ms: float | None  # from the reply's metrics, as every mode measures it
    e2e_ms: float
    error: str | None = None
    level: str | None = None  # "cold" when the request waited for an instance to start


async def replay(mode: Mode, requests: list[Request], sample_every_s: float = 0.5,
                 label: str = "") -> tuple[list[Outcome], MemoryTrace, float]:
    """Send each request at its time; sample the mode's memory meanwhile; show progress
    (answered requests) on stderr."""
    progress = tqdm(total=len(requests), desc=f"{mode.name + label:>10}", unit="req", leave=True,
                    file=sys.stderr, dynamic_ncols=True)
    memory = MemoryTrace()
    memory.add(0.0, await mode.held_bytes())
    started = time.monotonic()

    async def one(request: Request) -> Outcome:
        await asyncio.sleep(max(0.0, started + request.at_s - time.monotonic()))
        sent = time.monotonic()
        try:
            metrics = await mode.invoke(request)
            return Outcome(request.function, request.at_s, metrics.get("ttft_ms"),
                           (time.monotonic() - sent) * 1000, level=metrics.get("level"))
        except FaasError as err:
            return Outcome(request.function, request.at_s, None, (time.monotonic() - sent) * 1000,
                           f"{err.code}: {err.message}")
        finally:
            progress.update()

    async def sample() -> None:
        while True:
            await asyncio.sleep(sample_every_s)
            memory.add(time.monotonic() - started, await mode.held_bytes())

    sampler = asyncio.create_task(sample())
    try:
        outcomes = await asyncio.gather(*(one(r) for r in requests))
    finally:
        progress.close()
    if sampler.done():  # it only ends by failing: the memory figures would be wrong
        sampler.result()
    sampler.cancel()
    await asyncio.gather(sampler, return_exceptions=True)
    duration = time.monotonic() - started
    memory.add(duration, await mode.held_bytes())
    return list(outcomes), memory, duration


def summarize(outcomes: list[Outcome], memory: MemoryTrace, duration_s: float, billing: str,
              slo_ms: float, price_per_gib_s: float, capacity_gib: float) -> dict[str, Any]:
    ok = [o for o in outcomes if o.error is None]
    levels = Counter(o.level for o in ok if o.level)
    return {
        "requests": len(outcomes), "errors": len(outcomes) - len(ok),
        "error_samples": sorted({o.error for o in outcomes if o.error})[:5],
        "cold_starts": levels["cold"],
        "levels": dict(levels),
        "ttft_ms": latency_summary([o.ttft_ms for o in ok if o.ttft_ms is not None]),
        "e2e_ms": latency_summary([o.e2e_ms for o in ok]),
        "throughput_rps": len(ok) / duration_s if duration_s else 0.0,
        "slo_attainment": slo_attainment([o.ttft_ms if o.error is None else None
                                          for o in outcomes], slo_ms),
        "memory_gib_s": memory.gib_seconds(duration_s),
        "peak_memory_gib": memory.peak_bytes / GIB,
        "over_capacity": memory.peak_bytes > capacity_gib * GIB,
        "billing": billing,
        "cost": memory.cost(billing, price_per_gib_s, duration_s),
        "duration_s": duration_s,
        "memory_over_time": memory.samples,
        "ttft_samples_ms": sorted(o.ttft_ms for o in ok if o.ttft_ms is not None),
        "outcomes": [asdict(o) for o in outcomes],
    }


def plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cdf, mem, cost) = plt.subplots(1, 3, figsize=(15, 4))
    for name, mode in results["modes"].items():
        ttfts = mode["ttft_samples_ms"]
        if ttfts:
            cdf.plot(ttfts, [(i + 1) / len(ttfts) for i in range(len(ttfts))], label=name)
        mem.plot([t for t, _ in mode["memory_over_time"]],
                 [b / GIB for _, b in mode["memory_over_time"]], label=name)
    cdf.set_xscale("log")
    cdf.set(xlabel="TTFT (ms)", ylabel="fraction of requests", title="TTFT CDF")
    mem.set(xlabel="time (s)", ylabel="held memory (GiB)", title="memory over time")
    names = list(results["modes"])
    cost.bar(names, [results["modes"][n]["cost"] for n in names])
    cost.set(title="cost", ylabel="price units")
    for axis in (cdf, mem):
        axis.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"faas bench: unknown mode(s) {', '.join(unknown)} "
                         f"(available: {', '.join(MODES)})")
    spec = workload_spec(args)
    trace = load_trace(args.trace)
    requests = generate(spec, trace)
    model_dir = build_model(faas_home() / "bench-models", args.functions, args.model)
    # Keep-alive of 10 trace-minutes, compressed like the arrivals.
    if args.device != "cpu" and not all(m.startswith("ours") for m in modes):
        raise SystemExit("faas bench: --device cuda runs our modes only (the baselines are CPU-only)")
    config = ModeConfig(model_dir=model_dir, names=function_names(args.functions),
                        workdir=faas_home() / "bench-paper",
                        keep_alive_s=600 * time_scale(spec, trace), capacity_gib=args.capacity_gib,
                        device=args.device, node_args=tuple(shlex.split(args.node_args)))
    results: dict[str, Any] = {"workload": {**asdict(spec), "requests": len(requests),
                                            "history_periods": args.history_periods,
                                            "warmup_s": config.keep_alive_s if args.warmup else 0.0,
                                            "trace": str(args.trace), "slo_ms": args.slo_ms,
                                            "price_per_gib_s": args.price_per_gib_s,
                                            "keep_alive_s": config.keep_alive_s,
                                            "capacity_gib": config.capacity_gib,
                                            "device": args.device, "node_args": args.node_args,
                                            "model": str(model_dir), "cpus": os.cpu_count()},
                               "modes": {}}
    print(json.dumps(results["workload"]), flush=True)
    earlier = history(spec, trace, args.history_periods)
    # The end of the history is served for real, unmeasured: every mode starts the run in the
    # state that traffic left it in (what a fixed keep-alive keeps, what a plan pre-loaded).
    warmup_s = config.keep_alive_s if args.warmup else 0.0
    warmup = [replace(r, at_s=r.at_s + warmup_s) for r in earlier if r.at_s >= -warmup_s]
    for name in modes:
        mode = MODES[name](config)
        try:
            await mode.start()
            seed = getattr(mode, "seed_history", None)
            if seed is not None:
                run_starts = time.time() + warmup_s
                await seed([(run_starts + r.at_s, r.function) for r in earlier if r.at_s < -warmup_s])
            if warmup:
                await replay(mode, warmup, label=" warm-up")
            outcomes, memory, duration = await replay(mode, requests)
        finally:
            await mode.stop()
        results["modes"][name] = {**summarize(outcomes, memory, duration, mode.billing,
                                              args.slo_ms, args.price_per_gib_s, args.capacity_gib),
                                  **mode.counters()}
    return results


def table(results: dict[str, Any]) -> str:
    """The run's summary, one row per mode (times in ms, memory-time in GiB-seconds)."""
    columns = ("mode", "ttft p50", "p95", "p99", "e2e p50", "p99", "rps", "slo", "cold",
               "GiB*s", "peak GiB", "cost", "errors")
    lines = ["  ".join(f"{c:>10}" for c in columns)]
    for name, m in results["modes"].items():
        t, e = m["ttft_ms"], m["e2e_ms"]
        cells = (name, t["p50"], t["p95"], t["p99"], e["p50"], e["p99"], m["throughput_rps"],
                 m["slo_attainment"], m["cold_starts"], m["memory_gib_s"], m["peak_memory_gib"],
                 m["cost"], m["errors"])
        lines.append("  ".join(f"{c:>10.2f}" if isinstance(c, float) else f"{c:>10}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="faas bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    add_workload_arguments(parser, default="trace")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="start measuring at once; by default each mode first serves, "
                             "unmeasured, the history's last keep-alive of requests")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--model", choices=BENCH_MODELS, default="smollm2",
                        help="smollm2: the bundled SmolLM2-135M-Instruct (bf16); m200: a ~190M random Llama")
    parser.add_argument("--slo-ms", type=float, default=2500.0)
    parser.add_argument("--price-per-gib-s", type=float, default=1.0)
    parser.add_argument("--capacity-gib", type=float, default=16.0,
                        help="memory every mode may hold; instances wait for room beyond it")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where our node keeps backbones (ours modes only)")
    parser.add_argument("--node-args", default="", help="more `faas up` options for our node")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    results = asyncio.run(run(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / "results.png")
    print(table(results))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
