"""`faas up --reload`: the development loop. A change to the functions folders is served
within about a second, without restarting the node.

Every `interval_s` the reloader looks at the `*.py` files of the functions folders (their
sizes and modification times). When any changed, each function file is discovered again,
isolated as at start (runtime/functions/catalog.py), and then:

- a function whose file (or a helper `_*.py` of its folder, or its declaration) changed is
  served anew: new sandboxes start, the old ones finish what they hold and stop; the
  backbone stays loaded (it is kept warm past its last user);
- a new function is served (with a uid of its own), a function no longer declared stops;
- a file that fails to load (a syntax error, a bad declaration) is reported once, in the
  log, and its functions keep serving the version before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from faas.errors import FaasError
from faas.logs import get_logger
from faas.record import FunctionRecord
from runtime.functions.catalog import Catalog, discover_file
from runtime.proc.isolation import Isolation

Add = Callable[[FunctionRecord, Isolation, tuple[str, ...]], Awaitable[None]]
Remove = Callable[[str], Awaitable[None]]
Snapshot = dict[Path, tuple[int, int]]


def snapshot(dirs: tuple[Path, ...]) -> Snapshot:
    """Size and modification time of every `*.py` of the folders (helpers included)."""
    found: Snapshot = {}
    for folder in dirs:
        for path in folder.glob("*.py"):
            try:
                info = path.stat()
            except OSError:  # removed meanwhile
                continue
            found[path.resolve()] = (info.st_mtime_ns, info.st_size)
    return found


def changed_files(before: Snapshot, after: Snapshot) -> set[Path]:
    """The files of `after` that are new or changed since `before`; a changed helper
    (`_*.py`) counts as a change of every file of its folder, which may import it."""
    changed = {path for path, state in after.items() if before.get(path) != state}
    gone = set(before) - set(after)
    touched = {p.parent for p in changed | gone if p.name.startswith("_")}
    return changed | {path for path in after if path.parent in touched}


class Reloader:
    """Serves the functions folders' changes (see the module's docstring). `served`: the
    functions served from the folders now (their declared records, by name)."""

    def __init__(self, catalog: Catalog, dirs: tuple[Path, ...], served: dict[str, FunctionRecord],
                 add: Add, remove: Remove, interval_s: float = 0.5) -> None:
        self.catalog = catalog
        self.dirs = dirs
        self.declared = dict(served)
        self.uids = {name: catalog.isolation[name].uid for name in served}
        self._add = add
        self._remove = remove
        self.interval_s = interval_s
        self.log = get_logger(component="reload")

    async def run(self) -> None:
        """Watch until cancelled."""
        seen = snapshot(self.dirs)
        while True:
            await asyncio.sleep(self.interval_s)
            now = snapshot(self.dirs)
            if now != seen:
                changed = changed_files(seen, now)
                seen = now
                try:
                    await self.reload(changed)
                except Exception as exc:  # a failed reload keeps serving what it served
                    self.log.error("reload_failed", error=f"{type(exc).__name__}: {exc}")

    async def reload(self, changed: set[Path]) -> None:
        """Discover every function file again and serve what changed."""
        declared: dict[str, FunctionRecord] = {}
        broken: set[str] = set()
        for folder in self.dirs:
            for path in sorted(p.resolve() for p in folder.glob("*.py") if not p.name.startswith("_")):
                try:
                    records = await discover_file(path, self.catalog.discovery_isolation(path))
                except FaasError as err:
                    self.log.error("reload_failed", file=str(path), error=err.message,
                                   still_serving=sorted(n for n, r in self.declared.items()
                                                        if r.source_file == str(path)))
                    broken.add(str(path))
                    continue
                for record in records:
                    if record.name in declared:
                        self.log.error("reload_failed", file=str(path),
                                       error=f"function {record.name!r} is declared twice")
                        continue
                    declared[record.name] = record
        for name, record in self.declared.items():  # a broken file's functions stay as they were
            if record.source_file in broken:
                declared.setdefault(name, record)
        for name in sorted(set(self.declared) - set(declared)):
            await self._remove(name)
            del self.declared[name]
            self.log.info("reload_removed", fn=name)
        for name, record in sorted(declared.items()):
            same = self.declared.get(name) == record and Path(record.source_file) not in changed
            if same or record.source_file in broken:
                continue
            if name not in self.uids:
                self.uids[name] = self.catalog.new_uid()
            try:
                served, isolation, backbone = await self.catalog.prepare(
                    record, Path(record.source_file), self.uids[name])
            except FaasError as err:
                self.log.error("reload_failed", fn=name, error=err.message,
                               still_serving=name in self.declared)
                continue
            await self._add(served, isolation, backbone)
            self.log.info("reload_served", fn=name, new=name not in self.declared)
            self.declared[name] = record
