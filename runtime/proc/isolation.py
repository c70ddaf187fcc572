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
import resource
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from runtime.proc.children import die_with_parent

_CLONE_NEWNS, _CLONE_NEWIPC = 0x00020000, 0x08000000
_CLONE_NEWPID, _CLONE_NEWNET, _CLONE_NEWUSER = 0x20000000, 0x40000000, 0x10000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT = 0x1, 0x2, 0x4, 0x20
_MS_BIND, _MS_REC, _MS_PRIVATE = 0x1000, 0x4000, 0x40000
_PR_SET_NO_NEW_PRIVS = 38
MAX_PROCESSES = 4096
# World-writable places: each sandbox gets its own, empty, and small (a tmpfs is memory the
# node does not see in the sandbox's own).
_PRIVATE_TMP = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock")
_PRIVATE_TMP_OPTIONS = b"mode=1777,size=64m"


@dataclass(frozen=True)
class Isolation:
    """`uid`: run as this uid (and gid), in namespaces of its own; None: no isolation (a
    node that is not root), unless `rootless`: then the caller's own uid in a user namespace
    of its own (with the other namespaces it allows: what `faas deploy` run by a user gets).
    `network`: also an empty network namespace. `expose`: paths that must stay readable
    (the interpreter's own are always added); `hide`: folders covered by an empty tmpfs
    (the state folder's credentials; rootless, the user's home is covered too)."""

    uid: int | None = None
    network: bool = False
    expose: tuple[str, ...] = field(default_factory=tuple)
    rootless: bool = False
    hide: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {"uid": self.uid, "network": self.network, "expose": list(self.expose),
                "rootless": self.rootless, "hide": list(self.hide)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Isolation:
        return cls(uid=data["uid"], network=data["network"], expose=tuple(data["expose"]),
                   rootless=bool(data.get("rootless")), hide=tuple(data.get("hide", ())))

    def enter(self) -> None:
        """Irreversibly restrict this process. This forks once: the caller's process stays
        behind as a reaper that exits with the child's code; the function returns in the
        child, PID 1 of its own namespace."""
        rootless = self.uid is None and self.rootless
        if self.uid is None and not rootless:
            return
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        if rootless:
            uid, gid = os.getuid(), os.getgid()
            _check(libc.unshare(_CLONE_NEWUSER | _CLONE_NEWPID | _CLONE_NEWNS | _CLONE_NEWIPC),
                   "unshare(user, PID, mount, IPC)")
            # The same ids inside: files keep their owners, and nothing else is mapped.
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as mapping:
                    mapping.write(text)
        else:
            _check(libc.unshare(_CLONE_NEWPID | _CLONE_NEWNS | _CLONE_NEWIPC), "unshare(PID, mount, IPC)")
        child = os.fork()
        if child:
            _reap_and_exit(child)
        die_with_parent()
        _check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "make / private")
        _check(libc.mount(b"proc", b"/proc", b"proc", _MS_NOSUID | _MS_NODEV, None), "mount /proc")
        home = os.path.expanduser("~")
        _cover_and_expose(libc, [*runtime_paths(), *self.expose],
                          closed=(home,) if rootless and os.path.isdir(home) and home != "/" else (),
                          secret=self.hide)
        if self.network:
            _check(libc.unshare(_CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        if rootless:  # the namespace's capabilities would let it undo the mounts above
            _drop_capabilities(libc)
        else:
            # Processes and threads of its uid, all its sandboxes together: far more than a
            # function needs, far fewer than would run the host out of pids.
            resource.setrlimit(resource.RLIMIT_NPROC, (MAX_PROCESSES, MAX_PROCESSES))
            os.setgroups([])
            os.setresgid(self.uid, self.uid, self.uid)
            os.setresuid(self.uid, self.uid, self.uid)
        # No setuid binary can hand privileges back; changing uid cleared PDEATHSIG.
        libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        die_with_parent()


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _drop_capabilities(libc: ctypes.CDLL) -> None:
    """Give up every capability (effective, permitted, inheritable) for good."""
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3: two data words
    _check(libc.capset(ctypes.byref(header), (_CapData * 2)()), "capset")


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


def _cover_and_expose(libc: ctypes.CDLL, needed: Sequence[str], closed: Sequence[str] = (),
                      secret: Sequence[str] = ()) -> None:
    """Cover /tmp, /var/tmp, /dev/shm (private, writable, small), every folder others may
    not enter and those of `closed` (empty) with a tmpfs, then bind back, read-only, the
    needed paths they hid; the needed paths they did not hide are made read-only in place
    (the state folder, the function's own code: nothing there is the function's to change).
    Last, each folder of `secret` is covered by an empty tmpfs, needed or not."""
    covers = {folder: _PRIVATE_TMP_OPTIONS for folder in _PRIVATE_TMP if os.path.isdir(folder)}
    for folder in closed:
        covers.setdefault(os.path.realpath(folder), b"mode=755")
    hidden: dict[str, list[str]] = {folder: [] for folder in covers}
    in_place: list[str] = []
    for path in {os.path.realpath(p) for p in needed if p and os.path.exists(p)}:
        cover = next((f for f in covers if path.startswith(f + os.sep)), None)
        cover = cover or _closed_ancestor(path)
        if cover is not None:
            covers.setdefault(cover, b"mode=755")
            hidden.setdefault(cover, []).append(path)
        else:
            in_place.append(path)
    for path in sorted(in_place):
        _check(libc.mount(path.encode(), path.encode(), None, _MS_BIND | _MS_REC, None), f"bind {path}")
        _read_only(libc, path)
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
            _read_only(libc, path)
            os.close(fd)
    for folder in secret:
        if os.path.isdir(folder):
            _check(libc.mount(b"tmpfs", os.path.realpath(folder).encode(), b"tmpfs",
                              _MS_NOSUID | _MS_NODEV | _MS_RDONLY, b"mode=555,size=4k"),
                   f"cover {folder}")


# Flags of a mount that a remount must keep (in a user namespace they are locked: a remount
# that would clear one is refused), as statvfs reports them -> as mount(2) takes them: the
# same bits but for relatime.
_KEPT_FLAGS = {os.ST_NOSUID: _MS_NOSUID, os.ST_NODEV: _MS_NODEV, os.ST_NOEXEC: 0x8,
               os.ST_NOATIME: 0x400, os.ST_NODIRATIME: 0x800, os.ST_RELATIME: 0x200000}


def _read_only(libc: ctypes.CDLL, path: str) -> None:
    """Remount the bind mount at `path` read-only, keeping its other flags."""
    flags = os.statvfs(path).f_flag
    kept = sum(mount_flag for statvfs_flag, mount_flag in _KEPT_FLAGS.items() if flags & statvfs_flag)
    _check(libc.mount(None, path.encode(), None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | kept, None),
           f"read-only {path}")


def probe(rootless: bool = False) -> str | None:
    """None when this process may isolate children as above (`rootless`: in a user
    namespace, as a user), else why not. Checked in a throw-away child, so this process
    keeps its own namespaces."""
    pid = os.fork()
    if pid == 0:
        try:
            if rootless:
                Isolation(rootless=True, network=True).enter()
            else:
                libc = ctypes.CDLL("libc.so.6", use_errno=True)
                _check(libc.unshare(_CLONE_NEWPID | _CLONE_NEWNS | _CLONE_NEWIPC | _CLONE_NEWNET), "unshare")
        except OSError as exc:
            os._exit(exc.errno or 1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return None if code == 0 else os.strerror(code)


if __name__ == "__main__":
    # `python -m runtime.proc.isolation [--rootless]`: the probe, run in a small trusted process.
    print(probe(rootless="--rootless" in sys.argv) or "ok")
