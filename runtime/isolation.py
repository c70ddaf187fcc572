"""What keeps a function's code away from everything that is not its own: an unprivileged
uid per function (when the node runs as root) and a network namespace with no interfaces.

Applied in a sandbox after the runtime's own loading (backbone mapping, adapter, tokenizer,
the function file's bytes) and before any user code runs; discovery applies it before
importing function files too.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from runtime.procs import die_with_parent

_CLONE_NEWNET = 0x40000000
_CLONE_NEWNS = 0x00020000
_MS_BIND, _MS_REC, _MS_PRIVATE = 0x1000, 0x4000, 0x40000
_PR_SET_NO_NEW_PRIVS = 38


@dataclass(frozen=True)
class Isolation:
    """`uid`: run as this uid (and gid) with no supplementary groups; None keeps the node's.
    `network`: move into an empty network namespace (no route to NATS or anywhere)."""

    uid: int | None = None
    network: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"uid": self.uid, "network": self.network}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Isolation:
        return cls(**data) if data else cls()

    def apply(self, needs: Sequence[str] = ()) -> None:
        """Irreversibly restrict this process. Namespaces come first: they need root.

        `needs` are paths the process must still read as `uid` (besides the interpreter's
        own, always included): where one lies under a folder other users cannot enter
        (Python installed under /root, say), that folder is covered, in a private mount
        namespace, by an empty tmpfs through which only the needed paths are bound back.
        """
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        if self.network and libc.unshare(_CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed")
        if self.uid is not None:
            _expose(libc, [*sys.path, sys.base_prefix, sys.prefix, *needs])
            os.setgroups([])
            os.setresgid(self.uid, self.uid, self.uid)
            os.setresuid(self.uid, self.uid, self.uid)
            # No setuid binary can hand privileges back; changing uid cleared PDEATHSIG.
            libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
            die_with_parent()


def _closed_ancestor(path: str) -> str | None:
    """The outermost folder on the way to path that others may not enter, if any."""
    parts = os.path.realpath(path).split(os.sep)
    for i in range(2, len(parts)):
        folder = os.sep.join(parts[:i])
        try:
            if not os.stat(folder).st_mode & 0o001:
                return folder
        except OSError:
            return None
    return None


def _expose(libc: ctypes.CDLL, paths: list[str]) -> None:
    blocked: dict[str, list[str]] = {}
    for path in {os.path.realpath(p) for p in paths if p and os.path.exists(p)}:
        ancestor = _closed_ancestor(path)
        if ancestor is not None:
            blocked.setdefault(ancestor, []).append(path)
    if not blocked:
        return

    def check(result: int, what: str) -> None:
        if result != 0:
            raise OSError(ctypes.get_errno(), what)

    check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate /")
    for ancestor, inside in blocked.items():
        # Keep handles on what must stay reachable before the tmpfs hides it.
        keep = [(p, os.open(p, os.O_PATH)) for p in sorted(inside)
                if not any(p != q and p.startswith(q + os.sep) for q in inside)]
        check(libc.mount(b"tmpfs", ancestor.encode(), b"tmpfs", 0, b"mode=755"),
              f"mount tmpfs on {ancestor}")
        for path, fd in keep:
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.makedirs(path, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                open(path, "a").close()
            check(libc.mount(f"/proc/self/fd/{fd}".encode(), path.encode(), None,
                             _MS_BIND | _MS_REC, None), f"bind {path}")
            os.close(fd)


def probe_network_namespace() -> str | None:
    """None when this process may create network namespaces, else why not (checked in a
    throw-away child, so this process keeps its own network)."""
    pid = os.fork()
    if pid == 0:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        os._exit(0 if libc.unshare(_CLONE_NEWNET) == 0 else ctypes.get_errno() or 1)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return None if code == 0 else os.strerror(code)
