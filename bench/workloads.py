"""Seeded workloads for the benchmarks: when each request arrives, for which function, with
how many prompt and output tokens. Pure functions of their parameters (no I/O but reading
the trace), so they are unit-tested and two modes of one run replay the very same requests.

- `trace`: the Azure LLM inference trace (arrival times and token counts), time-compressed
  into the run, thinned to a rate a CPU run can bear, spread over N functions with a Zipf
  popularity (a hot few, a rare many).
- `cov-predictable`, `cov-normal`, `cov-bursty`: per function, gamma-distributed gaps with a
  coefficient of variation of 0.5, 2 and 6 (the Azure Functions classes the paper uses:
  <= 1, 1-4, > 4; gamma with shape 1/CoV^2 has exactly that CoV, and for CoV > 1 produces the
  long idle gaps between bursts), rates by Zipf popularity, token counts drawn from the trace.
- `burst`: quiet (a trickle on the hottest function), then every function at once.

Token counts are capped (defaults: 256 prompt, 32 output) and time is scaled by
`duration_s / trace span`; keep-alives given in trace time scale the same way (`scale_s`).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import random
import statistics
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

WORKLOADS = ("trace", "cov-predictable", "cov-normal", "cov-bursty", "burst")
COV_TARGETS = {"cov-predictable": 0.5, "cov-normal": 2.0, "cov-bursty": 6.0}


@dataclass(frozen=True)
class TraceRow:
    at_s: float  # since the first request of the trace
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Request:
    at_s: float  # since the start of the run
    function: str
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything that defines a workload; stored in results so runs compare."""

    workload: str = "trace"
    functions: int = 12
    duration_s: float = 180.0
    rate_rps: float = 0.5  # average requests per second over the run
    seed: int = 1
    zipf_s: float = 1.1
    max_prompt_tokens: int = 256
    max_output_tokens: int = 32

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise ValueError(f"unknown workload {self.workload!r}; choose from {WORKLOADS}")
        if self.functions < 1 or self.duration_s <= 0 or self.rate_rps <= 0:
            raise ValueError("functions, duration_s and rate_rps must be positive")


# The Azure LLM inference trace, shipped with the benchmark (bench/traces/README.md: CC-BY).
DEFAULT_TRACE = Path(__file__).resolve().parent / "traces" / "AzureLLMInferenceTrace_conv.csv"


def load_trace(path: str | Path = DEFAULT_TRACE) -> list[TraceRow]:
    """Rows of the Azure trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens), in time order."""
    rows: list[tuple[datetime, int, int]] = []
    with open(path, newline="") as f:
        for record in csv.DictReader(f):
            stamp = record["TIMESTAMP"].strip()
            # Seven fractional digits: datetime takes six.
            head, _, frac = stamp.partition(".")
            when = datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}")
            rows.append((when, int(record["ContextTokens"]), int(record["GeneratedTokens"])))
    rows.sort()
    start = rows[0][0]
    return [TraceRow((w - start).total_seconds(), c, g) for w, c, g in rows]


def function_names(n: int) -> list[str]:
    return [f"fn{i:02d}" for i in range(n)]


def zipf_weights(n: int, s: float) -> list[float]:
    """Popularity of the n functions, most popular first, summing to 1."""
    raw = [1.0 / (rank ** s) for rank in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def coefficient_of_variation(times: list[float]) -> float:
    """CoV of the gaps between sorted arrival times (nan with fewer than 3 arrivals)."""
    gaps = [b - a for a, b in zip(times, times[1:])]
    if len(gaps) < 2 or statistics.fmean(gaps) == 0:
        return math.nan
    return statistics.pstdev(gaps) / statistics.fmean(gaps)


def _tokens(row: TraceRow, spec: WorkloadSpec) -> tuple[int, int]:
    return (max(1, min(row.prompt_tokens, spec.max_prompt_tokens)),
            max(1, min(row.output_tokens, spec.max_output_tokens)))


def generate(spec: WorkloadSpec, trace: list[TraceRow]) -> list[Request]:
    """The requests of `spec`, sorted by arrival time. Same spec, same requests."""
    rng = random.Random(spec.seed)
    names = function_names(spec.functions)
    weights = zipf_weights(spec.functions, spec.zipf_s)
    if spec.workload == "trace":
        requests = _from_trace(spec, trace, rng, names, weights)
    elif spec.workload == "burst":
        requests = _burst(spec, trace, rng, names)
    else:
        requests = _gamma_arrivals(spec, trace, rng, names, weights, COV_TARGETS[spec.workload])
    return sorted(requests, key=lambda r: (r.at_s, r.function))


def history(spec: WorkloadSpec, trace: list[TraceRow], periods: int) -> list[Request]:
    """`periods` earlier runs of the same workload (other seeds), back to back before the
    run: what a node that has served it for a while has in its invocation history. Times
    are negative, in seconds before the run starts."""
    requests = []
    for back in range(1, periods + 1):
        earlier = dataclasses.replace(spec, seed=spec.seed + 7919 * back)
        requests += [dataclasses.replace(r, at_s=r.at_s - back * spec.duration_s)
                     for r in generate(earlier, trace)]
    return sorted(requests, key=lambda r: (r.at_s, r.function))


def time_scale(spec: WorkloadSpec, trace: list[TraceRow]) -> float:
    """Run seconds per trace second (trace workload); keep-alives in trace time scale by it."""
    return spec.duration_s / max(trace[-1].at_s, 1e-9)


def _from_trace(spec: WorkloadSpec, trace: list[TraceRow], rng: random.Random,
                names: list[str], weights: list[float]) -> list[Request]:
    scale = time_scale(spec, trace)
    keep = min(1.0, spec.rate_rps * spec.duration_s / len(trace))
    requests = []
    for row in trace:
        if rng.random() >= keep:
            continue
        prompt, output = _tokens(row, spec)
        requests.append(Request(row.at_s * scale, rng.choices(names, weights)[0], prompt, output))
    return requests


def _gamma_arrivals(spec: WorkloadSpec, trace: list[TraceRow], rng: random.Random,
                    names: list[str], weights: list[float], cov: float) -> list[Request]:
    shape = 1.0 / (cov * cov)
    requests = []
    for name, weight in zip(names, weights):
        mean_gap = 1.0 / (spec.rate_rps * weight)
        # Start in the process's steady state: the run begins inside a gap picked with
        # probability proportional to its length (for a gamma gap, shape + 1), at a uniform
        # point of it. Starting at a uniform phase of the *mean* gap instead makes every
        # bursty function begin with a burst (3x the rate over 3 minutes at CoV 6).
        t = rng.random() * rng.gammavariate(shape + 1, mean_gap / shape)
        while t < spec.duration_s:
            prompt, output = _tokens(rng.choice(trace), spec)
            requests.append(Request(t, name, prompt, output))
            t += rng.gammavariate(shape, mean_gap / shape)
    return requests


def _burst(spec: WorkloadSpec, trace: list[TraceRow], rng: random.Random,
           names: list[str]) -> list[Request]:
    """The first 60% of the run: a trickle on the hottest function; then, within 2% of the
    run, every function receives its share of the remaining requests."""
    total = max(len(names), round(spec.rate_rps * spec.duration_s))
    quiet_end, burst_len = 0.6 * spec.duration_s, 0.02 * spec.duration_s
    trickle = max(1, total // 10)
    requests = [Request(quiet_end * (i + 0.5) / trickle, names[0], *_tokens(rng.choice(trace), spec))
                for i in range(trickle)]
    per_function = max(1, (total - trickle) // len(names))
    for name in names:
        for _ in range(per_function):
            requests.append(Request(quiet_end + rng.uniform(0, burst_len), name,
                                    *_tokens(rng.choice(trace), spec)))
    return requests
