"""The import structure of gmim_hub: no cycle between modules, layers import downward only, and no import is
deferred into a function to hide a cycle.

Every module of the package is parsed with `ast` (nothing is imported), and every import of a gmim_hub module is an
edge: module level, inside functions, and under `if TYPE_CHECKING:` (a type-only cycle is still a cycle for a
reader, and breaks the day the annotation is evaluated). The lazy-attribute tables of package `__init__` files
(`_LAZY` / `_WHERE`: name -> module) count as imports too. Importing `a.b.c` also runs the `__init__` of every
package above it that the importer is not already inside, so those count as edges as well.

The layers, lowest first (a module may import its own layer and the ones below it, never one above):

0. base: models/, masking/, method (with _entropy, _token_masks), losses, config, presets, errors, atomic, malloc, _version,
   and hub/ (weights on disk and on the Hub:
   models/hub_models builds on it)
1. data: data/, intensity (intensity references and checks of volumes)
2. engine: engine/ (pre-training, fine-tuning, evaluation, checkpoints)
3. inference/, export/ (export never imports inference: inference runs exports)
4. serving/ (Triton repository, server, client)
5. demo, demo_context, demo_serving (`gmim demo`: the end-to-end story, built from every layer below)
6. cli/ (the `gmim` command)
7. the package root `gmim_hub/__init__` (the public API: it re-exports from any layer, so no module may import it;
   the version lives in gmim_hub/_version.py)

Allowed lazy imports. An import inside a function is allowed only when it keeps a third-party package out of the
importer's start-up: the imported module (with what it imports at module level) brings a third-party package that
the importer does not already import. That is how `gmim --help` and `gmim serve --help` stay free of torch and
MONAI (tests/test_startup.py), and how optional extras (OpenVINO, Triton's client) stay optional. A deferred import
that defers nothing but gmim_hub's own code could only be there to dodge a cycle, and is refused: move it to the top.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "gmim_hub"
PACKAGE = "gmim_hub"

LAYERS: list[tuple[str, ...]] = [
    ("models", "masking", "method", "_entropy", "_token_masks", "losses", "config", "presets", "errors", "atomic",
     "_version", "hub", "malloc"),
    ("data", "intensity"),
    ("engine",),
    ("inference", "export"),
    ("serving",),
    ("demo", "demo_context", "demo_serving"),
    ("cli",),
]

# Edges that are known to break the rules, each with the reason and who removes it. Nothing else may be added here.
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {
}

# importlib.import_module with a name built at run time: only where a static import would cost start-up time.
STRING_IMPORTS_ALLOWED = {
    "gmim_hub": "the public names GMIMForPretraining / GMIMForSegmentation import torch and MONAI on first use",
    "gmim_hub.inference": "its public names import torch and MONAI on first use",
    "gmim_hub.serving": "its server and client import numpy and torch (tritonclient inside) on first use",
}


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    top: set[str] = field(default_factory=set)  # gmim_hub modules imported at module level, run at import
    typing: set[str] = field(default_factory=set)  # under `if TYPE_CHECKING:`
    lazy: dict[str, int] = field(default_factory=dict)  # imported inside a function -> line
    deferred: list[tuple[int, set[str]]] = field(default_factory=list)  # each deferred import: (line, modules)
    third_party: set[str] = field(default_factory=set)  # top-level names of third-party packages, module level
    string_imports: list[int] = field(default_factory=list)  # lines calling importlib.import_module

    @property
    def all_edges(self) -> set[str]:
        return self.top | self.typing | set(self.lazy)


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


@cache
def modules() -> dict[str, Module]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        name, is_package = _module_name(path)
        found[name] = Module(name, path, is_package)
    for mod in found.values():
        _collect(mod, found)
    return found


def _resolve(name: str, known: dict[str, Module]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _targets(importer: Module, imported: str, known: dict[str, Module]) -> set[str]:
    """The modules `import imported` runs, seen from `importer`: the module and each package `__init__` above it
    that the importer is not already inside (the root package's is always running already)."""
    target = _resolve(imported, known)
    if target is None:
        return set()
    out = {target}
    parts = target.split(".")
    for i in range(2, len(parts)):
        package = ".".join(parts[:i])
        if not (importer.name == package or importer.name.startswith(package + ".")):
            out.add(package)
    return out - {importer.name}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _collect(mod: Module, known: dict[str, Module]) -> None:
    tree = ast.parse(mod.path.read_text(), filename=str(mod.path))
    package = mod.name if mod.is_package else mod.name.rpartition(".")[0]

    def names_of(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            where = ".".join(base + ([node.module] if node.module else []))
        else:
            where = node.module or ""
        # `from pkg import sub` imports the submodule pkg.sub when there is one
        return [f"{where}.{a.name}" if f"{where}.{a.name}" in known else where for a in node.names]

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            kind = where
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                kind = "lazy"
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit_stmt(stmt, "typing" if where == "top" else where)
                for stmt in child.orelse:
                    visit_stmt(stmt, where)
                continue
            visit_stmt(child, kind)

    def visit_stmt(node: ast.AST, kind: str) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for imported in names_of(node):
                root = imported.split(".")[0]
                if root == PACKAGE:
                    if kind == "lazy":
                        mod.deferred.append((node.lineno, _targets(mod, imported, known)))
                    for target in _targets(mod, imported, known):
                        if kind == "top":
                            mod.top.add(target)
                        elif kind == "typing":
                            mod.typing.add(target)
                        else:
                            mod.lazy.setdefault(target, node.lineno)
                elif kind == "top" and root and root not in sys.stdlib_module_names and root != "__future__":
                    mod.third_party.add(root)
        elif isinstance(node, ast.Call) and _is_import_module(node.func):
            mod.string_imports.append(node.lineno)
        elif kind == "top" and mod.is_package and isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            # a lazy-attribute table: {"Name": "module"}; its modules are imported on first use
            for value in node.value.values:
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    for candidate in (value.value, f"{mod.name}.{value.value}"):
                        if candidate in known and candidate != mod.name:
                            mod.lazy.setdefault(candidate, node.lineno)
                            mod.deferred.append((node.lineno, {candidate}))
        visit(node, kind)

    visit(tree, "top")


def _is_import_module(func: ast.expr) -> bool:
    return isinstance(func, ast.Attribute) and func.attr == "import_module" and isinstance(func.value, ast.Name) \
        and func.value.id == "importlib"


def graph() -> dict[str, set[str]]:
    return {name: {t for t in mod.all_edges if (name, t) not in KNOWN_EXCEPTIONS}
            for name, mod in modules().items()}


def layer_of(name: str) -> int:
    if name == PACKAGE:
        return len(LAYERS)
    first = name.split(".")[1]
    for i, members in enumerate(LAYERS):
        if first in members:
            return i
    raise AssertionError(f"{name} is in no layer: add its top-level name to LAYERS (and to CONTRIBUTING.md)")


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return out


@cache
def _runtime_third_party(name: str) -> frozenset[str]:
    """Third-party packages importing `name` brings in, through module-level imports only."""
    seen: set[str] = set()
    todo = [name]
    found: set[str] = set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        mod = modules()[current]
        found |= mod.third_party
        todo.extend(mod.top)
    return frozenset(found)


def test_the_parser_sees_every_kind_of_import():
    """The checks below mean something only if the parser finds module-level, type-only and deferred imports."""
    mods = modules()
    assert len(mods) > 60
    assert "gmim_hub.config" in mods["gmim_hub.engine.pretrain"].top
    assert "gmim_hub.models.hub_models" in mods["gmim_hub.engine.pretrain"].typing
    assert "gmim_hub.engine.pretrain" in mods["gmim_hub.cli.pretrain"].lazy
    assert "gmim_hub.hub.pretrained" in mods["gmim_hub"].lazy  # the root's lazy-attribute table
    assert {"torch", "monai"} <= _runtime_third_party("gmim_hub.models.hub_models")
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_between_modules():
    cycles = _cycles(graph())
    assert not cycles, "import cycles (type-only and deferred imports included): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_layers_import_downward_only():
    wrong = []
    for name, targets in graph().items():
        for target in sorted(targets):
            if layer_of(target) > layer_of(name):
                wrong.append(f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})")
    assert not wrong, "imports going up a layer:\n" + "\n".join(wrong)


def test_export_does_not_import_inference():
    """Inference runs exports (onnxruntime, OpenVINO); an export never needs the inference code."""
    wrong = [f"{n} imports {t}" for n, targets in graph().items() if n.startswith("gmim_hub.export")
             for t in targets if t.startswith("gmim_hub.inference")]
    assert not wrong, wrong


def test_deferred_imports_defer_a_third_party_package():
    """An import inside a function must keep some third-party package (torch, MONAI, an optional extra) out of the
    importer's start-up; otherwise it can only be there to dodge a cycle: move it to the top of the module."""
    useless = []
    for name, mod in modules().items():
        mine = _runtime_third_party(name)
        for line, targets in mod.deferred:
            targets = {t for t in targets if (name, t) not in KNOWN_EXCEPTIONS and t not in mod.top}
            if targets and not set().union(*map(_runtime_third_party, targets)) - mine:
                useless.append(f"{mod.path.relative_to(ROOT.parent)}:{line} imports {', '.join(sorted(targets))} "
                               "inside a function, which defers no third-party package")
    assert not useless, "\n".join(useless)


def test_no_command_or_module_is_imported_by_a_string():
    found = [f"{mod.path.relative_to(ROOT.parent)}:{line}" for name, mod in modules().items()
             for line in mod.string_imports if name not in STRING_IMPORTS_ALLOWED]
    assert not found, f"importlib.import_module outside the lazy package attributes: {found}"


def test_known_exceptions_are_still_needed():
    """An exception that no longer matches an import is removed from KNOWN_EXCEPTIONS."""
    mods = modules()
    stale = [edge for edge in KNOWN_EXCEPTIONS if edge[1] not in mods[edge[0]].all_edges]
    assert not stale, stale
