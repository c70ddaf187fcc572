"""Helpers for child processes of the node: they must die with it, even on SIGKILL."""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux only).

    Used as `preexec_fn` for children that are not ours (nats-server) and called first
    thing in our own subprocesses.
    """
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def parent_alive(expected_ppid: int) -> bool:
    """False when the parent died before die_with_parent() took effect."""
    return os.getppid() == expected_ppid
