"""Backbone weight sharing: the device-specific part, behind one interface.

The backbone process loads a model once and *exports* its tensors; every sandbox *attaches*
them and binds them into a model skeleton, without copying:

- `CpuSharedFile`: all tensors in one safetensors image (in the serving dtype) in a sealed
  memfd: F_SEAL_WRITE/SHRINK/GROW/SEAL make it immutable for everyone, root included, and
  it has no path, so it lives exactly as long as a descriptor or mapping of it does.
  Sandboxes get an O_RDONLY descriptor and map it PROT_READ: a write to a weight faults
  (SIGSEGV) in the writing sandbox only.
- `CudaIpc`: CUDA IPC handles of the backbone process's tensors (torch.multiprocessing
  reductions); the backbone process must outlive every sandbox that maps them. A CUDA IPC
  mapping is writable: see the README's threat model.

Tied weights (one storage under several names) are exported once, with aliases.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import pickle
import struct
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn,
              "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
              "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64, "U32": torch.uint32,
              "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool}
# The name shown for the mapping in /proc/PID/maps ("/memfd:faas-backbone (deleted)").
MEMFD_NAME = "faas-backbone"


@dataclass
class Export:
    """What a backbone process hands to the node: a msgpack-able manifest and, on CPU, the
    file descriptors sandboxes need (passed to them at spawn, never by path)."""

    backend: str
    manifest: dict[str, Any]
    fds: list[int] = field(default_factory=list)


def unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split a state dict into tensors with distinct storage and aliases (tied weights)."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = tensor
    return unique, aliases


def digest(tensor: torch.Tensor, chunk_bytes: int = 64 << 20) -> bytes:
    """SHA-256 of a tensor's bytes in memory order, read in chunks where the tensor lives: a
    CPU tensor is hashed in place, a GPU tensor a chunk at a time through host memory (at
    most `chunk_bytes` extra). Any change of the bytes changes it, swapped rows included
    (a sum of words would not see those)."""
    flat = tensor.detach().reshape(-1).view(torch.uint8)
    hasher = hashlib.sha256()
    for start in range(0, flat.numel(), chunk_bytes):
        hasher.update(flat[start:start + chunk_bytes].cpu().numpy())
    return hasher.digest()


def corrupted(tensors: dict[str, torch.Tensor], baseline: dict[str, bytes]) -> list[str]:
    """Names of the tensors whose bytes changed since `baseline` was taken."""
    return [name for name, tensor in tensors.items() if digest(tensor) != baseline[name]]


class WeightsBackend(ABC):
    """Export (in the backbone process), attach (in a sandbox), probe memory."""

    name: str

    @abstractmethod
    def export(self, state: dict[str, torch.Tensor]) -> Export: ...

    @abstractmethod
    def attach(self, manifest: dict[str, Any], fds: list[int]) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def keeps_process(self) -> bool:
        """Whether the backbone process must stay alive while sandboxes map its weights."""


class CpuSharedFile(WeightsBackend):
    name = "cpu-shm"

    def export(self, state: dict[str, torch.Tensor]) -> Export:
        from safetensors.torch import save

        unique, aliases = unique_tensors(state)
        image = memoryview(save({k: v.detach().contiguous() for k, v in unique.items()}))
        writable = os.memfd_create(MEMFD_NAME, os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
        try:
            while image:
                image = image[os.write(writable, image):]
            fcntl.fcntl(writable, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK
                        | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            fd = os.open(f"/proc/self/fd/{writable}", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            os.close(writable)
        size = os.fstat(fd).st_size
        return Export(self.name, {"aliases": aliases, "bytes": size}, [fd])

    def attach(self, manifest: dict[str, Any], fds: list[int]) -> dict[str, torch.Tensor]:
        (fd,) = fds
        # PROT_READ on an O_RDONLY descriptor: mprotect cannot make it writable either.
        mapped = mmap.mmap(fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        (header_len,) = struct.unpack("<Q", mapped[:8])
        header = json.loads(mapped[8:8 + header_len])
        base = 8 + header_len
        tensors: dict[str, torch.Tensor] = {}
        with warnings.catch_warnings():
            # frombuffer warns that the buffer is not writable: that is the point.
            warnings.simplefilter("ignore", UserWarning)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                dtype = _ST_DTYPES[info["dtype"]]
                count = (end - begin) // torch.empty((), dtype=dtype).element_size()
                flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=base + begin) \
                    if count else torch.empty(0, dtype=dtype)
                tensors[name] = flat.view(info["shape"])
        for alias, name in manifest["aliases"].items():
            tensors[alias] = tensors[name]
        return tensors

    def keeps_process(self) -> bool:
        return False


class CudaIpc(WeightsBackend):
    name = "cuda-ipc"

    def export(self, state: dict[str, torch.Tensor]) -> Export:
        from torch.multiprocessing.reductions import reduce_tensor

        unique, aliases = unique_tensors(state)
        handles = {name: pickle.dumps(reduce_tensor(t.detach())) for name, t in unique.items()}
        return Export(self.name, {"aliases": aliases, "handles": handles,
                                  "bytes": sum(t.numel() * t.element_size() for t in unique.values())})

    def attach(self, manifest: dict[str, Any], fds: list[int]) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, blob in manifest["handles"].items():
            rebuild, args = pickle.loads(blob)
            tensors[name] = rebuild(*args)
        for alias, name in manifest["aliases"].items():
            tensors[alias] = tensors[name]
        return tensors

    def keeps_process(self) -> bool:
        return True


def backend_for(device: str) -> WeightsBackend:
    if device == "cpu":
        return CpuSharedFile()
    if device.startswith("cuda"):
        return CudaIpc()
    raise ValueError(f"unsupported device {device!r}")
