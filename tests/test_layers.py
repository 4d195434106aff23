"""The shape of the code, checked from the code: the import graph of ``engine/``, ``trainer/`` and
``fairdistill/`` (function-level and ``TYPE_CHECKING`` imports included, and the ``"module:func"``
entry points the CLI dispatches to) has no cycle, follows the layer order of ``engine/layers.py``
and imports no private name across modules; no function in ``engine/`` or ``trainer/`` is over 80
lines, ``Engine`` is not over 200, and the engine imports no torch. Third-party imports (optional
ones like ray inside functions) are not part of the graph. Each check lists every offender, one
line each, ``file:line: what``."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from fairdistill.engine import layers

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "trainer", "fairdistill")
SIZED = ("engine", "trainer")
MAX_FUNCTION_LINES = 80
TORCH_SIDE = ("torch", "transformers", "peft", "vllm", "gguf")  # the trainer's; the engine never imports them
ENTRY_POINT = re.compile(r"^([A-Za-z_]\w*(?:\.\w+)*):\w+$")  # "engine.fair.pipeline:cli_main"


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    name: str | None  # the name of a `from X import name`
    where: str  # file:line


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    return {
        module_name(root, p): p
        for pkg in packages
        if (root / pkg).is_dir()
        for p in sorted((root / pkg).rglob("*.py"))
    }


MAPPED = re.compile(r"^fairdistill\.(?=(?:engine|trainer|benchmarks|recipes)(?:\.|$))")


def short(name: str) -> str:
    """``fairdistill.engine.x`` (the installed name) is ``engine.x`` (its folder) here."""
    return MAPPED.sub("", name)


def _base(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return short(node.module or "")
    parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join([*parts, *([node.module] if node.module else [])])


def edges_of(module: str, path: Path, known: dict[str, Path], root: Path) -> list[Edge]:
    """Every import of ``module`` into ``known`` modules, wherever it sits in the file."""
    out = []
    where = str(path.relative_to(root))
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [Edge(module, short(a.name), None, f"{where}:{node.lineno}") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, path, node)
            for a in node.names:
                sub = short(f"{base}.{a.name}")
                out.append(Edge(module, sub if sub in known else base, a.name, f"{where}:{node.lineno}"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = ENTRY_POINT.match(node.value)
            if m and short(m.group(1)) in known:
                out.append(Edge(module, short(m.group(1)), None, f"{where}:{node.lineno}"))
    return [e for e in out if e.imported in known and e.imported != module]


def graph(root: Path, packages: tuple[str, ...]) -> list[Edge]:
    known = modules(root, packages)
    return [e for m, p in known.items() for e in edges_of(m, p, known, root)]


def cycles(edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    succ: dict[str, set[str]] = {}
    for e in edges:
        succ.setdefault(e.importer, set()).add(e.imported)
        succ.setdefault(e.imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(succ[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(succ):
        if v not in index:
            visit(v)
    return sorted(found)


def _private(part: str) -> bool:
    return part.startswith("_") and not part.startswith("__")


def private_imports(edges: list[Edge]) -> list[str]:
    """``from m import _x`` anywhere, and a private module (``pkg._m``) imported from outside ``pkg``."""
    bad = []
    for e in edges:
        if e.name is not None and _private(e.name):
            bad.append(f"{e.where}: {e.importer} imports {e.imported}.{e.name}")
            continue
        parts = e.imported.split(".")
        for i, part in enumerate(parts):
            owner = ".".join(parts[:i])
            if _private(part) and not (e.importer == owner or e.importer.startswith(owner + ".")):
                bad.append(f"{e.where}: {e.importer} imports the private module {e.imported}")
                break
    return sorted(bad)


def unplaced(known: dict[str, Path]) -> list[str]:
    return [
        f"{p.relative_to(ROOT)}: {m} is in no layer of engine/layers.py"
        for m, p in known.items()
        if layers.place(m) is None
    ]


def against_order(edges: list[Edge]) -> list[str]:
    bad = []
    for e in edges:
        if layers.place(e.importer) is None or layers.place(e.imported) is None:
            continue  # reported by test_every_module_has_a_layer
        why = layers.refusal(e.importer, e.imported)
        if why:
            bad.append(f"{e.where}: {e.importer} -> {e.imported} ({why})")
    return sorted(set(bad))


def impure_imports(edges: list[Edge]) -> list[str]:
    """Imports by a PURE module of the engine (not by sim/trainer) of a module that is not PURE."""
    return [
        f"{e.where}: {e.importer} -> {e.imported}"
        for e in edges
        if layers.pure(e.importer)
        and not layers.pure(e.imported)
        and layers.place(e.importer) not in layers.BESIDE
    ]


def long_functions(root: Path, packages: tuple[str, ...], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    bad = []
    for module, path in modules(root, packages).items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > limit:
                    bad.append(f"{path.relative_to(root)}:{node.lineno}: {module}.{node.name} is {n} lines")
    return bad


def torch_imports(root: Path, packages: tuple[str, ...]) -> list[str]:
    """Imports of the trainer's heavy libraries (``TORCH_SIDE``), lazy ones included."""
    bad = []
    for module, path in modules(root, packages).items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            for name in names:
                if name.split(".")[0] in TORCH_SIDE:
                    bad.append(
                        f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}: {module} imports {name}"
                    )
    return bad


def _report(what: str, bad: list[str]) -> str:
    return f"{len(bad)} {what}:\n" + "\n".join(bad)


@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    return graph(ROOT, PACKAGES)


def test_every_module_has_a_layer() -> None:
    bad = unplaced(modules(ROOT, PACKAGES))
    assert not bad, _report("modules without a layer (add them to engine/layers.py)", bad)


def test_no_import_cycle(edges: list[Edge]) -> None:
    found = [" <-> ".join(c) for c in cycles(edges)]
    assert not found, _report("import cycles", found)


def test_imports_follow_the_layer_order(edges: list[Edge]) -> None:
    bad = against_order(edges)
    assert not bad, _report("imports against the layer order of engine/layers.py", bad)


def test_pure_modules_import_only_pure_modules(edges: list[Edge]) -> None:
    bad = impure_imports(edges)
    assert not bad, _report("imports of a PURE module (engine/layers.py) that are not pure", bad)


def test_no_private_name_imported_across_modules(edges: list[Edge]) -> None:
    bad = private_imports(edges)
    assert not bad, _report("private names imported across modules", bad)


def test_no_function_over_80_lines() -> None:
    bad = long_functions(ROOT, SIZED)
    assert not bad, _report(f"functions over {MAX_FUNCTION_LINES} lines", bad)


def test_the_engine_class_is_at_most_200_lines() -> None:
    """``Engine`` (the request path's one public call) stays small enough to read in one sitting."""
    sizes = [
        (f"{path.relative_to(ROOT)}:{node.lineno}", (node.end_lineno or node.lineno) - node.lineno + 1)
        for path in sorted((ROOT / "engine" / "request").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ClassDef) and node.name == "Engine"
    ]
    assert len(sizes) == 1, sizes
    assert sizes[0][1] <= 200, f"{sizes[0][0]}: Engine is {sizes[0][1]} lines"


def test_the_engine_never_imports_torch() -> None:
    bad = torch_imports(ROOT, ("engine", "fairdistill"))
    assert not bad, _report("imports of the trainer's libraries outside trainer/", bad)


def test_the_docs_show_the_same_layer_order() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = text.split("## The layers", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    shown = [line.split("  ")[0].strip() for line in block.strip().splitlines() if line[:1].strip()]
    assert shown == [layer.name for layer in layers.LAYERS]


def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checks_find_what_they_look_for(tmp_path: Path) -> None:
    """The checks themselves, on a small tree with one of each fault."""
    _tree(
        tmp_path,
        {
            "engine/__init__.py": "",
            "engine/errors.py": "def f():\n    from engine.rundir import store\n",  # upward, lazy
            "engine/types.py": "_hidden = 1\n",
            "engine/rundir/__init__.py": "",
            "engine/rundir/store.py": "from ..types import _hidden\nfrom engine.fair import report\n",
            "engine/fair/__init__.py": "",
            "engine/fair/report.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from engine.rundir.store import X\nimport engine.sim._quiet\nimport torch\n",
            "engine/sim/__init__.py": "",
            "engine/sim/_quiet.py": "D = {'go': 'engine.cli:main'}\n",
            "engine/cli.py": "def long():\n" + "    x = 1\n" * 80,
        },
    )
    found = graph(tmp_path, ("engine",))
    assert cycles(found) == [["engine.fair.report", "engine.rundir.store"]]
    assert [line.split(": ", 1)[1] for line in against_order(found)] == [
        "engine.errors -> engine.rundir.store (upward: base -> rundir | config)",
        "engine.fair.report -> engine.sim._quiet (only cli | fairdistill and launch import engine.sim)",
        "engine.rundir.store -> engine.fair.report (upward: rundir | config -> fair | generate)",
        "engine.sim._quiet -> engine.cli (engine.sim imports only engine.layers.PURE)",
    ]
    assert [line.split(": ", 1)[1] for line in private_imports(found)] == [
        "engine.fair.report imports the private module engine.sim._quiet",
        "engine.rundir.store imports engine.types._hidden",
    ]
    assert impure_imports([Edge("engine.fair.answers", "engine.request.client", None, "x.py:1")]) == [
        "x.py:1: engine.fair.answers -> engine.request.client"
    ]
    assert [line.split(": ", 1)[1] for line in torch_imports(tmp_path, ("engine",))] == [
        "engine.fair.report imports torch"
    ]
    assert [line.split(": ", 1)[1] for line in long_functions(tmp_path, ("engine",))] == [
        "engine.cli.long is 81 lines"
    ]
