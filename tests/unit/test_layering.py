"""The package's floor plan (docs/architecture.md): each layer imports only the layers below
it, no module imports another's private names across layers, there is no import cycle, and
files and functions stay readable (<= 600 lines a file, <= 60 lines a function).

Imports are read from the source (every ``import`` statement, also those inside functions:
a lazy import hides a dependency, it does not remove it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "qgalore_dist"
LAYERS = ["quant", "kernels", "core", "distributed", "optim", "integrations", "checkpoint", "train", "estimate"]
# Top-level modules above every layer: the package face and the deprecated aliases.
FACADES = {"qgalore_dist", "qgalore_dist.fsdp", "qgalore_dist.demo", "qgalore_dist.launch_env",
           "qgalore_dist.__main__"}
MAX_FILE_LINES, MAX_FUNCTION_LINES = 600, 60


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, tuple[Path, ast.Module]]:
    return {_module_name(p): (p, ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(sources) -> dict[str, list[tuple[str, str, int]]]:
    """``{module: [(imported module, imported name or "", line)]}`` for qgalore_dist targets."""
    out: dict[str, list[tuple[str, str, int]]] = {}
    for module, (path, tree) in sources.items():
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [(a.name, "", node.lineno) for a in node.names if a.name.startswith("qgalore_dist")]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, node, path.name == "__init__.py")
                if not target.startswith("qgalore_dist"):
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.append((sub, "", node.lineno) if sub in sources else (target, alias.name, node.lineno))
        out[module] = found
    return out


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_every_module_is_in_a_layer_or_a_facade():
    loose = [m for m in _sources() if _layer(m) is None and m not in FACADES]
    assert not loose, f"modules outside the layers {LAYERS}: {loose}"


def test_no_upward_import_and_no_private_name_across_layers():
    sources = _sources()
    problems = []
    for module, imported in _imports(sources).items():
        here = _layer(module)
        if here is None:
            continue
        for target, name, line in imported:
            there = _layer(target)
            if there is not None and there > here:
                problems.append(f"{module}:{line} imports {target} ({LAYERS[there]} is above {LAYERS[here]})")
            if there is not None and there != here and name.startswith("_"):
                problems.append(f"{module}:{line} imports private {target}.{name} from another layer")
    assert not problems, "\n".join(problems)


def test_no_import_cycle():
    sources = _sources()
    graph = {m: sorted({t if t in sources else t.rsplit(".", 1)[0] for t, _, _ in imported} & set(sources) - {m})
             for m, imported in _imports(sources).items()}
    # A package's __init__ re-exporting its own submodules is not a cycle of design.
    graph = {m: [t for t in ts if not (m.startswith(t + ".") or t.startswith(m + "."))] for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in graph[m]:
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        state[m] = 2
        stack.pop()
        return None

    for m in graph:
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_files_and_functions_stay_short():
    long_files, long_functions = [], []
    for module, (path, tree) in _sources().items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_FILE_LINES:
            long_files.append(f"{module}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{module}.{node.name}: {length} lines")
    assert not long_files and not long_functions, "\n".join(long_files + long_functions)


def test_checker_sees_an_upward_import(tmp_path):
    """The walker itself: a relative upward import inside a function is found and resolved."""
    tree = ast.parse("def f():\n    from ..optim import QGaLoreAdamW8bit\n")
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    assert _resolve("qgalore_dist.core.projector", node, is_package=False) == "qgalore_dist.optim"
    assert _layer("qgalore_dist.optim") > _layer("qgalore_dist.core.projector")
