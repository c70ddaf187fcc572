"""The backbone process: loads one base model once, in its own dtype, on one device, and
exports its weights for every sandbox of the node (see runtime/backbone/weights.py).

Started by the node as `python -m runtime.backbone.process --fd N --parent PID`. It receives a
`load` frame, answers `ready` with the export's manifest and its file descriptors (or
`error`), then: on CPU it exits (the node holds the shared file's descriptor, the sandboxes
map it); on GPU it stays until the node closes the socket, since it owns the CUDA memory the
sandboxes map.
"""

from __future__ import annotations

import os
import socket
import sys
import time

from faas.logs import get_logger
from runtime.proc import frames
from runtime.proc.children import run_node_child

log = get_logger()


def serve(sock: socket.socket) -> int:
    request = frames.recv_frame(sock)
    if request is None:
        return 0
    started = time.monotonic()
    try:
        from transformers import AutoModelForCausalLM

        from runtime.models.hf import enter_model_process
        from runtime.backbone.weights import backend_for

        enter_model_process(request["isolation"], int(request.get("threads", 1)))
        backend = backend_for(request["device"])
        model = AutoModelForCausalLM.from_pretrained(request["model"], dtype="auto")
        model = model.to(request["device"]).eval()
        export = backend.export(dict(model.state_dict()))
    except Exception as exc:
        log.error("backbone_load_failed", model=request["model"], error=f"{type(exc).__name__}: {exc}",
                  exc_info=True)
        frames.send_frame_with_fds(sock, {"type": "error", "error": f"{type(exc).__name__}: {exc}"}, [])
        return 1
    load_ms = (time.monotonic() - started) * 1000
    frames.send_frame_with_fds(sock, {"type": "ready", "backend": export.backend,
                                      "manifest": export.manifest, "load_ms": load_ms}, export.fds)
    for fd in export.fds:  # the node holds its own copies now
        os.close(fd)
    log.info("backbone_exported", model=request["model"], backend=export.backend,
             bytes=export.manifest["bytes"], load_ms=round(load_ms, 1))
    if backend.keeps_process():
        # `model` must stay referenced: the sandboxes map its CUDA blocks. Those mappings are
        # writable (CUDA IPC), so the node asks now and then whether the weights changed.
        from runtime.backbone.weights import corrupted, digest, unique_tensors

        tensors, _ = unique_tensors(dict(model.state_dict()))
        baseline = {name: digest(t) for name, t in tensors.items()}
        while (frame := frames.recv_frame(sock)) is not None:
            if frame.get("type") == "verify":
                sock.sendall(frames.pack({"type": "verified",
                                          "corrupted": corrupted(tensors, baseline)}))
    return 0


if __name__ == "__main__":
    sys.exit(run_node_child("python -m runtime.backbone.process", serve))
