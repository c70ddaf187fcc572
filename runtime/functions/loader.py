"""Imports user function files by path and collects the specs they declare.

Runs only in subprocesses (discovery and sandboxes): user code never runs in the node
agent's process, where the NATS connection lives.
"""

from __future__ import annotations

import hashlib
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


def function_files(folders: list[str | Path]) -> list[Path]:
    """The `*.py` files of `folders` that may declare functions (not recursive; files whose
    names start with `_` are helpers, imported only when a function file does)."""
    files: list[Path] = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise SpecError(f"functions folder {str(folder)!r} does not exist")
        files += [path.resolve() for path in sorted(folder.glob("*.py"))
                  if not path.name.startswith("_")]
    return files


def find_spec(source_file: str, name: str) -> FunctionSpec:
    """The spec named `name` declared in `source_file` (what a sandbox serves)."""
    for spec in specs_in(load_file(source_file)):
        if spec.name == name:
            return spec
    raise SpecError(f"{source_file} no longer declares function {name!r}")
