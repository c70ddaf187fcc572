"""Serve what is deployed in NATS (faas/deploy.py), live.

The node watches the `faas_functions` bucket: each record (a new deploy, a rollback) is
made real on this node (its files downloaded from the object store and checked against
their SHA-256, its backbone found by fingerprint among the local model folders) and then
served in place of the version before; a removal stops it. A record this node cannot serve
(no local model with the backbone's fingerprint, a record that fails validation) is logged
and left to the nodes that can: requests for it that reach this node are forwarded there.

Files land in `$FAAS_HOME/deployed/<node>/<function>/v<version>-<record digest>/` (the code)
and its `adapter/` folder (per node: nodes on one host share $FAAS_HOME). With sandbox uids
each such folder belongs to root with its function's group (mode 0750, files 0640): that
function's sandboxes may read it, no other function's may, and none may change it (its
mount namespace also has the whole state folder read-only). A version's folder goes once
its sandboxes have stopped, the node's when it stops; at start a node removes the folders
of nodes on the host that are gone (killed before they could).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeout

from faas import protocol
from faas.artifacts import PICKLE_SUFFIXES, model_fingerprint
from faas.connection import raise_if_cancelled
from faas.deploy import buckets
from faas.errors import FaasError, SpecError
from faas.logs import get_logger
from faas.record import FunctionRecord, decode_deployment
from runtime.functions.catalog import Catalog, readable_models
from runtime.functions.readable import lending_roots
from runtime.proc.isolation import Isolation, reachable
from runtime.proc.locks import hold

AddFunction = Callable[[FunctionRecord, Isolation], Awaitable[None]]
RemoveFunction = Callable[[str], Awaitable[None]]


class ModelFinder:
    """Local model folders by the fingerprint of their config."""

    def __init__(self, folders: tuple[Path, ...]) -> None:
        self.folders = folders
        self._known: dict[Path, str] = {}

    def _fingerprint(self, model: Path) -> str | None:
        if model not in self._known:
            try:
                self._known[model] = model_fingerprint(model)
            except (OSError, ValueError):
                return None
        return self._known[model]

    def configured(self, model: Path) -> bool:
        """Whether `model` is directly under one of the configured folders."""
        return any(model.parent.resolve() == folder.resolve() for folder in self.folders)

    def find(self, fingerprint: str, hint: str | None) -> Path | None:
        """The deployer's own path first (mounted at the same place), then every model
        folder directly under the configured folders."""
        candidates = [Path(hint)] if hint else []
        for folder in self.folders:
            if folder.is_dir():
                candidates += sorted(p for p in folder.iterdir() if (p / "config.json").is_file())
        return next((c for c in candidates if (c / "config.json").is_file()
                     and self._fingerprint(c) == fingerprint), None)


class Deployments:
    """Watches the deployed functions and adds, replaces and removes them on the node."""

    def __init__(self, nc: NATS, catalog: Catalog, models: ModelFinder, add: AddFunction,
                 remove: RemoveFunction, local: set[str], root: Path) -> None:
        self.nc = nc
        self.catalog = catalog
        self.models = models
        self._add = add
        self._remove = remove
        self.local = local  # served from the functions folders: a deploy does not override them
        self.root = root
        self.versions: dict[str, int] = {}  # what this node serves
        self._unserved: dict[str, tuple[str, Any]] = {}  # deployed, not servable here: why, entry
        self._watcher: Any = None
        self._task: asyncio.Task[None] | None = None
        self._uids: dict[str, int | None] = {}  # one per function for the node's life
        self._lock: int | None = None  # held while the node lives: its folder is in use
        self.log = get_logger(component="deployed")

    @property
    def unavailable(self) -> dict[str, str]:
        """The deployed functions this node does not serve, and why."""
        return {name: why for name, (why, _entry) in self._unserved.items()}

    async def start(self, timeout_s: float = 30.0) -> None:
        """Serve what is deployed now (before the node says it is ready), then follow."""
        try:
            kv, _ = await buckets(self.nc)
            self._watcher = await kv.watchall()
        except (NatsError, TimeoutError) as exc:
            self.log.warning("deployments_unavailable", error=f"{type(exc).__name__}: {exc}",
                             hint="deployed functions need a NATS server with JetStream")
            return
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in (self.root.parent, self.root):
            folder.chmod(0o711)  # sandboxes may pass through, not list
        self._lock = hold(self.root.parent / f"{self.root.name}.lock")
        self._remove_orphans()
        while (entry := await self._watcher.updates(timeout=timeout_s)) is not None:
            await self._apply(entry)
        self._task = asyncio.create_task(self._follow(), name="deployments")
        self.log.info("deployments_served", functions=self.versions, unavailable=sorted(self.unavailable))

    async def _follow(self, retry_s: float = 30.0) -> None:
        """Apply each change; every `retry_s` without one, try again what could not be
        served (a model mounted since, a bundled model built since)."""
        while True:
            try:
                entry = await self._watcher.updates(timeout=retry_s)
            except NatsTimeout:
                raise_if_cancelled()
                for _why, entry in list(self._unserved.values()):
                    await self._apply(entry)
                continue
            raise_if_cancelled()
            if entry is self._watcher.STOP_ITER:  # stopped: the node is closing
                return
            if entry is not None:
                await self._apply(entry)

    async def _apply(self, entry: Any) -> None:
        name = entry.key
        if name in self.local:
            self.log.warning("deploy_shadowed", fn=name, why="a function of this node's folders has that name")
            return
        self._unserved.pop(name, None)
        try:
            if entry.operation is not None or not entry.value:  # a removal
                if self.versions.pop(name, None) is not None:
                    await self._remove(name)
                    self.log.info("deploy_removed", fn=name)
                return
            record = decode_deployment(entry.value)
            if self.versions.get(name) == record["version"]:
                return
            spec, isolation = await self._materialize(name, record, entry.value)
            await self._add(spec, isolation)
            self.versions[name] = record["version"]
            self.log.info("deploy_served", fn=name, version=record["version"], backbone=spec.backbone)
        except Exception as exc:  # whatever the record holds, the watch goes on
            why = exc.message if isinstance(exc, FaasError) else f"{type(exc).__name__}: {exc}"
            self._unserved[name] = (why, entry)
            # A version served before stays: a bad record does not take a function down.
            self.log.error("deploy_not_served", fn=name, error=why, still_serving=self.versions.get(name))

    async def _materialize(self, name: str, record: dict[str, Any],
                           raw: bytes) -> tuple[FunctionRecord, Isolation]:
        if record.get("name") != name:
            raise FaasError(f"record of {name!r} names {record.get('name')!r}")
        backbone = None
        if record["backbone"] is not None:
            found = self.models.find(record["backbone"]["fingerprint"], record["backbone"].get("path"))
            if found is None:
                raise FaasError(f"no local model has the backbone's fingerprint "
                                f"{record['backbone']['fingerprint'][:19]} ({record['backbone']['name']}): "
                                "mount it or add --models DIR")
            backbone = str(found)
        folder = self.root / name / f"v{record['version']}-{hashlib.sha256(raw).hexdigest()[:12]}"
        adapter = folder / "adapter" if record["adapter"] is not None else None
        # Records deployed before functions had an `engine` ran in their sandboxes' models.
        try:
            spec = FunctionRecord.from_untrusted({
                "engine": "sandbox", **record["spec"], "name": name,
                "source_file": str(folder / record["code"]["file"]),
                "backbone": backbone, "adapter": str(adapter) if adapter else None})
        except SpecError as err:
            raise FaasError(f"deployed record of {name!r} is not a valid function: {err.message}") from None
        pickled = [p for p in (record["adapter"] or {"files": {}})["files"] if p.endswith(PICKLE_SUFFIXES)]
        if pickled:
            raise FaasError(f"deployed adapter carries pickle files {pickled[:2]}: only safetensors")
        if name not in self._uids:
            self._uids[name] = self.catalog.new_uid()
        uid = self._uids[name]
        if backbone is not None and self.models.configured(Path(backbone)):
            # One of the operator's --models folders: made readable to this function's
            # uids as the functions folders' models are (staged when they may not read it).
            spec, shown, _ = await readable_models(
                spec, uid, self.catalog.loader_uid, lender=None,
                roots=lending_roots(Path(backbone).parent, self.models.folders), held=self.catalog.held,
                adapter=False)
        else:  # the deployer's own path: only what any uid may reach already
            shown = (backbone,) if backbone is not None and reachable(backbone) else ()
        isolation = self.catalog.isolation_for(spec, uid, self.root / name, shown)
        if not (folder / ".complete").exists():
            await self._download(folder, record, isolation.uid)
        return replace(spec, deployed=record["version"]), isolation

    async def _download(self, folder: Path, record: dict[str, Any], uid: int | None) -> None:
        store = await self.nc.jetstream().object_store(protocol.ARTIFACTS_BUCKET)
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        files = {**record["code"]["files"],
                 **{f"adapter/{path}": key for path, key in (record["adapter"] or {"files": {}})["files"].items()}}
        for relative, key in files.items():
            target = (partial / relative).resolve()
            if not target.is_relative_to(partial.resolve()):  # decode_deployment refused these already
                raise FaasError(f"deployed file {relative!r} points outside its folder")
            data = (await store.get(key)).data or b""
            if hashlib.sha256(data).hexdigest() != key:
                raise FaasError(f"deployed file {relative!r} does not match its checksum")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        (partial / ".complete").write_text(json.dumps({"version": record["version"]}))
        (folder.parent).mkdir(parents=True, exist_ok=True)
        folder.parent.chmod(0o711)
        if uid is not None:  # the function's group may read it; nobody else, and only root writes
            for path in [partial, *partial.rglob("*")]:
                os.chown(path, 0, uid)
                path.chmod(0o750 if path.is_dir() else 0o640)
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)

    async def close(self) -> None:
        """Stop following deploys (the functions served stay until the node stops them)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._watcher is not None:
            try:
                await self._watcher.stop()
            except NatsError:
                pass

    def _remove_orphans(self) -> None:
        """Remove the folders of nodes on this host that are gone: nobody holds their lock
        (a folder without one is from a node of a version before these locks)."""
        for folder in [p for p in self.root.parent.iterdir() if p.is_dir() and p != self.root]:
            lock = self.root.parent / f"{folder.name}.lock"
            try:
                fd = hold(lock)
            except BlockingIOError:  # that node lives
                continue
            shutil.rmtree(folder, ignore_errors=True)
            lock.unlink(missing_ok=True)
            os.close(fd)
            self.log.info("orphan_files_removed", folder=str(folder))

    def remove_version(self, spec: FunctionRecord) -> None:
        """The files of a deployed version no sandbox runs any more (the node serves another
        version, or none): a rollback to it downloads them again."""
        folder = Path(spec.source_file).parent
        if spec.deployed is not None and folder.is_relative_to(self.root):
            shutil.rmtree(folder, ignore_errors=True)

    def remove_files(self) -> None:
        """Once no sandbox of this node runs deployed code any more."""
        shutil.rmtree(self.root, ignore_errors=True)
        if self._lock is not None:
            (self.root.parent / f"{self.root.name}.lock").unlink(missing_ok=True)
            os.close(self._lock)
            self._lock = None

