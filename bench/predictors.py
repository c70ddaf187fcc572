"""How well each predictor foresees a workload's invocations, offline (no serving): the run's
arrivals, after the same seeded history `faas bench` feeds the node, are replayed through
the hybrid histogram, the rate estimate and a fixed keep-alive. Every second, each predicts
for each function the chance of an invocation within the horizon; we score those chances
against what happened (Brier score: lower is better) and, for a pre-load threshold, the
share of invocations that found their function pre-loaded (hits) against the share of
function-seconds spent pre-loaded (the memory it costs).

    python -m bench.predictors [--workload cov-normal] [--functions 12] [--out results/predictors.json]
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
from pathlib import Path
from typing import Any

from bench.paper import add_workload_arguments, workload_spec
from bench.workloads import generate, history, load_trace, time_scale
from runtime.preload.predict import HybridHistogram, Predictor, RateEstimate

THRESHOLDS = (0.05, 0.1, 0.2, 0.5)


def evaluate(predictor: Predictor, arrivals: dict[str, list[float]], duration_s: float,
             horizon_s: float, step_s: float = 1.0) -> dict[str, Any]:
    """Score `predictor` over [0, duration_s) given every function's sorted arrival times
    (history before 0 included)."""
    brier, samples = 0.0, 0
    on = {t: 0 for t in THRESHOLDS}  # function-steps pre-loaded
    hits = {t: 0 for t in THRESHOLDS}
    invocations = 0
    steps = int(duration_s / step_s)
    for times in arrivals.values():
        chances = []
        for i in range(steps):
            now = i * step_s
            seen = times[:bisect.bisect_right(times, now)]
            chance = predictor.predict(seen, now, horizon_s).chance
            happened = bisect.bisect_right(times, now + horizon_s) > len(seen)
            brier += (chance - happened) ** 2
            samples += 1
            chances.append(chance)
            for t in THRESHOLDS:
                on[t] += chance >= t
        for at in times:
            if 0 <= at < duration_s:
                invocations += 1
                # The plan in force when it arrived: the last one made before it.
                last = chances[min(int(at // step_s), steps - 1)]
                for t in THRESHOLDS:
                    hits[t] += last >= t
    return {"brier": brier / max(samples, 1),
            "by_threshold": {str(t): {"hit_rate": hits[t] / max(invocations, 1),
                                      "preloaded_share": on[t] / max(samples, 1)}
                             for t in THRESHOLDS},
            "invocations": invocations}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.predictors", description=__doc__.split("\n\n")[0])
    add_workload_arguments(parser, default="cov-normal")
    parser.add_argument("--horizon-s", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=Path("results/predictors.json"))
    args = parser.parse_args(argv)
    spec = workload_spec(args)
    trace = load_trace(args.trace)
    keep_alive_s = 600 * time_scale(spec, trace)  # as faas bench gives the modes
    arrivals: dict[str, list[float]] = {}
    for r in history(spec, trace, args.history_periods) + generate(spec, trace):
        arrivals.setdefault(r.function, []).append(r.at_s)
    for times in arrivals.values():
        times.sort()
    predictors: dict[str, Predictor] = {
        "histogram": HybridHistogram(fallback_keep_alive_s=keep_alive_s),
        "rate": RateEstimate(),
        "keep-alive": HybridHistogram(min_samples=10 ** 9, fallback_keep_alive_s=keep_alive_s)}
    results = {"workload": {**vars(spec), "history_periods": args.history_periods,
                            "horizon_s": args.horizon_s, "keep_alive_s": keep_alive_s},
               "predictors": {name: evaluate(p, arrivals, spec.duration_s, args.horizon_s)
                              for name, p in predictors.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"{'predictor':>12} {'brier':>7} " + " ".join(f"{'hit@' + str(t):>9} {'on@' + str(t):>8}"
                                                      for t in THRESHOLDS))
    for name, r in results["predictors"].items():
        cells = " ".join(f"{r['by_threshold'][str(t)]['hit_rate']:>9.2f} "
                         f"{r['by_threshold'][str(t)]['preloaded_share']:>8.2f}" for t in THRESHOLDS)
        print(f"{name:>12} {r['brier']:>7.3f} {cells}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
