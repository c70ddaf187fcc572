"""What keeps a function's code away from everything that is not its own.

When the node runs as root, every process that runs user code (discovery, sandboxes) and
the backbone loader enter, before they read anything a function names:

- a PID namespace of their own (the process becomes PID 1 of it through one more fork), so
  nothing they start outlives them and they see no other process;
- a private mount namespace: fresh /proc, private tmpfs on /tmp, /var/tmp and /dev/shm, and
  any folder other users cannot enter (a Python installed under /root, say) covered by an
  empty tmpfs through which only the paths the runtime needs are bound back, read-only;
- an empty network namespace (sandboxes and discovery; the backbone loader may fetch);
- an unprivileged uid with no groups and no_new_privs.

A node that is not root can do none of this: its children keep its uid and namespaces,
and the node says so at start-up.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from runtime.procs import die_with_parent

_CLONE_NEWNS, _CLONE_NEWIPC = 0x00020000, 0x08000000
_CLONE_NEWPID, _CLONE_NEWNET = 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT = 0x1, 0x2, 0x4, 0x20
_MS_BIND, _MS_REC, _MS_PRIVATE = 0x1000, 0x4000, 0x40000
_PR_SET_NO_NEW_PRIVS = 38
# World-writable places: each sandbox gets its own, empty.
_PRIVATE_TMP = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock")


@dataclass(frozen=True)
class Isolation:
    """`uid`: run as this uid (and gid), in namespaces of its own; None: no isolation (a
    node that is not root). `network`: also an empty network namespace. `expose`: paths
    that must stay readable (the interpreter's own are always added)."""

    uid: int | None = None
    network: bool = False
    expose: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {"uid": self.uid, "network": self.network, "expose": list(self.expose)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Isolation:
        return cls(uid=data["uid"], network=data["network"], expose=tuple(data["expose"]))

    def enter(self) -> None:
        """Irreversibly restrict this process. With a uid this forks once: the caller's
        process stays behind as a reaper that exits with the child's code; the function
        returns in the child, PID 1 of its own namespace."""
        if self.uid is None:
            return
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        _check(libc.unshare(_CLONE_NEWPID | _CLONE_NEWNS | _CLONE_NEWIPC), "unshare(PID, mount, IPC)")
        child = os.fork()
        if child:
            _reap_and_exit(child)
        die_with_parent()
        _check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "make / private")
        _check(libc.mount(b"proc", b"/proc", b"proc", _MS_NOSUID | _MS_NODEV, None), "mount /proc")
        _cover_and_expose(libc, [*runtime_paths(), *self.expose])
        if self.network:
            _check(libc.unshare(_CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        os.setgroups([])
        os.setresgid(self.uid, self.uid, self.uid)
        os.setresuid(self.uid, self.uid, self.uid)
        # No setuid binary can hand privileges back; changing uid cleared PDEATHSIG.
        libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        die_with_parent()


def _check(result: int, what: str) -> None:
    if result != 0:
        raise OSError(ctypes.get_errno(), f"{what} failed")


def _reap_and_exit(child: int) -> None:
    """The process left outside the new PID namespace: hold nothing, wait, pass the code on.
    If it is killed, its child (PID 1 inside) gets PDEATHSIG and the namespace dies."""
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:  # killed by a signal: die of the same one, so the node sees what happened
        if -code not in (signal.SIGKILL, signal.SIGSTOP):  # those cannot be caught anyway
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)


def runtime_paths() -> list[str]:
    """What the runtime itself needs to import: the interpreter's paths and faas's own
    packages (an editable install lives wherever the checkout is). Not the working folder."""
    import faas
    import runtime

    cwd = os.getcwd()
    paths = [p for p in sys.path if p and os.path.isabs(p) and p != cwd]
    return [*paths, sys.base_prefix, sys.prefix, os.path.dirname(faas.__file__),
            os.path.dirname(runtime.__file__)]


def reachable(path: str) -> bool:
    """Whether any user may walk to path (no folder on the way is closed to others)."""
    return _closed_ancestor(path) is None


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


def _cover_and_expose(libc: ctypes.CDLL, needed: Sequence[str]) -> None:
    """Cover /tmp, /var/tmp, /dev/shm (private, writable) and every folder others may not
    enter (empty) with a tmpfs, then bind back, read-only, the needed paths they hid."""
    covers = {folder: b"mode=1777" for folder in _PRIVATE_TMP if os.path.isdir(folder)}
    hidden: dict[str, list[str]] = {folder: [] for folder in covers}
    for path in {os.path.realpath(p) for p in needed if p and os.path.exists(p)}:
        cover = next((f for f in covers if path.startswith(f + os.sep)), None)
        cover = cover or _closed_ancestor(path)
        if cover is not None:
            covers.setdefault(cover, b"mode=755")
            hidden.setdefault(cover, []).append(path)
    for cover, inside in hidden.items():
        # Handles on what must stay reachable, taken before the tmpfs hides it.
        keep = [(p, os.open(p, os.O_PATH)) for p in sorted(inside)
                if not any(p != q and p.startswith(q + os.sep) for q in inside)]
        _check(libc.mount(b"tmpfs", cover.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV,
                          covers[cover]), f"mount tmpfs on {cover}")
        for path, fd in keep:
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.makedirs(path, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                open(path, "a").close()
            source = f"/proc/self/fd/{fd}".encode()
            _check(libc.mount(source, path.encode(), None, _MS_BIND | _MS_REC, None), f"bind {path}")
            _check(libc.mount(None, path.encode(), None,
                              _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_REC, None),
                   f"read-only {path}")
            os.close(fd)


def probe() -> str | None:
    """None when this process may create the namespaces above, else why not (checked in a
    throw-away child, so this process keeps its own)."""
    pid = os.fork()
    if pid == 0:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        flags = _CLONE_NEWPID | _CLONE_NEWNS | _CLONE_NEWIPC | _CLONE_NEWNET
        os._exit(0 if libc.unshare(flags) == 0 else ctypes.get_errno() or 1)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return None if code == 0 else os.strerror(code)


if __name__ == "__main__":
    # `python -m runtime.isolation`: the node's probe, run in a small trusted process.
    print(probe() or "ok")
