"""The house: every lcmap module imports on its own, and no two modules import each other.

Two checks, both over every ``lcmap`` module found on disk (new modules are covered without
editing this file):

- **No import cycle**, function-level imports included: a static graph of ``import``/``from``
  statements between lcmap modules (``__init__`` re-exports aside) must be acyclic.
- **Each module imports alone**: a parent process imports the heavy third-party libraries once,
  then forks one child per lcmap module; the child drops every loaded lcmap module and imports
  just that one. A module that only works when another lcmap module was imported first fails here.
- **The map is true**: ``docs/architecture.md`` names every module.
"""

from __future__ import annotations

import ast
import os
import sys
import traceback
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lcmap"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts).removesuffix(".__init__")
        mods[name] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """lcmap modules that ``name`` imports (anywhere in the file), packages' ``__init__`` excluded."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        found |= {t for t in targets if t in mods and t != name and mods[t].name != "__init__.py"}
    return found


def test_no_import_cycle() -> None:
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items() if p.name != "__init__.py"}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if not state.get(nxt):
                cycle = visit(nxt, path)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for mod in sorted(graph):
        if not state.get(mod):
            cycle = visit(mod, [])
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_check_finds_a_cycle(tmp_path: Path) -> None:
    """The graph builder sees function-level imports (so the check above can fail)."""
    a = tmp_path / "a.py"
    a.write_text("def f():\n    from lcmap.b import g\n")
    b = tmp_path / "b.py"
    b.write_text("from lcmap.a import f\n")
    mods = {"lcmap.a": a, "lcmap.b": b}
    assert _imports("lcmap.a", a, mods) == {"lcmap.b"}
    assert _imports("lcmap.b", b, mods) == {"lcmap.a"}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_each_module_imports_alone() -> None:
    # third-party libraries once, in the parent; no lcmap module is loaded before forking
    import dask  # noqa: F401
    import lightning  # noqa: F401
    import rasterio  # noqa: F401
    import torch  # noqa: F401
    import torchgeo  # noqa: F401

    failures = []
    for name in sorted(_modules()):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: forget lcmap (earlier tests may have imported it), import one module, report
            os.close(read)
            for loaded in [m for m in sys.modules if m == "lcmap" or m.startswith("lcmap.")]:
                del sys.modules[loaded]
            code, message = 0, b""
            try:
                __import__(name)
            except BaseException:  # noqa: BLE001 - report any failure to the parent
                code, message = 1, traceback.format_exc().encode()
            os.write(write, message[-4000:])
            os._exit(code)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            failures.append(f"{name}:\n{message}")
    assert not failures, "modules that do not import alone:\n" + "\n".join(failures)


def test_architecture_doc_names_every_module() -> None:
    """docs/architecture.md has a line for every module, so the map of the house stays true."""
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if path.name == "__init__.py" and path.parent.name in (
            "lcmap",
            "pipeline",
            "geodata",
            "training",
            "prediction",
            "analysis",
        ):
            continue  # package markers with nothing in them
        if f"`{rel}`" not in doc and f"`lcmap/{rel}`" not in doc:
            missing.append(rel)
    assert not missing, f"modules without a paragraph in docs/architecture.md: {missing}"
