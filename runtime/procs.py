"""Helpers for child processes of the node: they must die with it, even on SIGKILL."""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import sys
from typing import Callable

from faas.logs import configure_logging

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux only).

    Used as `preexec_fn` for children that are not ours (nats-server) and called first
    thing in our own subprocesses.
    """
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def run_node_child(prog: str, serve: Callable[[socket.socket], int]) -> int:
    """Entry point of a process the node starts with one end of a socketpair
    (`--fd N --parent PID`): dies with the node, logs like it, keeps stdout off the node's
    stdout (user prints go to stderr), and serves the socket until EOF."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args()
    die_with_parent()
    if os.getppid() != args.parent:  # the node died before die_with_parent() took effect
        return 0
    configure_logging()
    sys.stdout = sys.stderr
    with socket.socket(fileno=args.fd) as sock:
        return serve(sock)
