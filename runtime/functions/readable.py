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

The node lends its rights for this with care, since a function's code chooses the paths:

- a folder's links must stay inside it (for a snapshot, inside its repository folder), and
  only files and folders are taken (no devices, no sockets);
- what its sandboxes could not reach on their own (a file they may not read, a folder under
  one closed to others) is lent only when it belongs to the owner of the function's file
  (who could read it anyway), and never from the state folder (other functions' deployed
  adapters, the server's credentials);
- a copy reads each file through a descriptor checked again after opening, so a file
  swapped for a link meanwhile is not copied.

Only the functions in the node's own functions folders and the backbones found in its
`--models` folders get this. A deployed function's backbone path is its deployer's hint and
gets no more than any uid may read.
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

from faas.bundled import faas_home
from faas.errors import FaasError
from faas.logs import get_logger
from runtime.proc.isolation import reachable

log = get_logger()

_MAX_FILES = 10_000  # a model folder has tens; more is a path declared by mistake
_COPY_CHUNK = 1 << 24


@dataclass(frozen=True)
class ModelView:
    """How the processes that load a model folder see it: `path` is what they load (the
    declared folder or its staged copy), `expose` what their namespaces must show."""

    path: str
    expose: tuple[str, ...]


def _links_may_reach(folder: Path) -> Path:
    """Where the links of `folder` may lead: the folder itself, or for a Hugging Face
    snapshot (`models--ORG--NAME/snapshots/REV`) its repository folder, whose `blobs` the
    snapshot's files link to."""
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent
    return folder


def _files(folder: Path) -> list[tuple[str, Path, os.stat_result]]:
    """(path relative to `folder`, real path, its stat) of every file and folder under it,
    links followed where they stay inside (see `_links_may_reach`)."""
    real = folder.resolve()
    bound = _links_may_reach(real)
    found: list[tuple[str, Path, os.stat_result]] = [(".", real, real.stat())]
    for root, dirs, names in os.walk(real, followlinks=True):
        for name in [*dirs, *names]:
            path = Path(root) / name
            target = path.resolve()
            if not target.is_relative_to(bound):
                raise FaasError(f"{path} leads to {target}, outside {folder}: a model folder's "
                                "links must stay inside it")
            info = target.stat()
            if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
                raise FaasError(f"{path} is neither a file nor a folder")
            found.append((str(path.relative_to(real)), target, info))
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


def _may_lend(folder: Path, files: list[tuple[str, Path, os.stat_result]], lender: int | None) -> None:
    """Refuse to lend the node's rights over `folder` where its sandboxes' own would not
    do: unless `lender` (the owner of the function's file; None: the operator's --models)
    owns every file, and never inside the state folder."""
    home = faas_home().resolve()
    if folder.resolve().is_relative_to(home):
        raise FaasError(f"{folder} is in faas's state folder ({home}), where the node lends "
                        "no rights: serve a copy from elsewhere")
    if lender is None:
        return
    foreign = next((real for _, real, info in files if info.st_uid != lender), None)
    if foreign is not None:
        raise FaasError(f"the function's sandboxes may not read {folder} ({foreign} belongs to uid "
                        f"{foreign.stat().st_uid}, not to uid {lender}, the owner of the function's "
                        f"file): make it readable to others (chmod -R a+rX) outside folders "
                        "closed to them, or own it")


def _copy(files: list[tuple[str, Path, os.stat_result]], into: Path, lender: int | None) -> None:
    """Copy the checked files into `into`, each read through a descriptor that must still
    be the regular file it was (owned by `lender`, when given)."""
    into.mkdir()
    for relative, real, checked in files[1:]:
        target = into / relative
        if stat.S_ISDIR(checked.st_mode):
            target.mkdir()
            continue
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as source, open(target, "wb") as out:
            info = os.fstat(fd)
            if (info.st_ino, info.st_dev) != (checked.st_ino, checked.st_dev) or (
                    lender is not None and info.st_uid != lender):
                raise FaasError(f"{real} changed while it was being staged")
            while chunk := source.read(_COPY_CHUNK):
                out.write(chunk)


def model_view(folder: str, uids: tuple[int, ...], staged: Path, group: int | None,
               owner: str, lender: int | None) -> ModelView:
    """Make `folder` readable to `uids` (see the module's docstring). `group`: the gid a
    staged copy belongs to (an adapter: its function's), or None for a copy every runtime
    uid may read (a backbone). `owner` names whose copy it is (a function, or the backbones):
    one copy per folder and owner, whichever uid the owner has this time. `lender`: whose
    files the node may lend its rights over (the owner of the function's file; None: any,
    for the operator's --models folders)."""
    source = Path(folder)
    files = _files(source)
    unreadable = next((real for _, real, info in files if not _readable(info, uids)), None)
    if unreadable is None:  # shown where it is (and its links' targets beside it)
        inside = source.resolve()
        if not reachable(str(_links_may_reach(inside))):  # in a folder closed to others
            _may_lend(source, files, lender)
        outside = {str(real) for _, real, _ in files if not real.is_relative_to(inside)}
        return ModelView(folder, (str(inside), *sorted(outside)))
    _may_lend(source, files, lender)
    key = hashlib.sha256(f"{source.resolve()}\0{owner}".encode()).hexdigest()[:24]
    copy = staged / key
    staged.mkdir(parents=True, exist_ok=True)
    staged.chmod(0o711)  # loaders and sandboxes may pass through, not list
    state = sorted([relative, info.st_size, info.st_mtime_ns] for relative, _, info in files
                   if not stat.S_ISDIR(info.st_mode))
    with open(staged / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another node on this host may stage the same
        marker = copy / ".staged-from"
        if not (marker.is_file() and json.loads(marker.read_text()) == state):
            log.warning("model_staged", folder=folder, copy=str(copy), unreadable=str(unreadable),
                        bytes=sum(size for _, size, _ in state),
                        hint="make it readable to others (chmod -R a+rX) to serve it without a copy")
            partial = copy.with_name(key + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            _copy(files, partial, lender)
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
