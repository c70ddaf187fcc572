"""The contention-aware batch window: when a function's requests go to its sandbox.

A sandbox batches whatever it is given (runtime/batching/batcher.py: requests join between decode
steps). What the node decides is *when* to hand requests over:

- No contention: at once (window 0), for the lowest TTFT.
- Contention (another function busy on this node's device, or the device busy: CPU load
  from /proc/stat, GPU utilisation from NVML): a function's requests are collected for a
  window and handed over together, so their prompts share one prefill instead of each
  interrupting the batch with one of its own. Only where that pays: when an extra prompt
  costs most of a prefill of one (compute-bound, as on a CPU), there is no window. N_max
  (the most a window collects) is the largest batch whose predicted prefill takes at most
  half the function's TTFT SLO; the
  window closes when N_max requests are in, or after at most one prefill of one (waiting
  longer buys nothing: later requests join the running batch anyway), and never so late
  that waiting + the predicted prefill would break the SLO of its oldest request.
- Closed windows of competing functions go to the device smallest SLO margin first, at
  most `parallel` prefills at a time (each counted busy for its predicted time).

Prefill times are profiled per function from what its sandboxes report: T(n) = T0 + c (n-1).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from faas.logs import get_logger


def turn_prefill_budget_s(slo_s: float) -> float:
    """What one turn of a batcher may spend prefilling (at least one prompt): a fifth of
    the tightest TTFT SLO it serves, so a crowd's first tokens come in turns, not all at the
    end of one long prefill. (A window hands over at most what prefills in half the SLO: it
    may then take a few turns.)"""
    return slo_s / 5

# Before a function's first prefill report: a small model's prefill of one prompt.
_PRIOR_T0_S = 0.05
# An extra prompt in a prefill costing this share of a prefill of one: batching gains nothing.
_NO_GAIN = 0.8
# Busier than this, the device is contended whoever uses it.
_BUSY_UTILISATION = 0.9
# Prefill times come from the function's own sandboxes: one reported longer than this is
# taken as this long, and a closed window holds a place on the device for this long at
# most, so no function can claim the device for itself with made-up timings.
_MAX_PREFILL_S = 5.0


class PrefillProfile:
    """T(n) = T0 + c (n - 1): the time of a prefill of n prompts, fitted by least squares to
    the last reports of the function's sandboxes. Until they include two batch sizes, c is
    assumed to be `extra_share` x T0: 1 on a CPU (compute-bound: an extra prompt costs a
    whole prefill), 0.1 on a GPU."""

    def __init__(self, extra_share: float = 1.0, window: int = 64) -> None:
        self.extra_share = extra_share
        self.t0_s = _PRIOR_T0_S
        self.per_extra_s = extra_share * _PRIOR_T0_S
        self._samples: deque[tuple[int, float]] = deque(maxlen=window)

    def observe(self, rows: int, seconds: float) -> None:
        """A prefill of `rows` prompts took `seconds`, as a sandbox reports it (clamped)."""
        rows = max(1, min(int(rows), 4096))
        seconds = min(max(float(seconds), 0.0), _MAX_PREFILL_S) if seconds == seconds else _MAX_PREFILL_S
        self._samples.append((rows, seconds))
        xs = [n - 1 for n, _ in self._samples]
        ys = [t for _, t in self._samples]
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        spread = sum((x - mean_x) ** 2 for x in xs)
        if spread > 0:
            slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread
            self.per_extra_s = max(0.0, slope)
            self.t0_s = max(1e-4, mean_y - self.per_extra_s * mean_x)
        else:  # one size only: T(n) = T0 (1 + share (n - 1))
            self.t0_s = max(1e-4, mean_y / (1 + self.extra_share * mean_x))
            self.per_extra_s = self.extra_share * self.t0_s

    def predict(self, n: int) -> float:
        return self.t0_s + self.per_extra_s * max(0, n - 1)

    def n_max(self, slo_s: float, max_batch: int) -> int:
        """The largest batch (at most `max_batch`) whose prefill takes at most half the SLO;
        1 where batching prompts saves little (each extra one costs most of a prefill of
        one, as on a compute-bound CPU): then waiting for company only adds to TTFT."""
        if self.per_extra_s >= _NO_GAIN * self.t0_s:
            return 1
        n = 1
        while n < max_batch and self.predict(n + 1) <= slo_s / 2:
            n += 1
        return n

    def state(self) -> dict[str, float]:
        return {"t0_ms": round(self.t0_s * 1000, 2), "per_extra_ms": round(self.per_extra_s * 1000, 2),
                "samples": len(self._samples)}


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields), idle


def _gpu_utilisation() -> float:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return 0.0
    try:
        return pynvml.nvmlDeviceGetUtilizationRates(pynvml.nvmlDeviceGetHandleByIndex(0)).gpu / 100
    except pynvml.NVMLError:
        return 0.0
    finally:
        pynvml.nvmlShutdown()


@dataclass(order=True)
class _Ready:
    margin_s: float
    seq: int
    release: asyncio.Future[None] = field(compare=False)
    busy_s: float = field(compare=False)


class Contention:
    """The node's view of its device: how busy it is, and the queue of closed windows
    waiting for it (smallest SLO margin first, `parallel` prefills at a time)."""

    def __init__(self, device: str, parallel: int, busy_functions: Callable[[], int],
                 interval_s: float = 0.5) -> None:
        self.device = device
        self.parallel = max(1, parallel)
        self.busy_functions = busy_functions
        self.interval_s = interval_s
        self.utilisation = 0.0
        self._ready: list[_Ready] = []
        self._seq = itertools.count()
        self._running = 0
        self._sampler: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._sampler = asyncio.create_task(self._sample(), name="contention")

    async def close(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)

    async def _sample(self) -> None:
        last = _cpu_times() if self.device == "cpu" else (0, 0)
        while True:
            await asyncio.sleep(self.interval_s)
            if self.device == "cpu":
                now = _cpu_times()
                total, idle = now[0] - last[0], now[1] - last[1]
                self.utilisation = 1 - idle / total if total > 0 else 0.0
                last = now
            else:
                self.utilisation = await asyncio.to_thread(_gpu_utilisation)

    def contended(self, busy_here: bool) -> bool:
        """Whether a function (`busy_here`: one of its sandboxes is serving) competes for the
        device: another function is serving, or the device is busy anyway."""
        others = self.busy_functions() - (1 if busy_here else 0)
        return others > 0 or self.utilisation >= _BUSY_UTILISATION

    async def dispatch(self, margin_s: float, busy_s: float) -> None:
        """Wait for the device's turn of a closed window: smallest margin first."""
        release = asyncio.get_running_loop().create_future()
        heapq.heappush(self._ready, _Ready(margin_s, next(self._seq), release, busy_s))
        self._next()
        await release

    def _next(self) -> None:
        while self._ready and self._running < self.parallel:
            ready = heapq.heappop(self._ready)
            self._running += 1
            ready.release.set_result(None)
            asyncio.get_running_loop().call_later(ready.busy_s, self._done)

    def _done(self) -> None:
        self._running -= 1
        self._next()

    def state(self) -> dict[str, float | int]:
        return {"utilisation": round(self.utilisation, 3), "waiting_windows": len(self._ready),
                "prefills_running": self._running}


class _Window:
    def __init__(self, opened: float, slo_deadline: float) -> None:
        self.opened = opened
        self.slo_deadline = slo_deadline  # the oldest request's received + SLO
        self.members = 0
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.timer: asyncio.TimerHandle | None = None


class BatchWindow:
    """One function's window (see the module docstring)."""

    def __init__(self, function: str, slo_s: float, max_batch: int, contention: Contention) -> None:
        self.function = function
        self.slo_s = slo_s
        self.max_batch = max_batch
        self.contention = contention
        self.profile = PrefillProfile(1.0 if contention.device == "cpu" else 0.1)
        self._open: _Window | None = None
        self.windows = 0  # how many windows it closed (introspection)
        self.log = get_logger(fn=function)

    async def hold(self, received: float, busy_here: bool) -> None:
        """Return when a request received at `received` (time.monotonic()) may go to a
        sandbox: at once without contention, else when its window closes and the device
        takes it."""
        if self.max_batch == 1 or not self.contention.contended(busy_here):
            return
        n_max = self.profile.n_max(self.slo_s, self.max_batch)
        if n_max == 1:
            return
        window = self._open
        if window is None:
            window = self._open = _Window(time.monotonic(), received + self.slo_s)
            latest = window.slo_deadline - self.profile.predict(n_max)
            close_at = min(window.opened + self.profile.predict(1), latest)
            delay = max(0.0, close_at - time.monotonic())
            window.timer = asyncio.get_running_loop().call_later(delay, self._close, window)
        window.members += 1
        if window.members >= n_max:
            self._close(window)
        await asyncio.shield(window.closed)

    def _close(self, window: _Window) -> None:
        if window.timer is not None:
            window.timer.cancel()
        if self._open is window:
            self._open = None
        if window.closed.done():
            return
        self.windows += 1
        predicted = self.profile.predict(window.members)
        margin = window.slo_deadline - time.monotonic() - predicted
        # It holds the device for its predicted prefill, never past half the SLO (what N_max
        # allows): a bad prediction must not keep every other window waiting.
        task = asyncio.ensure_future(self.contention.dispatch(
            margin, min(predicted, self.slo_s / 2, _MAX_PREFILL_S)))
        task.add_done_callback(lambda _: window.closed.done() or window.closed.set_result(None))

    def state(self) -> dict[str, object]:
        return {"slo_ttft_s": self.slo_s, "n_max": self.profile.n_max(self.slo_s, self.max_batch),
                "windows": self.windows, **self.profile.state()}
