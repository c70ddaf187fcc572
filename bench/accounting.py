"""What a benchmark mode costs and how fast it answered: latency summaries, SLO attainment,
memory held over time (sampled PSS) and its price under each billing model.

Serverless modes (isolated, fast-load, ours) pay for the memory they hold while they hold
it: the integral of held memory over time. A serverful deployment pays for its provisioned
capacity, its peak, for the whole run. One price per GiB-second; raw GiB-seconds are
reported too so readers can re-price.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from runtime.proc.usage import GIB

BILLING = ("serverless", "serverful")


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def latency_summary(values_ms: list[float]) -> dict[str, float]:
    return {"p50": percentile(values_ms, 0.50), "p95": percentile(values_ms, 0.95),
            "p99": percentile(values_ms, 0.99)}


def slo_attainment(ttft_ms: list[float | None], slo_ms: float) -> float:
    """Share of requests whose first token came within the SLO (a failed request, None,
    misses it)."""
    if not ttft_ms:
        return math.nan
    return sum(1 for t in ttft_ms if t is not None and t <= slo_ms) / len(ttft_ms)


@dataclass
class MemoryTrace:
    """(seconds since start, bytes held) samples of one mode."""

    samples: list[tuple[float, int]] = field(default_factory=list)

    def add(self, at_s: float, held_bytes: int) -> None:
        self.samples.append((at_s, held_bytes))

    @property
    def peak_bytes(self) -> int:
        return max((b for _, b in self.samples), default=0)

    def gib_seconds(self, until_s: float | None = None) -> float:
        """Held memory integrated over time (step function: a sample holds until the next
        one, the last until `until_s`)."""
        if not self.samples:
            return 0.0
        points = sorted(self.samples)
        end = points[-1][0] if until_s is None else max(until_s, points[-1][0])
        total = 0.0
        for (t, held), (t_next, _) in zip(points, [*points[1:], (end, 0)]):
            total += held * (t_next - t)
        return total / GIB

    def cost(self, billing: str, price_per_gib_s: float, duration_s: float) -> float:
        if billing == "serverless":
            return self.gib_seconds(duration_s) * price_per_gib_s
        if billing == "serverful":
            return self.peak_bytes / GIB * duration_s * price_per_gib_s
        raise ValueError(f"billing is one of {BILLING}, not {billing!r}")


@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int
    uid: int
    cmdline: bytes


def processes() -> list[Process]:
    """Every process on the host, read from /proc (those that exit meanwhile are skipped)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        found.append(Process(int(entry.name), int(fields["PPid"]), int(fields["Uid"].split()[0]),
                             cmdline))
    return found


def process_tree(pid: int, skip: bytes | None = None) -> list[int]:
    """pid and its live descendants, leaving out (with their children) processes whose
    command line contains `skip` (e.g. the shared nats-server)."""
    children: dict[int, list[Process]] = {}
    for proc in processes():
        children.setdefault(proc.ppid, []).append(proc)
    found, todo = [pid], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if skip is None or skip not in child.cmdline:
                found.append(child.pid)
                todo.append(child.pid)
    return found


def pss_bytes(pids: Iterable[int]) -> int:
    """Total PSS of processes (shared pages split among their mappers, so counted once)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue  # it exited between listing and reading
    return total


def _is_shared_memory_file(target: str) -> bool:
    return target.startswith(("/memfd:", "/dev/shm/"))


def unmapped_shared_bytes(pids: Iterable[int]) -> int:
    """Shared-memory files (memfd, /dev/shm) that these processes keep open but none of them
    maps: memory they hold that PSS does not see (a faas node keeps its backbone's memfd
    open between sandboxes). Mapped ones are already in the mappers' PSS."""
    held: dict[tuple[str, int], int] = {}  # (device "maj:min" in hex, inode) -> size
    mapped: set[tuple[str, int]] = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = f"/proc/{pid}/fd/{fd}"
                try:
                    if _is_shared_memory_file(os.readlink(link)):
                        st = os.stat(link)
                        device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
                        held[(device, st.st_ino)] = st.st_size
                except OSError:
                    continue  # closed meanwhile
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and _is_shared_memory_file(fields[5]):
                    mapped.add((fields[3], int(fields[4])))
        except OSError:
            continue  # it exited between listing and reading
    return sum(size for key, size in held.items() if key not in mapped)


def held_bytes(pids: list[int]) -> int:
    """What these processes hold: their PSS plus shared memory they keep but do not map."""
    return pss_bytes(pids) + unmapped_shared_bytes(pids)
