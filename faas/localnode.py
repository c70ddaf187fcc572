"""Run `faas up` as a child process and wait for its `ready` line: used by `faas demo`,
the benchmarks and the tests, so all of them drive the node through its real front door."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from faas.bundled import faas_home
from faas.errors import FaasError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def local_credentials(state_dir: Path | None = None) -> dict[str, str]:
    """The node login an embedded server wrote to `state_dir/node-credentials` (default
    `$FAAS_HOME/nats`), when this user can read it; {} otherwise."""
    path = (state_dir or faas_home() / "nats") / "node-credentials"
    if not os.access(path, os.R_OK):
        return {}
    user, password = path.read_text().strip().split(":", 1)
    return {"user": user, "password": password}


class LocalNode:
    """`faas up` on a free port with an embedded nats-server (or on `nats_url`)."""

    def __init__(self, *functions_dirs: str | Path, nats_url: str | None = None,
                 state_dir: str | Path | None = None, extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, stderr: int | None = None) -> None:
        self.functions_dirs = functions_dirs
        self.nats_url = nats_url
        self.state_dir = state_dir
        self.extra_args = extra_args
        self.env = env
        self.stderr = stderr
        self.url = ""
        self.node_id = ""
        self.http_url = ""  # the gateway's, when started with --http
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout_s: float = 120.0) -> str:
        args = [sys.executable, "-m", "faas.cli", "up", *self.extra_args]
        for folder in self.functions_dirs:
            args += ["--functions", str(folder)]
        if self.nats_url:
            args += ["--nats", self.nats_url]
        else:
            args += ["--port", str(free_port())]
        if self.state_dir:
            args += ["--state-dir", str(self.state_dir)]
        env = {**os.environ, **(self.env or {})}
        if not self.nats_url:  # an embedded server: `faas up` would take $FAAS_NATS_URL for another
            env.pop("FAAS_NATS_URL", None)
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.stderr,
                                     stdin=subprocess.DEVNULL, env=env)
        assert self.proc.stdout is not None
        line = _readline(self.proc.stdout, ready_timeout_s)
        if not line.startswith("ready "):
            self.stop()
            raise FaasError(f"faas up did not become ready (exit code {self.proc.returncode}, "
                            f"printed {line!r})")
        self.url = line.split()[1]
        self.node_id = next((w[5:] for w in line.split() if w.startswith("node=")), "")
        self.http_url = next((w[5:] for w in line.split() if w.startswith("http=")), "")
        return self.url

    def node_credentials(self) -> dict[str, str]:
        """The embedded server's node login (`user`, `password`), for trusted local tools
        that must subscribe beyond a producer's rights (benchmarks)."""
        credentials = local_credentials(Path(self.state_dir) if self.state_dir else None)
        if not credentials:
            raise FaasError(f"no readable node credentials in {self.state_dir or faas_home() / 'nats'}")
        return credentials

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (drain) and wait; SIGKILL if it does not exit in time. Returns the code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return int(self.proc.returncode)

    def __enter__(self) -> LocalNode:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _readline(stream: object, timeout_s: float) -> str:
    """One line from a child's stdout, or "" on EOF or timeout."""
    selector = selectors.DefaultSelector()
    selector.register(stream, selectors.EVENT_READ)  # type: ignore[arg-type]
    deadline = time.monotonic() + timeout_s
    buf = b""
    try:
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                break
            chunk = os.read(stream.fileno(), 1)  # type: ignore[attr-defined]
            if not chunk:
                break
            buf += chunk
    finally:
        selector.close()
    return buf.decode(errors="replace").strip()
