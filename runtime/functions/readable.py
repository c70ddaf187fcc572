"""Make the model folders a function declares readable to the processes that load them,
wherever those folders are.

A root node's sandboxes and backbone loaders run under uids of their own, in mount
namespaces with a private /tmp and every folder closed to others covered
(runtime/proc/isolation.py). The node knows which folders each function declares, checks
them itself (as root, outside any namespace), and then, for each:

- when the uids that load it may read every file in it, it is bound read-only into their
  namespaces at its own path: under /tmp, or in root's Hugging Face cache, whose snapshot
  files are links into a `blobs` folder beside them (the links' targets are bound too);
- else (safetensors writes 0600, so a model or adapter saved by root is such a case) a copy
  is staged under `$FAAS_HOME/staged/`, owned by root: an adapter readable by its function's
  group only, a backbone by every runtime uid (a base model several functions share). A copy
  is made once and reused while its source's files keep their sizes and times.

Only the folders of functions in the node's own functions folders and its `--models`
folders get this: the operator named them. A deployed function's backbone path is its
deployer's hint and gets no more than any uid may read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from faas.errors import FaasError
from faas.logs import get_logger

log = get_logger()

_MAX_FILES = 10_000  # a model folder has tens; more is a path declared by mistake


@dataclass(frozen=True)
class ModelView:
    """How the processes that load a model folder see it: `path` is what they load (the
    declared folder or its staged copy), `expose` what their namespaces must show."""

    path: str
    expose: tuple[str, ...]


def _files(folder: Path) -> list[tuple[str, Path]]:
    """(path relative to `folder`, real path) of every file and folder under it, links
    followed (a Hugging Face snapshot is links into its `blobs` folder)."""
    found: list[tuple[str, Path]] = [(".", folder.resolve())]
    for root, dirs, names in os.walk(folder, followlinks=True):
        for name in [*dirs, *names]:
            path = Path(root) / name
            found.append((str(path.relative_to(folder)), path.resolve()))
            if len(found) > _MAX_FILES:
                raise FaasError(f"{folder} holds more than {_MAX_FILES} files: not a model folder")
    return found


def _readable(info: os.stat_result, uids: tuple[int, ...]) -> bool:
    """Whether each of `uids` (each with its own gid and no groups, as sandboxes run) may
    read this file, or list and enter this folder."""
    need = 0o5 if stat.S_ISDIR(info.st_mode) else 0o4
    for uid in uids:
        if info.st_uid == uid:
            bits = info.st_mode >> 6
        elif info.st_gid == uid:
            bits = info.st_mode >> 3
        else:
            bits = info.st_mode
        if bits & need != need:
            return False
    return True


def _source_state(files: list[tuple[str, Path]]) -> list[list[object]]:
    """What a staged copy was made from: each file's path, size and modification time."""
    state: list[list[object]] = []
    for relative, real in files:
        info = real.stat()
        if not stat.S_ISDIR(info.st_mode):
            state.append([relative, info.st_size, info.st_mtime_ns])
    return sorted(state)


def model_view(folder: str, uids: tuple[int, ...], staged: Path, group: int | None,
               owner: str) -> ModelView:
    """Make `folder` readable to `uids` (see the module's docstring). `group`: the gid a
    staged copy belongs to (an adapter: its function's), or None for a copy every runtime
    uid may read (a backbone). `owner` names whose copy it is (a function, or the backbones):
    one copy per folder and owner, whichever uid the owner has this time."""
    source = Path(folder)
    files = _files(source)
    unreadable = next((real for _, real in files if not _readable(real.stat(), uids)), None)
    if unreadable is None:
        inside = source.resolve()
        outside = {str(real) for _, real in files if not real.is_relative_to(inside)}
        return ModelView(folder, (str(inside), *sorted(outside)))
    key = hashlib.sha256(f"{source.resolve()}\0{owner}".encode()).hexdigest()[:24]
    copy = staged / key
    staged.mkdir(parents=True, exist_ok=True)
    staged.chmod(0o711)  # loaders and sandboxes may pass through, not list
    state = _source_state(files)
    with open(staged / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another node on this host may stage the same
        marker = copy / ".staged-from"
        if not (marker.is_file() and json.loads(marker.read_text()) == state):
            log.warning("model_staged", folder=folder, copy=str(copy), unreadable=str(unreadable),
                        bytes=sum(int(size) for _, size, _ in state),  # type: ignore[call-overload]
                        hint="make it readable to others (chmod -R a+rX) to serve it without a copy")
            partial = copy.with_name(key + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(source, partial, symlinks=False)
            (partial / ".staged-from").write_text(json.dumps(state))
            shutil.rmtree(copy, ignore_errors=True)
            partial.rename(copy)
        for path in [copy, *copy.rglob("*")]:
            os.chown(path, 0, group if group is not None else 0)
            if group is None:
                path.chmod(0o755 if path.is_dir() else 0o644)
            else:
                path.chmod(0o750 if path.is_dir() else 0o640)
    return ModelView(str(copy), (str(copy),))
