"""Predictors: from a function's invocation times, the chance it is invoked within the next
`horizon_s` seconds. Pure (no I/O, no clock): callers pass the times and `now`.

- `HybridHistogram`: the hybrid histogram policy of "Serverless in the Wild" (Shahrad et
  al., ATC'20). It keeps a histogram of the function's inter-arrival times (arrival to
  arrival: our requests last seconds, not minutes), and reads from it the chance that a
  function idle for `s` seconds is invoked within `(s, s + horizon]`. Its pre-warm and
  keep-alive windows (the 5th and 99th percentiles, with a 10% margin) are what the paper
  schedules by; we report them and they bound where the chance is read. With too little
  history (fewer than `min_samples` gaps) it falls back to a fixed keep-alive, as the
  paper does; idle beyond every gap it has seen, it falls back to the rate estimate.
- `RateEstimate`: a Poisson process at the function's recent rate (the comparison).
"""

from __future__ import annotations

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

    def histogram(self, arrivals: Sequence[float]) -> tuple[Counter[int], int]:
        """Inter-arrival counts per bin, and how many gaps were out of bounds."""
        bins: Counter[int] = Counter()
        out = 0
        for earlier, later in zip(arrivals, arrivals[1:]):
            gap = later - earlier
            if gap >= self.range_s:
                out += 1
            else:
                bins[int(gap // self.bin_s)] += 1
        return bins, out

    def windows(self, bins: Counter[int]) -> tuple[float, float]:
        """(pre-warm, keep-alive end), seconds after an arrival: the 5th percentile less
        the margin and the 99th plus it, as in the paper."""
        total = sum(bins.values())
        head = tail = None
        seen = 0
        for b in sorted(bins):
            seen += bins[b]
            if head is None and seen >= 0.05 * total:
                head = b * self.bin_s
            if seen >= 0.99 * total:
                tail = (b + 1) * self.bin_s
                break
        assert head is not None and tail is not None
        return head * (1 - self.margin), tail * (1 + self.margin)

    def predict(self, arrivals: Sequence[float], now: float, horizon_s: float) -> Prediction:
        if not arrivals:
            return Prediction(0.0, "never invoked")
        idle = now - arrivals[-1]
        bins, out = self.histogram(arrivals)
        total = sum(bins.values())
        if total < self.min_samples or out > total:
            # The paper's fallback: a fixed keep-alive after each invocation.
            kept = idle < self.fallback_keep_alive_s
            return Prediction(1.0 if kept else 0.0,
                              f"{total} gaps: keep-alive {self.fallback_keep_alive_s:g}s")
        prewarm, keep_until = self.windows(bins)
        # P(next gap in (idle, idle + h] | gap > idle), from the histogram; a bin counts in
        # proportion to its overlap with the interval, so the chance rises smoothly as the
        # window approaches.
        beyond = within = 0.0
        for b, count in bins.items():
            low, high = b * self.bin_s, (b + 1) * self.bin_s
            if high <= idle:
                continue
            part = (high - max(low, idle)) / self.bin_s
            beyond += count * part
            within += count * max(0.0, min(high, idle + horizon_s) - max(low, idle)) / self.bin_s
        window = f"windows {prewarm:.3g}-{keep_until:.3g}s"
        rate = RateEstimate().predict(arrivals, now, horizon_s).chance
        if beyond + out <= 0:
            return Prediction(rate, f"idle {idle:.3g}s beyond every gap ({window}): rate")
        chance = (within + self.prior_weight * rate) / (beyond + out + self.prior_weight)
        return Prediction(chance, f"idle {idle:.3g}s, {window}")


PREDICTORS: dict[str, type[HybridHistogram] | type[RateEstimate]] = {
    "histogram": HybridHistogram, "rate": RateEstimate}
