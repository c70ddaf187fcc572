"""The benchmark's workload generators: seeded, faithful to the trace, skewed, and with the
CoV each class promises."""

from __future__ import annotations

from collections import Counter

import pytest

from bench.workloads import (
    TraceRow,
    WorkloadSpec,
    coefficient_of_variation,
    generate,
    load_trace,
    time_scale,
    zipf_weights,
)

@pytest.fixture(scope="module")
def trace() -> list[TraceRow]:
    return load_trace()


def test_trace_is_read_in_time_order(trace):
    assert 19000 < len(trace) < 20000
    assert trace[0].at_s == 0 and 3400 < trace[-1].at_s < 3700  # about an hour
    assert all(a.at_s <= b.at_s for a, b in zip(trace, trace[1:]))
    assert trace[0].prompt_tokens == 374 and trace[0].output_tokens == 44


def test_trace_arrivals_are_preserved_when_not_thinned(trace):
    spec = WorkloadSpec(workload="trace", duration_s=360, rate_rps=1e9, max_prompt_tokens=10**6,
                        max_output_tokens=10**6)
    requests = generate(spec, trace)
    scale = time_scale(spec, trace)
    assert scale == pytest.approx(360 / trace[-1].at_s)
    assert [r.at_s for r in requests] == pytest.approx([row.at_s * scale for row in trace])
    assert sorted(r.prompt_tokens for r in requests) == sorted(row.prompt_tokens for row in trace)


def test_trace_thinning_meets_the_rate_and_caps_tokens(trace):
    spec = WorkloadSpec(workload="trace", duration_s=180, rate_rps=2.0)
    requests = generate(spec, trace)
    assert len(requests) == pytest.approx(360, rel=0.15)
    assert max(r.prompt_tokens for r in requests) == 256
    assert max(r.output_tokens for r in requests) == 32
    assert min(r.prompt_tokens for r in requests) >= 1
    assert requests[-1].at_s <= 180


def test_popularity_is_skewed(trace):
    requests = generate(WorkloadSpec(workload="trace", functions=12, rate_rps=20.0), trace)
    counts = Counter(r.function for r in requests)
    ranked = [counts[f"fn{i:02d}"] for i in range(12)]
    assert ranked[0] > 3 * sorted(ranked)[6]  # the hottest far above the median
    assert ranked[0] > ranked[5] > ranked[11]
    assert zipf_weights(3, 1.0) == pytest.approx([6 / 11, 3 / 11, 2 / 11])


@pytest.mark.parametrize(("workload", "low", "high"), [
    ("cov-predictable", 0.0, 1.0), ("cov-normal", 1.0, 4.0), ("cov-bursty", 4.0, float("inf"))])
def test_each_cov_class_has_its_coefficient_of_variation(trace, workload, low, high):
    spec = WorkloadSpec(workload=workload, functions=3, duration_s=20000, rate_rps=3.0, zipf_s=0.0)
    requests = generate(spec, trace)
    for name in ("fn00", "fn01", "fn02"):
        times = [r.at_s for r in requests if r.function == name]
        assert len(times) > 1000
        assert low < coefficient_of_variation(times) <= high


@pytest.mark.parametrize("workload", ["cov-predictable", "cov-normal", "cov-bursty"])
def test_each_cov_class_keeps_the_requested_rate_from_the_first_second(trace, workload):
    """Arrivals start in steady state: a bursty function does not open every run with a
    burst, so a short run gets the rate asked for (on average over seeds) too."""
    short = [len(generate(WorkloadSpec(workload=workload, duration_s=180, rate_rps=0.5, seed=s),
                          trace)) for s in range(1, 201)]
    assert sum(short) / len(short) == pytest.approx(90, rel=0.15)
    long = generate(WorkloadSpec(workload=workload, duration_s=20000, rate_rps=0.5), trace)
    assert len(long) == pytest.approx(10000, rel=0.2)


def test_burst_is_quiet_then_every_function_at_once(trace):
    spec = WorkloadSpec(workload="burst", functions=8, duration_s=100, rate_rps=1.0)
    requests = generate(spec, trace)
    quiet = [r for r in requests if r.at_s < 60]
    loud = [r for r in requests if r.at_s >= 60]
    assert {r.function for r in quiet} == {"fn00"}
    assert {r.function for r in loud} == {f"fn{i:02d}" for i in range(8)}
    assert max(r.at_s for r in loud) <= 62
    assert len(loud) > 5 * len(quiet)


def test_same_seed_same_requests_other_seed_others(trace):
    spec = WorkloadSpec(workload="cov-normal", seed=7)
    assert generate(spec, trace) == generate(spec, trace)
    assert generate(spec, trace) != generate(WorkloadSpec(workload="cov-normal", seed=8), trace)


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="unknown workload"):
        WorkloadSpec(workload="nope")
    with pytest.raises(ValueError):
        WorkloadSpec(rate_rps=0)
