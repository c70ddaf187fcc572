"""Predictors: from a function's invocation times, the chance it is invoked within the next
`horizon_s` seconds. Pure (no I/O, no clock): callers pass the times and `now`.

- `HybridHistogram`: after the hybrid histogram policy of "Serverless in the Wild" (Shahrad
  et al., ATC'20). It keeps a histogram of the function's inter-arrival times (arrival to
  arrival: our requests last seconds, not minutes). Where the paper turns it into a pre-warm
  and a keep-alive window (the 5th and 99th percentiles, 10% margins; we report them in
  `why`), we read from it the chance the planner needs: that a function idle for `s` seconds
  is invoked within `(s, s + horizon]` (inside the paper's windows that chance is high,
  outside them low). With too little history (fewer than `min_samples` gaps) it falls back
  to a fixed keep-alive, as the paper does; idle beyond every gap it has seen, to the rate
  estimate.
- `RateEstimate`: a Poisson process at the function's recent rate (the comparison).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Prediction:
    chance: float  # of at least one invocation within the horizon
    why: str  # for `faas ls`: which rule gave it


class Predictor(Protocol):
    name: str

    def predict(self, arrivals: Sequence[float], now: float, horizon_s: float) -> Prediction: ...


@dataclass(frozen=True)
class RateEstimate:
    """Poisson at the rate of the last `window` arrivals (their count over their span up
    to now); memoryless, so the chance is the same however long the function was idle."""

    window: int = 20
    name: str = "rate"

    def rate(self, arrivals: Sequence[float], now: float) -> float:
        recent = arrivals[-self.window:]
        if not recent:
            return 0.0
        return len(recent) / max(now - recent[0], 1.0)

    def predict(self, arrivals: Sequence[float], now: float, horizon_s: float) -> Prediction:
        rate = self.rate(arrivals, now)
        return Prediction(1.0 - math.exp(-rate * horizon_s), f"rate {rate:.3g}/s")


@dataclass(frozen=True)
class HybridHistogram:
    bin_s: float = 1.0  # histogram resolution
    range_s: float = 4 * 3600.0  # gaps beyond it are out of bounds (counted, not binned)
    min_samples: int = 5
    fallback_keep_alive_s: float = 600.0
    margin: float = 0.1
    # Pseudo-gaps of the rate estimate's chance mixed in: where few gaps were ever longer
    # than the current idle time, the histogram alone would say 0 or 1 on one or two samples.
    prior_weight: float = 2.0
    name: str = "histogram"

    def histogram(self, arrivals: Sequence[float]) -> Histogram:
        """The inter-arrival histogram of `arrivals` (cached: the node asks every second)."""
        return _histogram(tuple(arrivals), self.bin_s, self.range_s)

    def predict(self, arrivals: Sequence[float], now: float, horizon_s: float) -> Prediction:
        if not arrivals:
            return Prediction(0.0, "never invoked")
        idle = now - arrivals[-1]
        h = self.histogram(arrivals)
        if h.binned < self.min_samples or h.out > h.binned:
            # The paper's fallback: a fixed keep-alive after each invocation.
            kept = idle < self.fallback_keep_alive_s
            return Prediction(1.0 if kept else 0.0,
                              f"{h.binned} gaps: keep-alive {self.fallback_keep_alive_s:g}s")
        head, tail = h.quantile(0.05), h.quantile(0.99) + self.bin_s
        window = f"windows {head * (1 - self.margin):.3g}-{tail * (1 + self.margin):.3g}s"
        # P(next gap in (idle, idle + h] | gap > idle), from the histogram.
        within = h.below(idle + horizon_s) - h.below(idle)
        beyond = h.binned - h.below(idle) + h.out
        rate = RateEstimate().predict(arrivals, now, horizon_s).chance
        if beyond <= 0:
            return Prediction(rate, f"idle {idle:.3g}s beyond every gap ({window}): rate")
        chance = (within + self.prior_weight * rate) / (beyond + self.prior_weight)
        return Prediction(chance, f"idle {idle:.3g}s, {window}")


@dataclass(frozen=True)
class Histogram:
    """Gap counts per bin (sorted bins, cumulative counts) and the out-of-bounds count."""

    bin_s: float
    bins: tuple[int, ...]
    cumulative: tuple[int, ...]  # gaps in bins[0..i]
    out: int

    @property
    def binned(self) -> int:
        return self.cumulative[-1] if self.cumulative else 0

    def below(self, x: float) -> float:
        """Gaps shorter than x, a bin counting in proportion to its part below x (so a
        chance rises smoothly as a window approaches)."""
        b = x / self.bin_s
        i = bisect.bisect_left(self.bins, math.floor(b))
        full = self.cumulative[i - 1] if i > 0 else 0
        if i < len(self.bins) and self.bins[i] == math.floor(b):
            count = self.cumulative[i] - full
            return full + count * (b - math.floor(b))
        return float(full)

    def quantile(self, q: float) -> float:
        """The lower edge of the bin where the q-quantile of the binned gaps lies."""
        i = bisect.bisect_left(self.cumulative, q * self.binned)
        return self.bins[min(i, len(self.bins) - 1)] * self.bin_s


@functools.lru_cache(maxsize=256)
def _histogram(arrivals: tuple[float, ...], bin_s: float, range_s: float) -> Histogram:
    counts: Counter[int] = Counter()
    out = 0
    for earlier, later in zip(arrivals, arrivals[1:]):
        gap = later - earlier
        if gap >= range_s:
            out += 1
        else:
            counts[int(gap // bin_s)] += 1
    bins = tuple(sorted(counts))
    return Histogram(bin_s, bins, tuple(itertools.accumulate(counts[b] for b in bins)), out)


def followers(arrivals: Sequence[float], window_s: float, most: int = 8, per: int = 1) -> tuple[float, ...]:
    """How bursty a function is: entry k-1 is the share of its invocations that had at least
    k x `per` more within `window_s` (those that need a second, third... sandbox at once,
    where one sandbox takes `per` requests at a time), for k up to `most`. Arrivals in the
    last window are left out: their window has not ended."""
    return _followers(tuple(arrivals), window_s, most * per)[per - 1::per]


@functools.lru_cache(maxsize=256)
def _followers(arrivals: tuple[float, ...], window_s: float, most: int) -> tuple[float, ...]:
    if not arrivals:
        return ()
    complete = bisect.bisect_right(arrivals, arrivals[-1] - window_s)
    if complete == 0:
        return ()
    at_least = [0] * most
    for i in range(complete):
        more = min(bisect.bisect_right(arrivals, arrivals[i] + window_s) - i - 1, most)
        for k in range(more):
            at_least[k] += 1
    shares = [n / complete for n in at_least]
    while shares and shares[-1] == 0:
        shares.pop()
    return tuple(shares)
