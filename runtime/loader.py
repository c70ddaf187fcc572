"""Imports user function files by path and collects the specs they declare.

Runs only in subprocesses (discovery and sandboxes): user code never runs in the node
agent's process, where the NATS connection lives.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from faas.errors import SpecError
from faas.sdk import FunctionSpec, spec_of


def load_file(path: str | Path, source: bytes | None = None) -> ModuleType:
    """Import one Python file as a module; its folder goes on sys.path for local imports.

    `source` is the file's content when it was read earlier, before this process gave up
    the right to read it (see runtime/isolation.py)."""
    path = Path(path).resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    name = f"faas_functions.{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    if source is None:
        source = path.read_bytes()
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    module = ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module
    try:
        exec(compile(source, str(path), "exec"), module.__dict__)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def specs_in(module: ModuleType) -> list[FunctionSpec]:
    seen: dict[int, FunctionSpec] = {}
    for value in vars(module).values():
        spec = spec_of(value)
        if spec is not None:
            seen[id(spec)] = spec
    return list(seen.values())


def discover(folders: list[str | Path], before_import: Callable[[], None] | None = None
             ) -> list[FunctionSpec]:
    """Every function declared in the `*.py` files of `folders` (not recursive; files whose
    names start with `_` are helpers and are imported only when a function file does).
    The files are read first; `before_import` runs before any of them is executed."""
    sources: list[tuple[Path, bytes]] = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise SpecError(f"functions folder {str(folder)!r} does not exist")
        sources += [(path, path.read_bytes()) for path in sorted(folder.glob("*.py"))
                    if not path.name.startswith("_")]
    if before_import is not None:
        before_import()
    by_name: dict[str, FunctionSpec] = {}
    for path, source in sources:
        for spec in specs_in(load_file(path, source)):
            other = by_name.get(spec.name)
            if other is not None and other.source_file != spec.source_file:
                raise SpecError(f"function {spec.name!r} is declared twice: in {other.source_file} "
                                f"and {spec.source_file}")
            by_name[spec.name] = spec
    return list(by_name.values())


def find_spec(source_file: str, name: str, source: bytes | None = None) -> FunctionSpec:
    """The spec named `name` declared in `source_file` (what a sandbox serves)."""
    for spec in specs_in(load_file(source_file, source)):
        if spec.name == name:
            return spec
    raise SpecError(f"{source_file} no longer declares function {name!r}")
