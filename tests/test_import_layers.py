"""The packages' layers point one way: no import cycles, a torch/numpy-only maths core, a trainer free of dynamics.

Every ``.py`` file of ``dynamics`` and ``trainer`` is parsed with :mod:`ast` and
*every* import counts: top-level ones, those deferred into a function, and those
under ``if TYPE_CHECKING:``. Relative imports are resolved against the file's
package, ``from pkg import submodule`` points at the submodule (``from pkg import
name`` at the package's ``__init__``), and ``importlib.import_module("literal")``
counts as an import of that module. A deferred import only hides a cycle from
the interpreter, not from the design, so it is a cycle here.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dynamics", "trainer")

#: the maths core: functions of tensors and arrays, importing only torch, numpy, the standard library and each other.
MATHS_CORE = frozenset(
    {
        "dynamics._kernels",
        "dynamics._lru",
        "dynamics.validation",
        "dynamics.spectra",
        "dynamics.metrics",
        "dynamics.updates",
        "dynamics.components",
        "dynamics.activations",
        "dynamics.heavy_tails",
        "dynamics.noise",
        "dynamics.subspaces",
        "dynamics.similarity",
        "dynamics.sparsity",
    }
)
CORE_THIRD_PARTY = frozenset({"torch", "numpy"})

#: trainer modules that readers of a run directory use without torch.
TORCH_FREE = ("trainer.run_format", "trainer.names", "trainer.errors", "trainer.atomic", "trainer.tokenizer")


# --------------------------------------------------------------------------- the graph


@dataclass(frozen=True)
class Import:
    """One import statement's target as an absolute dotted name, where it was written, and what it names."""

    module: str  # absolute dotted name of what is imported (a module, or the package a name comes from)
    line: int
    names: tuple[str, ...] = ()  # for ``from module import a, b``: a, b (a submodule is resolved into ``module``)


def find_modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under each package (``pkg/__init__.py`` -> ``pkg``)."""
    modules: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _package_of(module: str, path: Path) -> str:
    """The package a relative import in ``module`` starts from."""
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _resolve_relative(module: str, path: Path, level: int, target: str | None) -> str:
    base = _package_of(module, path).split(".")
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def _literal_import_module(node: ast.Call) -> str | None:
    """``importlib.import_module("a.b")`` / ``import_module("a.b")`` / ``__import__("a.b")``: ``"a.b"``."""
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if called not in ("import_module", "__import__") or not node.args:
        return None
    first = node.args[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str) and not first.value.startswith("."):
        return first.value
    return None


def imports_of(module: str, path: Path, known: set[str] | frozenset[str]) -> list[Import]:
    """Every import written anywhere in ``path`` (module ``module``), with absolute targets.

    ``from pkg import x`` targets ``pkg.x`` when that is one of the ``known``
    modules, else ``pkg`` (``x`` is a name defined there).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[Import] = []
    for node in ast.walk(tree):  # walks function bodies and `if TYPE_CHECKING:` blocks too
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(module, path, node.level, node.module) if node.level else (node.module or "")
            names: list[str] = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if alias.name != "*" and sub in known:
                    found.append(Import(sub, node.lineno))
                else:
                    names.append(alias.name)
            if names:
                found.append(Import(base, node.lineno, tuple(names)))
        elif isinstance(node, ast.Call):
            target = _literal_import_module(node)
            if target is not None:
                found.append(Import(target, node.lineno))
    return found


def project_module(target: str, known: set[str] | frozenset[str]) -> str | None:
    """The project module an import of ``target`` loads: ``target`` or its nearest known parent; None if external."""
    parts = target.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return None


def build_graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {imported project module: first line}; self-imports left out."""
    known = set(modules)
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges: dict[str, int] = {}
        for imp in imports_of(module, path, known):
            target = project_module(imp.module, known)
            if target is not None and target != module:
                edges.setdefault(target, imp.line)
        graph[module] = edges
    return graph


Graph = dict[str, dict[str, int]] | dict[str, set[str]]


def _successors(graph: Graph, node: str) -> list[str]:
    return sorted(t for t in graph.get(node, ()) if t in graph)


def cyclic_components(graph: Graph) -> list[list[str]]:
    """Strongly connected components of more than one module, each sorted (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)

    for root in sorted(graph):
        if root in index:
            continue
        visit(root)
        work = [(root, iter(_successors(graph, root)))]
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    visit(child)
                    work.append((child, iter(_successors(graph, child))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:  # every child done: close the node
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return sorted(components)


def shortest_cycle(graph: Graph, component: list[str]) -> list[str]:
    """The shortest cycle ``[a, ..., a]`` through the component's first module, inside the component."""
    members = set(component)
    start = component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier and start not in previous:  # breadth first
        following = []
        for node in frontier:
            for child in _successors(graph, node):
                if child in members and child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    backwards = [start]
    node = previous[start]
    while node != start:
        backwards.append(node)
        node = previous[node]
    return [start, *reversed(backwards[1:]), start]


def find_cycles(graph: Graph) -> list[list[str]]:
    """One cycle ``[a, b, ..., a]`` per strongly connected component of more than one module."""
    return [shortest_cycle(graph, component) for component in cyclic_components(graph)]


def describe(component: list[str], graph: dict[str, dict[str, int]], modules: dict[str, Path]) -> str:
    """A cycle of the component and where each of its imports is written."""
    cycle = shortest_cycle(graph, component)
    steps = [f"{a} imports {b} at {modules[a].relative_to(ROOT)}:{graph[a][b]}" for a, b in zip(cycle, cycle[1:])]
    members = f" (the cycle's component: {', '.join(component)})" if len(component) + 1 > len(cycle) else ""
    return " -> ".join(cycle) + members + "\n    " + "\n    ".join(steps)


@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    return find_modules(ROOT, PACKAGES)


@pytest.fixture(scope="module")
def graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    return build_graph(modules)


# --------------------------------------------------------------------------- the cycle finder itself


def test_cycle_finder_on_a_synthetic_graph() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}, "g": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) == []
    chain = {f"m{i:04d}": {f"m{i + 1:04d}"} for i in range(3000)}  # deeper than the recursion limit
    chain["m3000"] = {"m0000"}
    assert len(find_cycles(chain)[0]) == 3002


def test_deferred_type_checking_and_from_package_imports_make_cycles(tmp_path: Path) -> None:
    """A cycle made only of imports inside functions, under TYPE_CHECKING, or `from pkg import submodule` is found."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "import pkg.b\nfrom pkg import c\n",
        # deferred relative import back to a
        "b.py": "def f():\n    from . import a\n    return a\n",
        # TYPE_CHECKING-only import back to a, by name from the module
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import X\n",
        "d.py": "import importlib\n\ndef g():\n    return importlib.import_module('pkg.sub.e')\n",
        "sub/__init__.py": "",
        # two levels up, then down again: pkg.sub.e -> pkg.d -> pkg.sub.e
        "sub/e.py": "def h():\n    from ..d import g\n    return g\n",
        "acyclic.py": "from pkg.sub import e\nimport json\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(textwrap.dedent(text))
    modules = find_modules(tmp_path, ("pkg",))
    assert set(modules) == {"pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d", "pkg.sub", "pkg.sub.e", "pkg.acyclic"}
    graph = build_graph(modules)
    assert graph["pkg.a"] == {"pkg.b": 1, "pkg.c": 2}
    assert graph["pkg.acyclic"] == {"pkg.sub.e": 1}
    # a, b and c form one strongly connected component; its shortest cycle through a is reported
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.d", "pkg.sub.e", "pkg.d"]]
    del graph["pkg.b"]["pkg.a"]  # the TYPE_CHECKING-only cycle alone is still one
    assert find_cycles(graph)[0] == ["pkg.a", "pkg.c", "pkg.a"]


# --------------------------------------------------------------------------- the project's layers


def test_the_project_modules_are_found(modules: dict[str, Path]) -> None:
    assert {"dynamics", "dynamics.cli", "dynamics.spectra", "trainer.train", "trainer.errors"} <= set(modules)
    assert MATHS_CORE <= set(modules), sorted(MATHS_CORE - set(modules))


def test_no_import_cycles_between_project_modules(graph: dict[str, dict[str, int]], modules: dict[str, Path]) -> None:
    components = cyclic_components(graph)
    assert not components, "import cycles (deferred imports included):\n" + "\n".join(
        describe(c, graph, modules) for c in components
    )


def test_maths_core_imports_only_torch_numpy_stdlib_and_itself(modules: dict[str, Path]) -> None:
    known = set(modules)
    allowed = set(sys.stdlib_module_names) | CORE_THIRD_PARTY
    bad = []
    for module in sorted(MATHS_CORE):
        for imp in imports_of(module, modules[module], known):
            target = project_module(imp.module, known)
            if target is not None:
                ok = target in MATHS_CORE
            else:
                ok = imp.module.split(".")[0] in allowed
            if not ok:
                bad.append(f"{module} (line {imp.line}) imports {imp.module}")
    assert not bad, "the maths core imports beyond torch/numpy/stdlib/the core:\n" + "\n".join(bad)


def test_no_module_imports_a_private_name_of_another(modules: dict[str, Path]) -> None:
    """``from .spectra import _svdvals``-style reaches are refused: shared helpers live in a (private) module of their own."""
    known = set(modules)
    bad = []
    for module, path in sorted(modules.items()):
        for imp in imports_of(module, path, known):
            if project_module(imp.module, known) is None:
                continue
            private = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
            if private:
                bad.append(f"{module} (line {imp.line}) imports {private} from {imp.module}")
    assert not bad, "\n".join(bad)


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for a chain of attribute reads on a plain name, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return None if head is None else f"{head}.{node.attr}"
    return None


def private_attribute_reads(module: str, path: Path, known: set[str]) -> list[str]:
    """``alias._name`` reads where ``alias`` is bound by an import to another project module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bound: dict[str, str] = {}  # local name -> absolute dotted name it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    bound[top] = top
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(module, path, node.level, node.module) if node.level else (node.module or "")
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    bound[alias.asname or alias.name] = f"{base}.{alias.name}"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = _dotted(node.value)
            if owner is None:
                continue
            head, _, rest = owner.partition(".")
            if head not in bound:
                continue
            target = ".".join(filter(None, (bound[head], rest)))
            if target in known and target != module:
                found.append(f"{module} (line {node.lineno}) reads {target}.{node.attr}")
    return found


def test_no_module_reads_a_private_name_of_another_through_its_module(modules: dict[str, Path]) -> None:
    """``from . import metrics as _m; _m._out(...)`` is the same reach as importing ``_out``."""
    known = set(modules)
    bad = [line for module, path in sorted(modules.items()) for line in private_attribute_reads(module, path, known)]
    assert not bad, "\n".join(bad)


def test_trainer_never_imports_dynamics(graph: dict[str, dict[str, int]], modules: dict[str, Path]) -> None:
    bad = [
        f"{m} (line {line}) imports {t}"
        for m, edges in sorted(graph.items())
        if m.split(".")[0] == "trainer"
        for t, line in sorted(edges.items())
        if t.split(".")[0] == "dynamics"
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", TORCH_FREE)
def test_run_format_modules_do_not_import_torch(module: str) -> None:
    code = f"import sys, {module}; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False"], f"importing {module} loads torch"
