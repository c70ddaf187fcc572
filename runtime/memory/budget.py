"""The node's memory budget: what it may hold on the host and on its device."""

from __future__ import annotations

import os
from dataclasses import dataclass

from runtime.proc.usage import GIB, gpu_memory


@dataclass(frozen=True)
class Budget:
    """Bytes that may be held on the host and on the device (0 on a CPU node)."""

    host_bytes: int
    device_bytes: int = 0


def machine_budget(host_gib: float | None, device_gib: float | None, device: str,
                   host_share: float, device_share: float) -> Budget:
    """A memory budget: `host_gib` / `device_gib` where given, else these shares of the
    machine's memory and of the GPU's (none on a CPU node)."""
    host = (host_gib * GIB if host_gib is not None
            else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * host_share)
    if device == "cpu":
        return Budget(int(host), 0)
    dev = device_gib * GIB if device_gib is not None else gpu_memory()[0] * device_share
    return Budget(int(host), int(dev))
