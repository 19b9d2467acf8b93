"""The package's shape, as docs/architecture.md draws it, checked from the source (AST, no imports):

* every import of a qdc_export unit (a stage package or a top-level module) by another is one the layer table
  below allows (lazy imports inside functions count too), so no import circle can form between units;
* no import circle between modules either;
* every module is under 400 lines, or named in LONG_MODULES with its reason;
* precision names ("w8a8", "w4a4", ...) appear as string constants only in qdc_export/precision.py (the one
  parser) and in user-facing text (help, messages, docstrings), never in comparisons;
* every function annotated to return a PassResult returns exactly that (no tuples), and PassResult is built only
  by passes, so a stage cannot smuggle a second return value past the pass log.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "qdc_export"
ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"

# unit -> the units it may import. Mirrors the table in docs/architecture.md (test_doc_lists_every_unit).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "metrics": set(),
    "manifest": {"errors"},
    "passes": {"errors"},
    "precision": {"errors"},
    "sampling": {"errors"},
    "infra": {"errors", "manifest"},
    "load": {"errors"},
    "engines": {"errors", "load", "manifest"},
    "config": {"errors", "precision", "engines"},
    "capture": {"load"},
    "quantize": {"errors", "passes", "precision", "sampling", "infra", "load", "config", "capture"},
    "compensation": {"errors", "passes", "sampling", "metrics", "manifest", "load", "config", "quantize"},
    "export": {"errors", "infra", "quantize"},
    "check": {"errors", "metrics", "manifest", "precision", "sampling", "infra", "load", "engines", "config",
              "quantize", "compensation"},
    "serving": {"errors", "manifest", "load", "engines", "compensation"},
    "report": {"errors", "metrics", "manifest", "precision", "sampling", "infra", "load", "engines", "config",
               "quantize", "compensation", "export", "check"},
    "build": {"__init__", "errors", "manifest", "passes", "precision", "sampling", "infra", "load", "engines",
              "config", "quantize", "compensation", "export", "check", "report"},
    "cli": {"errors", "precision", "config", "build", "check", "report", "serving"},
    "__init__": set(),
}
MAX_LINES = 400
LONG_MODULES: dict[str, str] = {}  # "path/in/package.py": "why it is longer"
PRECISION_NAMES = {"fp32", "w8a8", "w4a16", "w4a8", "w4a4"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path, modules: dict[str, Path], top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qdc_export"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("qdc_export"))
    return {m for m in found if m in modules or _unit(m) in ALLOWED}


def test_units_import_only_what_their_layer_allows():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        unit = _unit(name)
        assert unit in ALLOWED, f"{name}: unit {unit!r} is not in the layer table (add it here and to the doc)"
        for imported in _imports(path, modules, top_level_only=False):
            other = _unit(imported)
            if other != unit and other not in ALLOWED[unit]:
                bad.append(f"{name} imports {imported} ({unit} -> {other})")
    assert not bad, "imports the layer table does not allow:\n" + "\n".join(bad)


def test_layer_table_has_no_cycle():
    seen: dict[str, int] = {}

    def visit(unit: str, stack: tuple[str, ...]) -> None:
        assert unit not in stack, f"cycle in the layer table: {' -> '.join(stack + (unit,))}"
        if seen.get(unit):
            return
        for dep in ALLOWED[unit]:
            visit(dep, stack + (unit,))
        seen[unit] = 1

    for unit in ALLOWED:
        visit(unit, ())


def test_no_import_cycle_between_modules():
    modules = _modules()
    graph = {name: {m for m in _imports(path, modules, top_level_only=False) if m in modules and m != name
                    and not name.startswith(m + ".")}  # a submodule importing its own package's __init__
             for name, path in modules.items()}
    state: dict[str, str] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in graph[node]:
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_modules_are_short_or_say_why():
    long = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        lines = len(path.read_text().splitlines())
        if lines >= MAX_LINES and rel not in LONG_MODULES:
            long[rel] = lines
    assert not long, f"modules of {MAX_LINES}+ lines with no reason in LONG_MODULES: {long}"
    stale = [rel for rel in LONG_MODULES if len((PACKAGE / rel).read_text().splitlines()) < MAX_LINES]
    assert not stale, f"LONG_MODULES entries that are short now (remove them): {stale}"


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def test_precision_names_are_decoded_only_by_the_precision_plan():
    bad = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "precision.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                for operand in [node.left, *node.comparators]:
                    values = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
                    for value in values:
                        if isinstance(value, ast.Constant) and value.value in PRECISION_NAMES:
                            bad.append(f"{rel}:{node.lineno} compares with {value.value!r}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("startswith", "endswith") and node.args \
                    and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith(("w4", "w8", "a")):
                bad.append(f"{rel}:{node.lineno} decodes a precision with .{node.func.attr}({node.args[0].value!r})")
            if isinstance(node, ast.Dict):
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
                if keys & PRECISION_NAMES:
                    bad.append(f"{rel}:{node.lineno} maps precision names {sorted(keys & PRECISION_NAMES)}")
    assert not bad, "precision strings decoded outside qdc_export/precision.py:\n" + "\n".join(bad)


def test_passes_return_a_pass_result_and_nothing_else():
    bad = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.returns is not None:
                returns = ast.unparse(node.returns)
                if "PassResult" in returns and returns != "PassResult":
                    bad.append(f"{rel}:{node.lineno} {node.name} -> {returns}")
    assert not bad, "passes must return exactly a PassResult (extra outputs go in its products):\n" + "\n".join(bad)


@pytest.mark.parametrize("unit", sorted(ALLOWED))
def test_doc_lists_every_unit(unit):
    text = ARCHITECTURE.read_text()
    name = unit if unit != "__init__" else "__init__.py"
    assert f"`{name}" in text, f"docs/architecture.md does not mention the unit {unit!r}"
