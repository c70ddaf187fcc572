"""Imports user function files by path and collects the specs they declare.

Runs only in subprocesses (discovery and sandboxes): user code never runs in the node
agent's process, where the NATS connection lives.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from faas.errors import SpecError
from faas.sdk import FunctionSpec, spec_of


def load_file(path: str | Path) -> ModuleType:
    """Import one Python file as a module; its folder goes on sys.path for local imports."""
    path = Path(path).resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    name = f"faas_functions.{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SpecError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
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


def discover(folders: list[str | Path]) -> list[FunctionSpec]:
    """Every function declared in the `*.py` files of `folders` (not recursive; files whose
    names start with `_` are helpers and are imported only when a function file does)."""
    files: list[Path] = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise SpecError(f"functions folder {str(folder)!r} does not exist")
        files += sorted(folder.glob("*.py"))
    by_name: dict[str, FunctionSpec] = {}
    for path in files:
        if path.name.startswith("_"):
            continue
        for spec in specs_in(load_file(path)):
            other = by_name.get(spec.name)
            if other is not None and other.source_file != spec.source_file:
                raise SpecError(f"function {spec.name!r} is declared twice: in {other.source_file} "
                                f"and {spec.source_file}")
            by_name[spec.name] = spec
    return list(by_name.values())


def find_spec(source_file: str, name: str) -> FunctionSpec:
    """The spec named `name` declared in `source_file` (what a sandbox serves)."""
    for spec in specs_in(load_file(source_file)):
        if spec.name == name:
            return spec
    raise SpecError(f"{source_file} no longer declares function {name!r}")
