"""The project's import graph: no cycles, no private names across packages, no upward imports.

Every module under ``qmath_megatron/`` is parsed with ``ast``; every import of the project's
own modules counts, the ones inside functions included (only a script's ``if __name__ ==
"__main__":`` block is left out: it never runs on import). The layers, what each package
may import and which modules belong to the command line come from the package table of
``docs/architecture.md``: the table is the one place the layering is written down, and this
test fails when the code and the table disagree in either direction.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "qmath_megatron"
ARCHITECTURE_DOC = ROOT / "docs" / "architecture.md"
# Third-party libraries whose import costs seconds (or needs a GPU stack). A project module
# that loads one when imported (at its top, or through a project module it imports at its
# top) is "heavy" for that library; a function may import a project module only when that
# loads a heavy library the importing module does not (so that `qmath` and light modules
# do not pay for it: e.g. sft/rft.py, whose config gives `qmath data rft --help` its flags,
# imports the torch-importing engine builder where it runs; a module that imports torch
# imports the Megatron-importing reward model in its worker processes only).
HEAVY_LIBRARIES = {"megatron", "torch", "transformer_engine", "vllm", "transformers"}
# Packages (or single modules) whose modules import the project's modules at the top only:
# a function-level import of a project module there must load a heavy library (above)
# the importing module does not. A package's `cli.py` is exempt (the command line defers
# its implementation modules).
TOP_LEVEL_IMPORTS_ONLY = (
    "checkpoint",
    "convert",
    "curation",
    "data",
    "evaluation",
    "models",
    "parallel",
    "pretrain",
    "reward_model",
    "rewards",
    "rl",
    "sandbox",
    "sft",
    "tokenizer",
    "training",
    "utils",
)


@dataclass(frozen=True)
class Import:
    source: str  # importing module, e.g. "qmath_megatron.training.loop"
    target: str  # imported module (a package's __init__ is the package's name)
    names: tuple[str, ...]  # names taken from `target` (`from target import a, b`)
    line: int
    in_function: bool
    type_checking: bool  # under `if TYPE_CHECKING:` (never executed)

    def where(self) -> str:
        return f"{self.source} (line {self.line}) -> {self.target}"


@dataclass(frozen=True)
class Row:
    layer: int
    package: str
    may_import: frozenset[str] | None  # None: any package of a lower layer


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def package_of(module: str) -> str:
    """``qmath_megatron.training.loop`` -> ``training``; a top-level module is its own
    package (``qmath_megatron.demo`` -> ``demo``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else PACKAGE


# The functions through which `qmath_megatron/cli.py` lets a module add its subcommands.
REGISTER_FUNCTIONS = {"register", "register_data"}


def is_cli_module(module: str, cli_packages: set[str]) -> bool:
    """Every module of a command-line package, and a package's ``cli.py`` that registers
    ``qmath`` subcommands (defines ``register`` or ``register_data``; ``config/cli.py``,
    the library commands build their flags with, does not)."""
    if package_of(module) in cli_packages:
        return True
    return module.rsplit(".", 1)[-1] == "cli" and bool(
        _top_level_functions(module) & REGISTER_FUNCTIONS
    )


@cache
def _top_level_functions(module: str) -> set[str]:
    tree = ast.parse(modules()[module].read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


def _is_main_guard(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


@cache
def imports() -> list[Import]:
    """Every import of a project module, by every project module."""
    return [imp for module, path in modules().items() for imp in _imports_of(module, path)]


def _imports_of(module: str, path: Path) -> list[Import]:
    known = modules()
    found: list[Import] = []
    # (node, inside a function, under `if TYPE_CHECKING:`)
    stack: list[tuple[ast.AST, bool, bool]] = [
        (ast.parse(path.read_text(), str(path)), False, False)
    ]
    while stack:
        node, in_function, type_checking = stack.pop()
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    found.append(
                        Import(module, alias.name, (), node.lineno, in_function, type_checking)
                    )
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                anchor = module.split(".")
                keep = len(anchor) - node.level + (path.name == "__init__.py")
                base = ".".join(anchor[:keep] + ([base] if base else []))
            if base.split(".")[0] != PACKAGE:
                continue
            names = []
            for alias in node.names:
                if f"{base}.{alias.name}" in known:  # `from package import module`
                    target = f"{base}.{alias.name}"
                    found.append(
                        Import(module, target, (), node.lineno, in_function, type_checking)
                    )
                else:
                    names.append(alias.name)
            if names:
                found.append(
                    Import(module, base, tuple(names), node.lineno, in_function, type_checking)
                )
        for child in ast.iter_child_nodes(node):
            if _is_main_guard(child):
                continue
            function = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            stack.append(
                (child, in_function or function, type_checking or _is_type_checking(child))
            )
    return found


@cache
def package_table() -> dict[str, Row]:
    """The package table of docs/architecture.md: ``| layer | package | owns | may import |``;
    package names in backticks, ``may import`` a comma-separated list of backticked
    packages, ``-`` for none or ``any lower layer``."""
    rows: dict[str, Row] = {}
    header_seen = False
    for line in ARCHITECTURE_DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.lstrip().startswith("|") or len(cells) != 4:
            if header_seen and rows:
                break  # the end of the table
            continue
        if [c.lower() for c in cells] == ["layer", "package", "owns", "may import"]:
            header_seen = True
            continue
        if not header_seen or set(cells[0]) <= {"-", ":", " "}:
            continue
        (package,) = re.findall(r"`([^`]+)`", cells[1])
        package = package.strip("/").removesuffix(".py")
        if cells[3] == "any lower layer":
            allowed = None
        elif cells[3] == "-":
            allowed = frozenset()
        else:
            allowed = frozenset(
                p.strip("/").removesuffix(".py") for p in re.findall(r"`([^`]+)`", cells[3])
            )
        assert package not in rows, f"{package} has two rows in {ARCHITECTURE_DOC.name}"
        rows[package] = Row(int(cells[0]), package, allowed)
    assert rows, f"no `| layer | package | owns | may import |` table in {ARCHITECTURE_DOC}"
    return rows


def cli_packages() -> set[str]:
    """The packages of the top layer: the command line."""
    table = package_table()
    top = max(r.layer for r in table.values())
    return {p for p, r in table.items() if r.layer == top}


@cache
def heavy_libraries() -> dict[str, frozenset[str]]:
    """Per project module, the heavy libraries importing it loads: the ones it imports at
    module level, directly or through another project module it imports at module level."""
    heavy = {m: set(_heavy_imports_at_top(path)) for m, path in modules().items()}
    top_level = defaultdict(set)
    for imp in imports():
        if not imp.in_function and not imp.type_checking:
            top_level[imp.source].add(imp.target)
    changed = True
    while changed:
        changed = False
        for module, targets in top_level.items():
            for target in targets:
                if not heavy[target] <= heavy[module]:
                    heavy[module] |= heavy[target]
                    changed = True
    return {m: frozenset(libraries) for m, libraries in heavy.items()}


def _heavy_imports_at_top(path: Path) -> set[str]:
    """The heavy libraries imported outside functions (class bodies included)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if _is_type_checking(node) or _is_main_guard(node):
            continue
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names} & HEAVY_LIBRARIES
        elif isinstance(node, ast.ImportFrom):
            if node.module and not node.level and node.module.split(".")[0] in HEAVY_LIBRARIES:
                found.add(node.module.split(".")[0])
        else:
            stack.extend(ast.iter_child_nodes(node))
    return found


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a
    cycle through its modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
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
                components.append(component)

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return [_cycle_through(sorted(c), edges) for c in components]


def _cycle_through(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """A concrete cycle inside a strongly connected component (breadth-first back to the
    start), for the failure message."""
    inside = set(component)
    start = component[0]
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(edges.get(v, set()) & inside):
            if w == start:
                return [*paths[v], start]
            if w not in paths:
                paths[w] = [*paths[v], w]
                queue.append(w)
    return component


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


# --------------------------------------------------------------------------- the tests


def test_no_import_cycles():
    """No module imports itself through other modules, whether the imports are at the top
    of a file or inside functions (``if TYPE_CHECKING:`` imports never run: left out)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for imp in imports():
        if imp.source != imp.target and not imp.type_checking:
            edges[imp.source].add(imp.target)
    cycles = find_cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_private_names_across_packages():
    """A ``_name`` (or a ``_module``) of another package is never imported; what a package
    offers to others is public. Attribute access through an imported module counts too."""
    bad = []
    known = modules()
    for imp in imports():
        if package_of(imp.source) == package_of(imp.target):
            continue
        private = [n for n in imp.names if _private(n)]
        if any(_private(part) for part in imp.target.split(".")):
            private.append(imp.target)
        bad += [f"{imp.where()}: {name}" for name in private]
    for module, path in known.items():
        aliases: dict[str, str] = {}
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    if f"{node.module}.{alias.name}" in known:
                        aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname and alias.name in known:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and _private(node.attr)
                and package_of(aliases[node.value.id]) != package_of(module)
            ):
                bad.append(f"{module} (line {node.lineno}): {aliases[node.value.id]}.{node.attr}")
    assert not bad, "private names imported across packages:\n" + "\n".join(sorted(bad))


def test_the_package_table_lists_exactly_the_packages_and_layers_go_down():
    """docs/architecture.md has one row per package (and top-level module) and every
    package it allows a package to import sits in a lower layer."""
    table = package_table()
    on_disk = {package_of(m) for m in modules() if m != PACKAGE}
    assert set(table) == on_disk, (
        f"packages without a row in {ARCHITECTURE_DOC.name}: {sorted(on_disk - set(table))}; "
        f"rows without a package: {sorted(set(table) - on_disk)}"
    )
    upward = [
        f"{row.package} (layer {row.layer}) may import {dep} (layer {table[dep].layer})"
        for row in table.values()
        for dep in sorted(row.may_import or ())
        if dep not in table or table[dep].layer >= row.layer
    ]
    assert not upward, "the table allows imports that do not go down:\n" + "\n".join(upward)


def test_packages_import_only_what_the_table_allows():
    """Every import between two packages is one the table allows (a package's ``cli.py``
    belongs to the command-line layer, which may import any package); nothing below the
    command line imports a command-line module; and every allowed import is used, so the
    table shows the real graph."""
    table = package_table()
    cli = cli_packages()
    bad, used = [], defaultdict(set)
    for imp in imports():
        src, dst = package_of(imp.source), package_of(imp.target)
        source_is_cli = is_cli_module(imp.source, cli)
        if is_cli_module(imp.target, cli) and not source_is_cli:
            bad.append(f"{imp.where()}: imports a command-line module")
        if src == dst or source_is_cli:  # the command line is the top layer
            continue
        allowed = table[src].may_import if src in table else frozenset()
        if allowed is not None and dst not in allowed:
            bad.append(f"{imp.where()}: {src} may not import {dst} (docs/architecture.md)")
        used[src].add(dst)
    assert not bad, "imports the layering forbids:\n" + "\n".join(bad)
    unused = [
        f"{row.package} may import {dep}, but does not"
        for row in table.values()
        for dep in sorted((row.may_import or frozenset()) - used[row.package])
    ]
    assert not unused, f"{ARCHITECTURE_DOC.name} allows imports nobody makes:\n" + "\n".join(unused)


@pytest.mark.parametrize("scope", TOP_LEVEL_IMPORTS_ONLY)
def test_project_imports_are_at_the_top(scope):
    """In these packages the project's own imports are at the top of each file (an import
    graph a reader sees); the one exception is a module that loads a heavy library (torch,
    Megatron, TE, vLLM or transformers at module level) the importing module does not,
    which a function may import when it needs it, and a ``cli.py``, which defers its
    implementation modules so that ``qmath`` starts fast."""
    prefix = f"{PACKAGE}.{scope}"
    in_scope = [m for m in modules() if m == prefix or m.startswith(prefix + ".")]
    assert in_scope, f"{scope} names no module"
    heavy = heavy_libraries()
    lazy = [
        f"{imp.where()}"
        for imp in imports()
        if imp.in_function
        and imp.source in in_scope
        and not is_cli_module(imp.source, cli_packages())
        and heavy[imp.target] <= heavy[imp.source]
    ]
    assert not lazy, "project imports inside functions:\n" + "\n".join(lazy)
