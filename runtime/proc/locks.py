"""Exclusive file locks held for as long as a descriptor stays open: a node's block of
sandbox uids, a deploy's, a node's deployed folder. The kernel lets go of them when their
holder dies, even by SIGKILL, so a lock nobody holds marks what a dead process left."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def hold(path: Path) -> int:
    """An exclusive lock on `path` (created, mode 0600), held while the returned descriptor
    is open; BlockingIOError when another process holds it."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    return fd
