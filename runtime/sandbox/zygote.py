"""The zygote: a process with torch, transformers and peft already imported that forks
sandboxes on request, so a new sandbox skips the ~5 s of imports of a fresh interpreter.
A light zygote (`--light`) imports only the sandbox's own code: its sandboxes generate
through the node's engine and never import torch unless their function's code does.

The node starts each once (`python -m runtime.sandbox.zygote [--light] --fd N --parent PID`, with
OMP thread counts set in its environment). It only imports: nothing in it runs a torch op,
so no OpenMP pool exists to be broken by fork. Protocol on its socket (msgpack frames):

- node -> zygote: `fork {id, isolation}` with the new sandbox's socket and the write end of
  its output pipe attached (SCM_RIGHTS); zygote -> node:
  `forked {id, pid}`.
- zygote -> node: `exited {pid, code}` whenever a sandbox ends (code < 0: killed by signal).

A forked sandbox starts its own session, dies with the zygote (which dies with the node),
and serves its socket exactly like a sandbox started from scratch.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import sys

from faas.logs import get_logger
from runtime.proc import frames
from runtime.proc.children import die_with_parent, run_node_child
from runtime.proc.isolation import Isolation


def _preload(light: bool) -> None:
    import runtime.sandbox.server  # noqa: F401  (imports are the point: children inherit them)

    if light:  # its sandboxes generate through the engine: they import torch only if their code does
        import runtime.sandbox.engine_client  # noqa: F401
        return
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import runtime.sandbox.model  # noqa: F401
    import runtime.backbone.skeleton  # noqa: F401
    import runtime.backbone.weights  # noqa: F401


def _child(control: socket.socket, selector: selectors.BaseSelector, wake: tuple[int, int],
           fds: list[int], isolation: dict) -> None:
    """In the forked child: become a sandbox and never return into the zygote's loop."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        selector.close()
        control.close()
        for fd in wake:  # the zygote's, not the sandbox's
            os.close(fd)
        os.setsid()
        die_with_parent()
        # stdout and stderr go to a pipe the node reads and tags, not to the node's stderr.
        sock_fd, output_fd = fds
        os.dup2(output_fd, 1)
        os.dup2(output_fd, 2)
        os.close(output_fd)
        Isolation.from_dict(isolation).enter()
        from runtime.sandbox.server import serve

        code = serve(socket.socket(fileno=sock_fd))
    except SystemExit as exc:  # a handler's sys.exit(n): report n, like a process would
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        get_logger().exception("sandbox_crashed")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _reap(control: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = os.waitstatus_to_exitcode(status)
        control.sendall(frames.pack({"type": "exited", "pid": pid, "code": code}))


def serve(control: socket.socket, light: bool = False) -> int:
    _preload(light)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wakeup fd is written
    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    control.sendall(frames.pack({"type": "ready", "pid": os.getpid()}))
    while True:
        for key, _ in selector.select():
            if key.fileobj == wake_r:
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    pass
                _reap(control)
                continue
            request, fds = frames.recv_frame_with_fds(control)
            if request is None:
                return 0
            pid = os.fork()
            if pid == 0:
                _child(control, selector, (wake_r, wake_w), fds, request["isolation"])
            for fd in fds:
                os.close(fd)
            control.sendall(frames.pack({"type": "forked", "id": request["id"], "pid": pid}))


if __name__ == "__main__":
    light = "--light" in sys.argv
    if light:
        sys.argv.remove("--light")
    sys.exit(run_node_child("python -m runtime.sandbox.zygote", lambda control: serve(control, light)))
