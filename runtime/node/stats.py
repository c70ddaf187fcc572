"""Per-function request statistics of one node, for `$SRV.STATS` and `faas top`: counts
since start, errors by code, and over the last minute the request rate and TTFT / latency
percentiles."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from faas.errors import FaasError
from faas.protocol import Metrics
from runtime.node.invocation import Hook

if TYPE_CHECKING:
    from runtime.node.metrics import NodeMetrics

_WINDOW_S = 60.0


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


@dataclass
class FunctionStats:
    requests: int = 0
    errors: dict[int, int] = field(default_factory=dict)
    forwarded: int = 0  # sent to another node, which served them
    # (time.monotonic(), ttft_ms or None, total_ms) of the last minute's answered requests
    recent: deque[tuple[float, float | None, float]] = field(default_factory=deque)

    def _trim(self, now: float) -> None:
        while self.recent and self.recent[0][0] < now - _WINDOW_S:
            self.recent.popleft()

    def record(self, ttft_ms: float | None, total_ms: float) -> None:
        self.requests += 1
        now = time.monotonic()
        self.recent.append((now, ttft_ms, total_ms))
        self._trim(now)

    def record_error(self, code: int) -> None:
        self.requests += 1
        self.errors[code] = self.errors.get(code, 0) + 1

    def summary(self) -> dict[str, Any]:
        self._trim(time.monotonic())
        ttfts = [t for _, t, _ in self.recent if t is not None]
        totals = [total for _, _, total in self.recent]
        return {"requests": self.requests, "errors": sum(self.errors.values()),
                "errors_by_code": {str(k): v for k, v in sorted(self.errors.items())},
                "forwarded": self.forwarded, "rps_1m": round(len(self.recent) / _WINDOW_S, 3),
                "ttft_p50_ms": _percentile(ttfts, 0.5), "ttft_p99_ms": _percentile(ttfts, 0.99),
                "latency_p50_ms": _percentile(totals, 0.5), "latency_p99_ms": _percentile(totals, 0.99)}


class NodeStats(Hook):
    """FunctionStats by function name (kept across redeploys of a function), and the
    node's Prometheus metrics when it serves them: a hook on the invocation path
    (runtime/node/invocation.py), so requests and events alike."""

    def __init__(self, metrics: NodeMetrics | None = None) -> None:
        self.functions: dict[str, FunctionStats] = {}
        self.metrics = metrics

    def __getitem__(self, name: str) -> FunctionStats:
        return self.functions.setdefault(name, FunctionStats())

    def answered(self, function: str, metrics: Metrics) -> None:
        self[function].record(metrics.ttft_ms, metrics.total_ms)
        if self.metrics is not None:
            self.metrics.answered(function, metrics.ttft_ms, metrics.total_ms, metrics.level or "")

    def failed(self, function: str, err: FaasError) -> None:
        self[function].record_error(err.code)
        if self.metrics is not None:
            self.metrics.failed(function, err.code)
