"""What a process holds (private pages, device memory), and the machine's memory: the
measurements the pre-loader, the memory guard and the sandboxes' reports rest on."""

from __future__ import annotations

import ctypes
import sys

from runtime.proc.children import process_tree

MIB = 1024 * 1024
GIB = 1024 * MIB


def private_dirty_bytes(pid: int | str = "self") -> int:
    """Memory only this process holds: the pages it wrote. Clean pages it maps are not
    counted: the shared backbone's read-only weights and what a forked sandbox still
    shares with the zygote belong to them, and cost nothing more per sandbox."""
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1]) * 1024
    return 0


def gpu_process_bytes(pids: list[int]) -> int | None:
    """GPU memory NVML sees these processes use on GPU 0; None when it gives no per-process
    figures (no GPU, or a container that hides them)."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        used = {p.pid: p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()
    if not used:
        return None
    return sum(int(used.get(pid) or 0) for pid in pids)


def sandbox_bytes(pid: int, claimed_device_bytes: int) -> tuple[int, int]:
    """(host, device) bytes a sandbox holds, measured by the node, never taken from the
    sandbox's word (it could claim anything): host, the pages written by its process and
    every process under it (a sandbox in a PID namespace is a reaper with its PID 1 below
    it), from /proc; device, from NVML's per-process figures where it has them, else the
    sandbox's own claim capped at what the whole GPU has in use (0 without a GPU)."""
    pids = process_tree(pid)
    host = 0
    for process in pids:
        try:
            host += private_dirty_bytes(process)
        except OSError:  # gone meanwhile
            pass
    device = gpu_process_bytes(pids)
    if device is None:
        device = min(max(0, claimed_device_bytes), gpu_memory()[1])
    return host, device


def device_bytes() -> int:
    """Device memory this process's torch caching allocator holds (0 without CUDA, or
    where torch was never imported: a sandbox whose model runs in the engine)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return 0

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0
    return int(torch.cuda.memory_reserved())


def give_back_heap() -> None:
    """Return freed heap pages to the kernel (glibc keeps them after a request's
    activations are freed, and an idle sandbox would hold them for nothing)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def gpu_memory() -> tuple[int, int]:
    """(total, used) bytes of GPU 0, from NVML; (0, 0) without a GPU. Whoever holds it:
    per-process figures are missing in some containers."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return 0, 0
    try:
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0))
        return int(info.total), int(info.used)
    except pynvml.NVMLError:
        return 0, 0
    finally:
        pynvml.nvmlShutdown()
