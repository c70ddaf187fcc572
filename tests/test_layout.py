"""The code's layout holds: imports go one way. Module-level imports only (an import inside
a function, such as the CLI's `faas up` starting a node, is not part of the layering)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _modules() -> dict[str, Path]:
    found = {}
    for package in ("faas", "runtime"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports when it is imported (TYPE_CHECKING blocks aside)."""
    body = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                body.extend(node.body)
        else:
            body.append(node)
    names = set()
    for node in body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                         for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {name for name in names if name in modules}


def test_no_module_imports_itself_through_others_and_the_sdk_never_imports_the_runtime():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    assert "runtime.preload.plan" in graph and graph["runtime.node.agent"]  # the walk sees the tree
    assert not [(a, b) for a in graph if a.startswith("faas") for b in graph[a] if b.startswith("runtime")]
    done: set[str] = set()

    def walk(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(name):] + [name])}")
        if name in done:
            return
        for other in sorted(graph[name]):
            walk(other, [*path, name])
        done.add(name)

    for name in sorted(graph):
        walk(name, [])


def test_the_runtime_sub_packages_import_one_way():
    """Each sub-package of runtime/ imports only those below it: none reaches back up
    (runtime/__init__.py gives the order)."""
    modules = _modules()
    packages: dict[str, set[str]] = {}
    for name, path in modules.items():
        if name.count(".") < 2 or not name.startswith("runtime."):
            continue
        package = name.split(".")[1]
        packages.setdefault(package, set()).update(
            dep.split(".")[1] for dep in _imports(path, modules) if dep.startswith("runtime.") and dep.count(".") >= 2)
    assert {"node", "preload", "pool", "memory", "sandbox", "engine", "batching", "backbone", "proc"} <= set(packages)
    below: dict[str, set[str]] = {}

    def reach(package: str, path: list[str]) -> set[str]:
        if package in path:
            raise AssertionError(f"sub-packages import each other: {' -> '.join(path[path.index(package):] + [package])}")
        if package not in below:
            below[package] = set()
            for other in sorted(packages.get(package, set()) - {package}):
                below[package] |= {other} | reach(other, [*path, package])
        return below[package]

    for package in sorted(packages):
        reach(package, [])
    assert "node" not in below["preload"] | below["pool"] | below["sandbox"]

