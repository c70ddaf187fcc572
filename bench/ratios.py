"""Ratios of `ours` to every other mode, from the results.json of `faas bench` runs: p99 (and
p50) TTFT, p99 end-to-end latency, cost, memory-time, SLO attainment and throughput, one row
per workload and baseline, as a markdown table on stdout and `ratios.json` beside the runs.
A ratio below 1 means ours is lower (better, except for SLO attainment and throughput).

    python -m bench.ratios results/     # reads results/*/results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

METRICS = {
    "ttft_p50": lambda m: m["ttft_ms"]["p50"],
    "ttft_p99": lambda m: m["ttft_ms"]["p99"],
    "e2e_p99": lambda m: m["e2e_ms"]["p99"],
    "cost": lambda m: m["cost"],
    "memory_gib_s": lambda m: m["memory_gib_s"],
    "slo_attainment": lambda m: m["slo_attainment"],
    "throughput_rps": lambda m: m["throughput_rps"],
}


def ratios(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """For each baseline of one run: ours / baseline, per metric (None where undefined)."""
    modes = results["modes"]
    ours = modes["ours"]
    table: dict[str, dict[str, float | None]] = {}
    for name, baseline in modes.items():
        if name == "ours":
            continue
        row: dict[str, float | None] = {}
        for metric, value in METRICS.items():
            a, b = value(ours), value(baseline)
            row[metric] = a / b if a is not None and b else None
        table[name] = row
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ratios")
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    runs = sorted(args.folder.glob("*/results.json"))
    if not runs:
        raise SystemExit(f"no */results.json under {args.folder}")
    every: dict[str, Any] = {}
    print("| workload | ours vs | " + " | ".join(METRICS) + " |")
    print("|---|---|" + "---|" * len(METRICS))
    for path in runs:
        results = json.loads(path.read_text())
        if "ours" not in results["modes"]:
            continue
        workload = results["workload"]["workload"]
        every[workload] = ratios(results)
        for baseline, row in every[workload].items():
            cells = [f"{v:.2f}" if v is not None else "-" for v in row.values()]
            print(f"| {workload} | {baseline} | " + " | ".join(cells) + " |")
    (args.folder / "ratios.json").write_text(json.dumps(every, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
