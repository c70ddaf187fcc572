"""The contention-aware batch window (runtime/batching/window.py): at once without contention; under
contention, requests collected within the TTFT SLO; competing windows smallest margin first."""

from __future__ import annotations

import asyncio
import time

from runtime.batching.window import BatchWindow, Contention, PrefillProfile


def test_prefill_profile_fits_t0_and_the_cost_of_each_extra_prompt():
    profile = PrefillProfile()
    for rows, seconds in [(1, 0.10), (2, 0.14), (4, 0.22), (8, 0.38), (1, 0.10)]:
        profile.observe(rows, seconds)
    assert abs(profile.t0_s - 0.10) < 1e-6
    assert abs(profile.per_extra_s - 0.04) < 1e-6
    assert abs(profile.predict(5) - 0.26) < 1e-6
    # Prefill may take at most half the SLO: 0.1 + 0.04 (n-1) <= 0.5 -> n <= 11, capped by 8.
    assert profile.n_max(1.0, 8) == 8
    assert profile.n_max(0.4, 8) == 3
    assert profile.n_max(0.1, 8) == 1
    unknown = PrefillProfile(extra_share=1.0)  # one size seen on a CPU: assumed compute-bound
    for _ in range(3):
        unknown.observe(1, 0.3)
    assert (unknown.t0_s, unknown.n_max(10.0, 8)) == (0.3, 1)
    on_gpu = PrefillProfile(extra_share=0.1)
    on_gpu.observe(1, 0.02)
    assert on_gpu.n_max(1.0, 8) == 8
    compute_bound = PrefillProfile()  # each extra prompt costs 90% of a prefill of one
    for rows in (1, 2, 4, 1, 2):
        compute_bound.observe(rows, 0.1 + 0.09 * (rows - 1))
    assert compute_bound.n_max(10.0, 8) == 1  # no window: waiting would buy nothing


def _contention(busy: int, parallel: int = 4) -> Contention:
    return Contention("cpu", parallel, busy_functions=lambda: busy)


def _window(contention: Contention, slo_s: float = 2.0, max_batch: int = 8,
            t0_s: float = 0.2) -> BatchWindow:
    window = BatchWindow("fn", slo_s, max_batch, contention)
    window.profile.t0_s, window.profile.per_extra_s = t0_s, 0.01
    return window


async def test_without_contention_requests_go_at_once():
    window = _window(_contention(busy=1))  # only this function is busy
    started = time.monotonic()
    await window.hold(started, busy_here=True)
    assert time.monotonic() - started < 0.05
    assert window.windows == 0


async def test_under_contention_requests_arriving_together_leave_together():
    window = _window(_contention(busy=2), t0_s=0.2)
    released: list[float] = []

    async def request(delay: float) -> None:
        await asyncio.sleep(delay)
        await window.hold(time.monotonic(), busy_here=True)
        released.append(time.monotonic())

    started = time.monotonic()
    await asyncio.gather(*(request(d) for d in (0.0, 0.05, 0.1)))
    assert window.windows == 1
    assert max(released) - min(released) < 0.02  # one window, handed over together
    # It waited at most one prefill of one (0.2 s) for company.
    assert 0.15 < min(released) - started < 0.35


async def test_a_full_window_closes_at_once():
    window = _window(_contention(busy=2), t0_s=5.0, slo_s=60.0, max_batch=3)
    started = time.monotonic()
    await asyncio.gather(*(window.hold(time.monotonic(), busy_here=True) for _ in range(3)))
    assert time.monotonic() - started < 0.1


async def test_the_window_never_outwaits_the_slo():
    """A request that already waited most of its SLO is not held for company."""
    window = _window(_contention(busy=2), slo_s=1.0, t0_s=0.3)
    received = time.monotonic() - 0.6  # 0.6 of its 1 s spent before reaching the window
    started = time.monotonic()
    await window.hold(received, busy_here=True)
    # Its latest close: received + SLO - predicted prefill of n_max (0.3 + 0.01 (n-1)).
    assert time.monotonic() - started < 0.15


async def test_competing_windows_go_smallest_slo_margin_first():
    contention = _contention(busy=3, parallel=1)
    order: list[str] = []

    async def busy_device() -> None:  # a window already prefilling holds the device 0.3 s
        await contention.dispatch(margin_s=0.0, busy_s=0.3)

    async def window_of(name: str, margin_s: float) -> None:
        await asyncio.sleep(0.05)
        await contention.dispatch(margin_s=margin_s, busy_s=0.01)
        order.append(name)

    await busy_device()
    await asyncio.gather(window_of("relaxed", 5.0), window_of("urgent", 0.5),
                         window_of("middle", 2.0))
    assert order == ["urgent", "middle", "relaxed"]
