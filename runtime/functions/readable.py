"""Make the model folders a function declares readable to the processes that load them,
wherever the operator keeps them.

A root node's sandboxes and backbone loaders run under uids of their own, in mount
namespaces with a private /tmp and every folder closed to others covered
(runtime/proc/isolation.py). The node knows which folders each function declares, checks
them itself (as root, outside any namespace), and then, for each:

- when the uids that load it may read every file in it, and reach it, it is bound
  read-only into their namespaces at its own path (under /tmp, say: their /tmp is private);
- when they may read every file but the folder lies inside one closed to others (root's
  Hugging Face cache, under /root), it is bound where it is (a snapshot's files are links
  into its repository's `blobs`: the targets of its model files are bound too);
- else (safetensors writes 0600, so any model or adapter saved by root) its model files are
  copied once under `$FAAS_HOME/staged/`, owned by root: an adapter's readable by its
  function's group only, a backbone's by every runtime uid (a base model functions share).
  A copy is reused while its source keeps its files, sizes and times.

A function's code chooses those paths, so the node lends its rights (the last two cases)
only as `lend_problem` allows: over a folder that looks like a model or an adapter, under one
of the places the operator keeps models in (the function's own folder, the `--models`
folders, the node's Hugging Face cache, the temporary folders), whose files all belong to the
owner of the function's file (who could read them anyway), never from the state folder but
its bundled models, and only model files (configs, tokenizers, safetensors weights). A
folder's links must stay inside it (a snapshot's, inside its repository folder), and a copy
reads each file through a descriptor checked again after opening.

A copy's folder has a random name in a folder nobody else may list, and each node holds a
shared lock on the copies it serves: a node starting removes the copies nobody holds (a
changed source, a function gone, the copy of a group whose uid another function may get).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from faas.bundled import faas_home, models_dir
from faas.errors import FaasError
from faas.logs import get_logger
from runtime.proc.isolation import reachable

log = get_logger()

_MAX_FILES = 10_000  # a model folder has tens; more is a path declared by mistake
_COPY_CHUNK = 1 << 24
# What the node lends its rights over: what transformers and peft read of a model folder.
MODEL_SUFFIXES = (".json", ".safetensors", ".model", ".txt", ".jinja", ".tiktoken")

File = tuple[str, Path, os.stat_result]  # path relative to the folder, real path, its stat


@dataclass(frozen=True)
class ModelView:
    """How the processes that load a model folder see it: `path` is what they load (the
    declared folder or its staged copy), `expose` what their namespaces must show, `lock`
    the descriptor whose shared lock keeps a staged copy (None when nothing was copied)."""

    path: str
    expose: tuple[str, ...]
    lock: int | None = None


def lending_roots(functions_folder: Path, models_dirs: Sequence[Path]) -> tuple[Path, ...]:
    """Where the operator keeps models, for a function of `functions_folder`: the node may
    lend its rights over model folders there only."""
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface"), "hub")
    return tuple(Path(p).resolve() for p in (functions_folder, *models_dirs, hub,
                                              tempfile.gettempdir(), "/var/tmp"))


def _links_may_reach(folder: Path) -> Path:
    """Where the links of `folder` may lead: the folder itself, or for a Hugging Face
    snapshot (`models--ORG--NAME/snapshots/REV`) its repository folder, whose `blobs` the
    snapshot's files link to."""
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent
    return folder


def _files(folder: Path) -> list[File]:
    """Every file and folder under `folder`, links followed where they stay inside (see
    `_links_may_reach`)."""
    real = folder.resolve()
    bound = _links_may_reach(real)
    found: list[File] = [(".", real, real.stat())]
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


def _looks_like(kind: str, folder: Path) -> bool:
    """A backbone's config names its architecture; an adapter's config its peft type."""
    try:
        config = json.loads((folder / ("config.json" if kind == "backbone" else "adapter_config.json")).read_text())
    except (OSError, ValueError):
        return False
    keys = ("model_type", "architectures") if kind == "backbone" else ("peft_type",)
    return isinstance(config, dict) and any(config.get(k) for k in keys)


def lend_problem(kind: str, folder: Path, files: Sequence[File], lender: int | None,
                 roots: Sequence[Path], home: Path, bundled: Path) -> str | None:
    """Why the node may not lend its rights over `folder` (a `kind` "backbone" or
    "adapter"), or None. `lender`: the owner of the declaring function's file (None: the
    operator's --models folders, whatever owns them); `roots`: where the operator keeps
    models; `home`: the state folder, of which only `bundled` (its models) may be lent."""
    real = folder.resolve()
    if (real.is_relative_to(home) and not real.is_relative_to(bundled)) or home.is_relative_to(real):
        return f"{folder} is in faas's state folder ({home}), where the node lends no rights"
    if not any(real.is_relative_to(root) for root in roots):
        return (f"{folder} is outside the places the node lends its rights in (the function's "
                f"folder, --models folders, the Hugging Face cache, {tempfile.gettempdir()})")
    if not _looks_like(kind, real):
        return f"{folder} does not look like {'a model' if kind == 'backbone' else 'an adapter'}"
    if lender is not None:
        foreign = next((path for _, path, info in files if info.st_uid != lender), None)
        if foreign is not None:
            return (f"{foreign} belongs to uid {foreign.stat().st_uid}, not to uid {lender}, the "
                    "owner of the function's file")
    return None


def _model_files(files: Sequence[File]) -> list[File]:
    """The files transformers and peft read, by the name they have in the folder (a
    snapshot's blobs have none of their own)."""
    return [f for f in files[1:] if stat.S_ISREG(f[2].st_mode) and f[0].endswith(MODEL_SUFFIXES)]


def _copy(files: Sequence[File], into: Path, lender: int | None) -> None:
    """Copy the checked files into `into`, each read through a descriptor that must still
    be the regular file it was (owned by `lender`, when given)."""
    into.mkdir()
    for relative, real, checked in files:
        target = into / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as source, open(target, "wb") as out:
            info = os.fstat(fd)
            if (info.st_ino, info.st_dev) != (checked.st_ino, checked.st_dev) or (
                    lender is not None and info.st_uid != lender):
                raise FaasError(f"{real} changed while it was being staged")
            while chunk := source.read(_COPY_CHUNK):
                out.write(chunk)


def _claim(lock_path: Path) -> int:
    """A descriptor holding a shared lock on `lock_path` (created), the file a sweep may not
    have removed meanwhile."""
    while True:
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # a sweep removed it before we held it: claim the new one


def _stage(folder: Path, files: Sequence[File], staged: Path, group: int | None, label: str,
           lender: int | None) -> ModelView:
    """The staged copy of `files` (made now unless one of this very source is there), with
    a shared lock on `<key>.lock` held for the caller (a sweep removes only copies nobody
    holds); those who make a copy take turns on `<key>.make`."""
    state = sorted([relative, info.st_size, info.st_mtime_ns] for relative, _, info in files)
    key = hashlib.sha256(json.dumps([str(folder.resolve()), label, group, state]).encode()).hexdigest()[:32]
    staged.mkdir(parents=True, exist_ok=True)
    staged.chmod(0o711)  # its copies' names are known only to those who load them
    lock = _claim(staged / f"{key}.lock")
    try:
        name = os.pread(lock, 64, 0).decode()
        if not (name and (staged / name).is_dir()):
            with open(staged / f"{key}.make", "w") as make:
                fcntl.flock(make, fcntl.LOCK_EX)  # another node on this host may stage it too
                name = os.pread(lock, 64, 0).decode()
                if not (name and (staged / name).is_dir()):
                    name = _make_copy(folder, files, staged, lock, group, lender, sum(s for _, s, _ in state))
    except BaseException:
        os.close(lock)
        raise
    copy = str(staged / name)
    return ModelView(copy, (copy,), lock)


def _make_copy(folder: Path, files: Sequence[File], staged: Path, lock: int, group: int | None,
               lender: int | None, size: int) -> str:
    name = secrets.token_hex(16)
    os.ftruncate(lock, 0)
    os.pwrite(lock, name.encode(), 0)  # before copying: a sweep finds what a crash left
    copy, partial = staged / name, staged / f"{name}.partial"
    log.warning("model_staged", folder=str(folder), copy=str(copy), bytes=size,
                hint="make it readable to others (chmod -R a+rX) to serve it without a copy")
    _copy(files, partial, lender)
    for path in [partial, *partial.rglob("*")]:
        os.chown(path, 0, group if group is not None else 0, follow_symlinks=False)
        path.chmod((0o750 if path.is_dir() else 0o640) if group is not None
                   else (0o755 if path.is_dir() else 0o644))
    partial.rename(copy)
    return name


def sweep_staged(staged: Path) -> None:
    """Remove the staged copies no node holds (call after taking this node's own)."""
    if not staged.is_dir():
        return
    for lock_file in staged.glob("*.lock"):
        fd = os.open(lock_file, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held: in use
            os.close(fd)
            continue
        name = os.pread(fd, 64, 0).decode()
        if name:
            for leftover in (staged / name, staged / f"{name}.partial"):
                shutil.rmtree(leftover, ignore_errors=True)
        lock_file.unlink(missing_ok=True)
        lock_file.with_suffix(".make").unlink(missing_ok=True)
        os.close(fd)


def model_view(kind: str, folder: str, uids: tuple[int, ...], group: int | None, label: str,
               lender: int | None, roots: Sequence[Path]) -> ModelView:
    """Make the `kind` ("backbone" or "adapter") folder `folder` readable to `uids` (see the
    module's docstring). `group`: the gid a staged copy belongs to (an adapter: its
    function's), or None for one every runtime uid may read (a backbone); `label` names
    whose copy it is; `lender` and `roots` are as `lend_problem` takes them."""
    source = Path(folder)
    files = _files(source)
    inside = source.resolve()
    unreadable = next((real for _, real, info in files if not _readable(info, uids)), None)
    if unreadable is None and reachable(str(_links_may_reach(inside))):
        outside = {str(real) for _, real, _ in files if not real.is_relative_to(inside)}
        return ModelView(folder, (str(inside), *sorted(outside)))
    home = faas_home().resolve()
    problem = lend_problem(kind, source, files, lender, roots, home, models_dir().resolve())
    if problem:
        cause = (f"{unreadable} is not readable by them" if unreadable is not None
                 else f"{inside} is inside a folder closed to others")
        raise FaasError(f"the function's sandboxes cannot read {folder} ({cause}), and the node "
                        f"will not lend its rights over it: {problem}. Make it readable to others "
                        "(chmod -R a+rX) outside folders closed to them")
    model_files = _model_files(files)
    if unreadable is None:  # readable, in a folder closed to others: bound, with its links' model files
        outside = {str(real) for _, real, _ in model_files if not real.is_relative_to(inside)}
        return ModelView(folder, (str(inside), *sorted(outside)))
    return _stage(source, model_files, faas_home() / "staged", group, label, lender)
