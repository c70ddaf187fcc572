"""Benchmark accounting: percentiles, SLO attainment, memory-time and the two billing models."""

from __future__ import annotations

import math
import os

import pytest

from bench.accounting import GIB, MemoryTrace, latency_summary, percentile, pss_bytes, slo_attainment


def test_percentiles_interpolate():
    assert math.isnan(percentile([], 0.5))
    assert percentile([5.0], 0.99) == 5.0
    assert percentile([1, 2, 3, 4], 0.5) == 2.5
    assert latency_summary(list(range(101))) == {"p50": 50, "p95": 95, "p99": 99}


def test_slo_attainment_counts_failures_as_misses():
    assert slo_attainment([100, 2000, 3000, None], 2500) == 0.5
    assert math.isnan(slo_attainment([], 2500))


def test_serverless_pays_what_it_holds_serverful_its_peak():
    trace = MemoryTrace()
    trace.add(0, 1 * GIB)   # 1 GiB for 10 s
    trace.add(10, 3 * GIB)  # 3 GiB for 5 s
    trace.add(15, 0)        # scaled to zero for the rest
    assert trace.gib_seconds(until_s=60) == pytest.approx(10 + 15)
    assert trace.cost("serverless", price_per_gib_s=2.0, duration_s=60) == pytest.approx(50)
    assert trace.peak_bytes == 3 * GIB
    assert trace.cost("serverful", price_per_gib_s=2.0, duration_s=60) == pytest.approx(360)
    with pytest.raises(ValueError):
        trace.cost("free", 1.0, 60)


def test_pss_of_this_process_is_real_and_missing_processes_count_nothing():
    assert pss_bytes([os.getpid()]) > 10 * 1024 * 1024
    assert pss_bytes([2**22 + 12345]) == 0


async def test_a_tiny_replay_is_timed_and_billed():
    """The replay sends each request at its time and bills what the mode held meanwhile."""
    import time

    from bench.paper import replay, summarize
    from bench.workloads import Request

    class Constant:  # a mode that holds 2 GiB and answers with a fixed first-token time
        name, billing = "constant", "serverless"

        def __init__(self) -> None:
            self.sent: list[float] = []

        async def held_bytes(self) -> int:
            return 2 * GIB

        async def invoke(self, request: Request) -> dict:
            self.sent.append(time.monotonic())
            return {"ttft_ms": 100.0 if request.function == "fast" else 4000.0,
                    "level": "cold" if len(self.sent) == 1 else "loaded"}

    mode = Constant()
    requests = [Request(0.0, "fast", 8, 4), Request(0.3, "slow", 8, 4), Request(0.6, "fast", 8, 4)]
    outcomes, memory, duration = await replay(mode, requests, sample_every_s=0.1)
    gaps = [b - a for a, b in zip(mode.sent, mode.sent[1:])]
    assert gaps == pytest.approx([0.3, 0.3], abs=0.05)
    result = summarize(outcomes, memory, duration, "serverless", slo_ms=2500, price_per_gib_s=0.5,
                       capacity_gib=16)
    assert result["slo_attainment"] == pytest.approx(2 / 3)
    assert result["cold_starts"] == 1 and not result["over_capacity"]
    assert result["memory_gib_s"] == pytest.approx(2 * duration, rel=0.05)
    assert result["cost"] == pytest.approx(result["memory_gib_s"] * 0.5)
    serverful = summarize(outcomes, memory, duration, "serverful", 2500, 0.5, capacity_gib=1.5)
    assert serverful["cost"] == pytest.approx(2 * duration * 0.5)
    assert serverful["over_capacity"]  # held 2 GiB of a 1.5 GiB machine: flagged


def test_shared_memory_kept_open_but_unmapped_is_held_and_mapped_is_not_counted_twice():
    """A node keeps its backbone's memfd open between sandboxes: PSS cannot see it then."""
    import mmap

    from bench.accounting import held_bytes, pss_bytes, unmapped_shared_bytes

    me = [os.getpid()]
    before = unmapped_shared_bytes(me)
    fd = os.memfd_create("faas-test")
    try:
        os.write(fd, b"x" * (4 << 20))
        assert unmapped_shared_bytes(me) - before == 4 << 20
        assert held_bytes(me) - pss_bytes(me) > (4 << 20) - (1 << 20)  # PSS moves a little
        with mmap.mmap(fd, 4 << 20, prot=mmap.PROT_READ) as view:
            assert unmapped_shared_bytes(me) == before  # now the mapping's pages are in PSS
            assert sum(view[i] for i in range(0, 4 << 20, 4096)) == ord("x") * 1024
            assert pss_bytes(me) >= 4 << 20
    finally:
        os.close(fd)
