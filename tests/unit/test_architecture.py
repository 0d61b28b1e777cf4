"""The package's layering, as ARCHITECTURE.md draws it, checked from the source.

Every ``import`` in the package is read (type-only and function-level ones included): the import
graph has no cycle, each import points to the same layer or one below, framework types are used at
run time only in ``asgi/`` and ``web/``, and no module grows past ~450 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[2] / "chatstream_asgi"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("types", "states", "logs")),
    ("engines", ("engines",)),
    ("sessions", ("sessions",)),
    ("protocols", ("protocols",)),
    ("asgi", ("asgi",)),
    ("service", ("service",)),
    ("server", ("server",)),
    ("entry", ("web", "cli", "integrations", "__main__", "__init__")),
]
"""Bottom to top: a module may import its own layer (without a cycle) and the layers below."""

FRAMEWORKS = ("starlette", "fastapi", "quart", "litestar", "hypercorn", "uvicorn")
FRAMEWORK_LAYERS = ("asgi.", "server.", "web.", "integrations.", "cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS and ARCHITECTURE.md"
    return best


def imports(path: Path) -> list[tuple[str, bool]]:
    """The package modules ``path`` imports, each with whether the import is only for type checking."""
    tree = ast.parse(path.read_text())
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] if node.level == 0 else []
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            found.append((name, id(node) in type_only))
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def package_imports(path: Path) -> set[str]:
    out = set()
    for name, _ in imports(path):
        if name.startswith("chatstream_asgi."):
            target = name.removeprefix("chatstream_asgi.")
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target:
                out.add(target)
    return out


def test_imports_are_absolute() -> None:
    relative = [
        module
        for module, path in MODULES.items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level
    ]
    assert not relative


def test_no_import_cycle() -> None:
    graph = {module: package_imports(path) - {module} for module, path in MODULES.items()}
    done: set[str] = set()

    def visit(module: str, stack: list[str]) -> None:
        if module in stack:
            pytest.fail("import cycle: " + " -> ".join([*stack[stack.index(module) :], module]))
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, [*stack, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_imports_point_down_the_layers() -> None:
    upward = []
    for module, path in MODULES.items():
        for target in package_imports(path):
            if layer_of(target) > layer_of(module):
                upward.append(
                    f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
                )
    assert not upward


def test_frameworks_are_used_at_run_time_only_in_the_asgi_layer() -> None:
    misplaced = [
        f"{module} imports {name}"
        for module, path in MODULES.items()
        if not module.startswith(FRAMEWORK_LAYERS)
        for name, type_only in imports(path)
        if name.split(".")[0] in FRAMEWORKS and not type_only
    ]
    assert not misplaced


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module: str) -> None:
    assert len(MODULES[module].read_text().splitlines()) <= 460, f"{module}: split it by idea"
