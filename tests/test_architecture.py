"""The package layers point one way, read from the source with `ast` (nothing is imported).

    lora, nn          the engine and the torch building blocks: nothing else from lorakit
    data -> models    data knows no model; models know no training loop
    train             the loops and the figures they report (lorakit.train.metrics)
    recipes           each recipe chains the parts below
    api, cli, serve   the shells

Every import counts, the ones inside functions too: a function-level import hides a dependency
from the reader but not from the interpreter. `from package import name` counts as an import of
the module that defines `name` when the package's `__init__` only re-exports it, so a package
whose `__init__` gathers its submodules' names is not a cycle with each of them.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "lorakit"

# layer -> the packages it must not import
FORBIDDEN = {
    "lorakit.data": ("lorakit.models", "lorakit.train", "lorakit.recipes", "lorakit.api",
                     "lorakit.cli", "lorakit.serve"),
    "lorakit.models": ("lorakit.train", "lorakit.recipes", "lorakit.api", "lorakit.cli",
                       "lorakit.serve"),
    "lorakit.lora": ("lorakit.train", "lorakit.recipes", "lorakit.api", "lorakit.cli",
                     "lorakit.serve"),
    "lorakit.train": ("lorakit.recipes", "lorakit.api", "lorakit.cli", "lorakit.serve"),
    "lorakit.recipes": ("lorakit.api", "lorakit.cli", "lorakit.serve"),
    "lorakit.api": ("lorakit.cli", "lorakit.serve"),
}  # fmt: skip
SELF_CONTAINED = ("lorakit.lora", "lorakit.nn")  # import nothing else from lorakit


@dataclass(frozen=True)
class Import:
    importer: str  # the module whose source holds the import
    target: str  # the lorakit module it loads (a re-exported name: the module defining it)
    named: str  # the module the statement names
    name: str | None  # the name taken from it (`from named import name`), None for a module
    line: int
    in_function: bool

    def __str__(self) -> str:
        what = f"from {self.named} import {self.name}" if self.name else f"import {self.named}"
        where = "in a function" if self.in_function else "at module level"
        return f"{self.importer}:{self.line} {what} ({where})"


@cache
def module_files() -> dict[str, Path]:
    """Every lorakit module under src/, by dotted name (a package by its own name)."""
    modules = {}
    for path in sorted((SRC / ROOT).rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def is_package(module: str) -> bool:
    return module_files()[module].name == "__init__.py"


def package_of(module: str) -> str:
    return module if is_package(module) else module.rpartition(".")[0]


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@cache
def tree(module: str) -> ast.Module:
    return ast.parse(module_files()[module].read_text(encoding="utf-8"))


def base_of(module: str, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` statement names."""
    if not node.level:
        return node.module or ""
    parts = package_of(module).split(".")
    parts = parts[: len(parts) - node.level + 1]
    return ".".join(parts + ([node.module] if node.module else []))


@cache
def reexports(package: str) -> dict[str, str]:
    """Names a package's `__init__` takes from other modules at its top: name -> defining module."""
    found: dict[str, str] = {}
    for node in tree(package).body:
        if isinstance(node, ast.ImportFrom):
            base = base_of(package, node)
            for alias in node.names:
                found[alias.asname or alias.name] = source_of(base, alias.name)
        elif lazy := lazy_exports(node):  # PEP 562: `_EXPORTS = {submodule: (names, ...)}`
            for submodule, names in lazy.items():
                found.update({name: source_of(f"{package}.{submodule}", name) for name in names})
        elif engine_api := lazy_exports(node, "_ENGINE_API"):  # lorakit's: the engine's names
            found.update({name: source_of("lorakit.lora", name) for name in engine_api})
    return found


def lazy_exports(node: ast.stmt, variable: str = "_EXPORTS"):
    """The literal value of a top-level `variable = ...` in a package's `__init__`, if any."""
    if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [
        variable
    ]:
        return ast.literal_eval(node.value)
    return None


def source_of(base: str, name: str) -> str:
    """The module that `from base import name` loads: a submodule, or the module defining name."""
    if f"{base}.{name}" in module_files():
        return f"{base}.{name}"
    if base in module_files() and is_package(base):
        return reexports(base).get(name, base)
    return base


def imports_of(module: str) -> list[Import]:
    """Every import of a lorakit module in `module`, at module level or in a function."""
    found = []
    in_function: set[ast.AST] = set()
    type_only: set[ast.AST] = set()  # under `if TYPE_CHECKING:`: never run, so no dependency
    for node in ast.walk(tree(module)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function.update(n for n in ast.walk(node) if n is not node)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            type_only.update(n for n in ast.walk(node) if n is not node)
    for node in ast.walk(tree(module)):
        if node in type_only:
            continue
        nested = node in in_function
        if isinstance(node, ast.Import):
            for alias in node.names:
                if within(alias.name, ROOT):
                    target = longest_module_prefix(alias.name)
                    found.append(Import(module, target, alias.name, None, node.lineno, nested))
        elif isinstance(node, ast.ImportFrom):
            base = base_of(module, node)
            if not within(base, ROOT):
                continue
            for alias in node.names:
                target = source_of(base, alias.name)
                name = None if target == f"{base}.{alias.name}" else alias.name
                found.append(Import(module, target, base, name, node.lineno, nested))
    return found


def longest_module_prefix(dotted: str) -> str:
    parts = dotted.split(".")
    while ".".join(parts) not in module_files():
        parts.pop()
    return ".".join(parts)


def all_imports() -> list[Import]:
    return [imp for module in module_files() for imp in imports_of(module)]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(edges.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(edges):
        if node not in index:
            visit(node)
    return components


# ---------------------------------------------------------------- the rules
def test_the_reader_sees_every_module_and_resolves_reexports():
    modules = module_files()
    assert {"lorakit", "lorakit.lora", "lorakit.lora.layers", "lorakit.train.metrics"} <= set(
        modules
    )
    assert source_of("lorakit.lora", "inject") == "lorakit.lora.model"
    assert source_of("lorakit", "lora") == "lorakit.lora"
    relative = [i for i in imports_of("lorakit.lora.model") if i.target == "lorakit.lora.layers"]
    assert relative, "relative imports are resolved"


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_lower_layers_never_import_higher_ones(layer):
    wrong = [
        str(imp)
        for imp in all_imports()
        if within(imp.importer, layer)
        and any(within(imp.target, above) or within(imp.named, above) for above in FORBIDDEN[layer])
    ]
    assert not wrong, f"{layer} imports from a layer above it:\n" + "\n".join(wrong)


@pytest.mark.parametrize("package", SELF_CONTAINED)
def test_self_contained_packages_import_nothing_else_from_lorakit(package):
    wrong = [
        str(imp)
        for imp in all_imports()
        if within(imp.importer, package)
        and not (within(imp.target, package) and within(imp.named, package))
    ]
    assert not wrong, f"{package} imports from the rest of lorakit:\n" + "\n".join(wrong)


def test_no_import_cycles():
    edges: dict[str, set[str]] = {}
    for imp in all_imports():
        if imp.target != imp.importer:
            edges.setdefault(imp.importer, set()).add(imp.target)
    found = cycles(edges)
    described = []
    for component in found:
        members = set(component)
        inside = [
            str(imp)
            for imp in all_imports()
            if imp.importer in members and imp.target in members and imp.target != imp.importer
        ]
        described.append(" <-> ".join(component) + "\n    " + "\n    ".join(inside))
    assert not found, "import cycles:\n" + "\n".join(described)


def test_no_private_name_is_imported_across_packages():
    wrong = []
    for imp in all_imports():
        names = [imp.name] if imp.name else imp.target.split(".")
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if private and package_of(imp.importer) != package_of(imp.named):
            wrong.append(str(imp))
    assert not wrong, "private names imported from another package:\n" + "\n".join(wrong)
