"""What a node serves, and how each function is isolated: decided at start-up, from the
functions folders, without running any user code in the node.

- The bundled models are built, and the platform is probed for namespaces, by small
  trusted subprocesses (the node itself imports no torch and forks nothing).
- Each function file is imported by its own discovery subprocess, isolated like a sandbox
  (runtime/isolation.py), one after another. Its answer is untrusted: only functions that
  name that very file as their source are taken, and a name may be declared only once.
- As root, functions get uids from `--sandbox-uids` (discovery and the backbone loader the
  first, function i by sorted name first + 1 + i); the range is locked, so two nodes on a
  host never share one.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from faas.bundled import faas_home
from faas.errors import FaasError
from faas.protocol import valid_function_name
from runtime.isolation import Isolation
from runtime.loader import function_files
from runtime.procs import die_with_parent


@dataclass
class Catalog:
    specs: list[dict[str, Any]]
    isolation: dict[str, Isolation]
    loader_isolation: Isolation  # for backbone loaders
    protections: dict[str, str]
    _lock_fd: int | None = field(default=None, repr=False)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


async def _run(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", *args, stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL, preexec_fn=die_with_parent, start_new_session=True)
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


async def _discover_file(path: Path, isolation: Isolation) -> list[dict[str, Any]]:
    code, out = await _run("runtime.discover", "--isolation", json.dumps(isolation.to_dict()),
                           str(path))
    try:
        result = json.loads(out.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise FaasError(f"discovery of {path} failed (exit code {code})") from None
    if not isinstance(result, dict) or "error" in result:
        raise FaasError(f"cannot load {path}: {result.get('error') if isinstance(result, dict) else result}")
    specs = result.get("functions")
    if not isinstance(specs, list) or not all(
            isinstance(s, dict) and s.get("source_file") == str(path)
            and isinstance(s.get("name"), str) and valid_function_name(s["name"]) for s in specs):
        raise FaasError(f"discovery of {path} answered functions it does not declare")
    return specs


def _lock_uids(uids: tuple[int, int]) -> int:
    path = Path(tempfile.gettempdir()) / f"faas-uids-{uids[0]}-{uids[1]}.lock"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FaasError(f"another node on this host uses sandbox uids {uids[0]}-{uids[1]}: "
                        "give this one another --sandbox-uids range") from None
    return fd


async def load_catalog(dirs: tuple[Path, ...], sandbox_uids: tuple[int, int] | None,
                       network_isolation: bool, bundled_models: bool) -> Catalog:
    if bundled_models:
        code, _ = await _run("runtime.modelzoo")
        if code:
            raise FaasError("building the bundled models failed (see the log)")
    files = function_files(list(dirs))
    uids, why_not = sandbox_uids, ""
    if uids is None:
        why_not = "off"
    elif os.geteuid() != 0:
        uids, why_not = None, "off: the node is not root"
    else:
        _, probe = await _run("runtime.isolation")
        if probe.strip() != "ok":
            uids, why_not = None, f"refused: namespaces unavailable ({probe.strip()})"
    lock_fd = _lock_uids(uids) if uids else None
    home = str(faas_home())

    def isolated(uid_offset: int, folder: Path | None, network: bool) -> Isolation:
        if uids is None:
            return Isolation()
        expose = (home,) if folder is None else (home, str(folder))
        return Isolation(uid=uids[0] + uid_offset, network=network, expose=expose)

    try:
        specs: list[dict[str, Any]] = []
        seen: dict[str, str] = {}
        for path in files:
            for spec in await _discover_file(path, isolated(0, path.parent, network_isolation)):
                if spec["name"] in seen:
                    raise FaasError(f"function {spec['name']!r} is declared twice: in "
                                    f"{seen[spec['name']]} and {path}")
                seen[spec["name"]] = str(path)
                specs.append(spec)
        names = sorted(seen)
        if uids is not None and len(names) > uids[1] - uids[0]:
            raise FaasError(f"{len(names)} functions need more uids than {uids[0]}-{uids[1]}")
    except BaseException:
        if lock_fd is not None:
            os.close(lock_fd)
        raise
    isolation = {name: isolated(1 + i, Path(seen[name]).parent, network_isolation)
                 for i, name in enumerate(names)}
    protections = {
        "sandbox_uids": f"{uids[0] + 1}-{uids[0] + len(names)}" if uids else why_not,
        "namespaces": "pid, mount, private /tmp" if uids else why_not,
        "network": ("isolated" if network_isolation else "off") if uids else why_not,
        "cpu_backbone": "sealed read-only memfd",
    }
    return Catalog(specs, isolation, isolated(0, None, False), protections, lock_fd)
