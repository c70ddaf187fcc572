"""The node's backbones: one per (base model, device), shared by every sandbox that serves
an adapter of it. A backbone is started on first use, counted while sandboxes hold it, kept
warm for `keep_alive_s` after the last one lets go, then released."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from faas.errors import HandlerError
from faas.logs import get_logger
from runtime.backbone.warm import KeptWarm
from runtime.proc import frames
from runtime.proc.children import start_node_child, wait_or_kill
from runtime.proc.isolation import Isolation

log = get_logger()


@dataclass
class Backbone:
    """An exported backbone: what sandboxes need to map it (manifest + descriptors)."""

    model: str
    device: str
    backend: str
    manifest: dict[str, Any]
    fds: list[int]
    proc: asyncio.subprocess.Process
    sock: socket.socket
    load_ms: float
    users: int = 0
    expiry: asyncio.Task[None] | None = field(default=None, repr=False)
    watch: asyncio.Task[None] | None = field(default=None, repr=False)
    check_now: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    # Called when the weights were found corrupted: each kills a sandbox that maps them.
    on_corrupt: set[Callable[[], None]] = field(default_factory=set, repr=False)

    @property
    def writable_by_sandboxes(self) -> bool:
        return self.backend == "cuda-ipc"

    def for_sandbox(self) -> dict[str, Any]:
        """The part of a sandbox's init frame that lets it attach the weights."""
        return {"backend": self.backend, "manifest": self.manifest, "device": self.device,
                "fds": self.fds}

    async def verify(self, timeout_s: float = 120.0) -> list[str]:
        """Ask the backbone process which tensors changed since export (GPU backbones)."""
        def ask() -> list[str]:
            self.sock.sendall(frames.pack({"type": "verify"}))
            reply = frames.recv_frame(self.sock)
            if reply is None:
                raise HandlerError(f"backbone process of {self.model!r} exited")
            return list(reply["corrupted"])

        return await asyncio.wait_for(asyncio.to_thread(ask), timeout_s)

    async def close(self) -> None:
        if self.watch is not None:
            self.watch.cancel()
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.sock.close()  # a GPU backbone process exits on EOF
        await wait_or_kill(self.proc)


class BackboneRegistry(KeptWarm[Backbone]):
    """Starts, shares and retires the backbones of one node."""

    kind = "backbone"

    def __init__(self, device: str = "cpu", keep_alive_s: float = 300.0, threads: int = 1,
                 isolation: Isolation | None = None, load_timeout_s: float = 600.0,
                 verify_interval_s: float = 60.0) -> None:
        super().__init__(keep_alive_s)
        self.device = device
        self.threads = threads
        self.load_timeout_s = load_timeout_s
        self.verify_interval_s = verify_interval_s
        # Loaders see only what their namespace shows: the backbones the node made readable
        # to them (runtime/functions/readable.py), never a root-only folder a function names.
        self.isolation = isolation or Isolation()

    def state(self) -> list[dict[str, Any]]:
        return [{"model": b.model, "device": b.device, "backend": b.backend, "users": b.users,
                 "bytes": b.manifest.get("bytes", 0), "load_ms": round(b.load_ms, 1)}
                for b in self._live.values()]

    def release(self, backbone: Backbone) -> None:
        super().release(backbone)
        if backbone.writable_by_sandboxes:
            backbone.check_now.set()  # a sandbox just ended: did it corrupt the weights?

    async def _watch(self, backbone: Backbone) -> None:
        """Verify a writable (GPU) backbone on a timer and whenever a sandbox of it ends; if
        its weights changed, kill every sandbox that maps it and retire it, so the next
        sandbox maps a fresh load."""
        while self.is_live(backbone):
            try:
                await asyncio.wait_for(backbone.check_now.wait(), self.verify_interval_s)
            except TimeoutError:
                pass
            backbone.check_now.clear()
            try:
                changed = await backbone.verify()
            except (HandlerError, TimeoutError, OSError) as exc:
                changed = [f"verification failed: {exc}"]
            if changed:
                log.error("backbone_corrupted", model=backbone.model, tensors=changed[:5],
                          sandboxes=len(backbone.on_corrupt))
                for kill in list(backbone.on_corrupt):
                    kill()
                backbone.watch = None
                await self.retire(backbone)
                return

    async def _start(self, model: str) -> Backbone:
        started = time.monotonic()
        # Seconds to minutes (a large model, a first fetch): say so before, not only after.
        log.info("backbone_loading", model=model, device=self.device, timeout_s=self.load_timeout_s)
        proc, ours = await start_node_child("runtime.backbone.process", self.threads, hub_token=True)
        try:
            request = {"type": "load", "model": model, "device": self.device,
                       "threads": self.threads, "isolation": self.isolation.to_dict()}
            await asyncio.to_thread(ours.sendall, frames.pack(request))
            reply, fds = await asyncio.wait_for(
                asyncio.to_thread(frames.recv_frame_with_fds, ours), self.load_timeout_s)
        except TimeoutError:
            proc.kill()
            ours.close()
            raise HandlerError(f"backbone {model!r} did not load within {self.load_timeout_s:g}s") from None
        except BaseException:
            proc.kill()
            ours.close()
            raise
        if reply is None or reply["type"] != "ready":
            for fd in fds:
                os.close(fd)
            ours.close()
            await proc.wait()
            why = reply["error"] if reply else f"exited with code {proc.returncode}"
            raise HandlerError(f"backbone {model!r} failed to load: {why}")
        log.info("backbone_started", model=model, backend=reply["backend"],
                 bytes=reply["manifest"].get("bytes"),
                 start_ms=round((time.monotonic() - started) * 1000, 1))
        backbone = Backbone(model=model, device=self.device, backend=reply["backend"],
                            manifest=reply["manifest"], fds=fds, proc=proc, sock=ours,
                            load_ms=float(reply["load_ms"]))
        if backbone.writable_by_sandboxes:
            backbone.watch = asyncio.create_task(self._watch(backbone))
        return backbone


def detect_device(requested: str) -> str:
    """`auto` is cuda when NVML sees a GPU, else cpu (no torch import in the node)."""
    if requested != "auto":
        return requested
    import pynvml

    try:
        pynvml.nvmlInit()
        try:
            return "cuda" if pynvml.nvmlDeviceGetCount() > 0 else "cpu"
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return "cpu"

