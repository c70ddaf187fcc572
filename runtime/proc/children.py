"""Helpers for child processes of the node: they must die with it, even on SIGKILL."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import signal
import socket
import sys
from pathlib import Path
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


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (threads' children included), as far as /proc shows them;
    processes that are gone by then are left out."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            tids = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        tree.append(current)
        for tid in tids:
            try:
                with open(f"/proc/{current}/task/{tid}/children") as children:
                    todo += [int(child) for child in children.read().split()]
            except (OSError, ValueError):
                pass
    return tree


def renice_tree(pid: int, nice: int) -> None:
    """Set the nice value of every thread of `pid` and of its descendants (on Linux, nice
    is per thread). Processes that are gone by then are skipped."""
    for process in process_tree(pid):
        try:
            tids = os.listdir(f"/proc/{process}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                os.setpriority(os.PRIO_PROCESS, int(tid), nice)
            except (OSError, ValueError):
                pass


# What the node's children inherit of its environment: nothing else, so a credential or
# secret the node was started with never reaches a loader or function code.
_ENV_ALLOWED = ("PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "FAAS_HOME", "FAAS_LOG_LEVEL",
                "FAAS_BUNDLED_MODEL", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHASHSEED", "CUDA_VISIBLE_DEVICES")
_ENV_ALLOWED_PREFIXES = ("LC_", "HF_", "TRANSFORMERS_", "NVIDIA_")
# Under those prefixes, credentials: a hub token reaches the backbone loaders (to fetch a
# gated model), never discovery or function code.
_HUB_TOKENS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_PACKAGE_INDEX_PREFIXES = ("PIP_", "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                           "NO_PROXY", "SSL_CERT_", "REQUESTS_CA_BUNDLE")
_SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "KEY", "CREDENTIAL")


def child_environment(threads: int, hub_token: bool = False, package_index: bool = False) -> dict[str, str]:
    """The environment of a child of the node: the allow-list, without credentials (a hub
    token only with `hub_token`; pip's settings and proxies only with `package_index`, for
    the model builder that fetches a wheel), and thread counts."""
    env = {k: v for k, v in os.environ.items()
           if (k in _ENV_ALLOWED or k.startswith(_ENV_ALLOWED_PREFIXES))
           and (not any(word in k for word in _SECRET_WORDS) or hub_token and k in _HUB_TOKENS)}
    if package_index:
        env.update((k, v) for k, v in os.environ.items() if k.startswith(_PACKAGE_INDEX_PREFIXES))
    # A name for whoever runs it: sandboxes and loaders run under uids with no passwd entry,
    # where getpass.getuser() (torch's compile cache, imported by transformers) would raise.
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", USER="faas", LOGNAME="faas")
    return env


async def start_node_child(module: str, threads: int, hub_token: bool = False, args: tuple[str, ...] = ()
                           ) -> tuple[asyncio.subprocess.Process, socket.socket]:
    """Start `python -m module` for `run_node_child`, with one end of a socketpair (the other
    is returned), the allowed environment, cwd `/` (no working folder in its sys.path), its
    own session (a terminal's Ctrl-C reaches only the node, which drains in order) and
    death with the node."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, *args, "--fd", str(theirs.fileno()), "--parent", str(os.getpid()),
            pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL,
            stdout=sys.stderr.fileno(), env=child_environment(threads, hub_token),
            preexec_fn=die_with_parent, start_new_session=True, cwd="/")
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return proc, ours


async def wait_or_kill(proc: asyncio.subprocess.Process, grace_s: float = 5.0) -> None:
    """Wait for a child the node asked to exit (its socket closed); kill it if it lingers."""
    if proc.returncode is None:
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()


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


def open_to_others(root: Path) -> None:
    """Make `root` and everything under it readable by every uid: safetensors writes 0600,
    and sandboxes run under uids of their own that must read models and adapters."""
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
