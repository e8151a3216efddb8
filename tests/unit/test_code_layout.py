"""The code's layout rules, as ARCHITECTURE.md and the README state them, checked over src/ppml.

- A module imports only from its own package and from the layers below its own.
- Packages on one layer (engines, serving, fl) do not import each other.
- No import cycle between the modules of one package (imports inside functions count).
- No module imports another module's private name.
- No class is longer than 400 lines, no function longer than 80 lines (a CLI command's typer
  option declarations do not count towards its length).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

# Lowest first. A package may import the packages on lower lines.
LAYERS: list[set[str]] = [
    {"ppml.errors"},
    {"ppml._internal", "ppml.names"},
    {"ppml.crypto"},
    {"ppml.attestation"},
    {"ppml.kms"},
    {"ppml.tee"},
    {"ppml.workspace"},
    {"ppml.data"},
    {"ppml.api"},
    {"ppml.engines", "ppml.serving", "ppml.fl"},
    {"ppml.server"},
    {"ppml.cli"},
    {"ppml", "ppml.spark", "ppml.flink", "ppml.__main__"},
]
MAX_CLASS_LINES = 400
MAX_FUNCTION_LINES = 80


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    tree: ast.Module
    imports: list[tuple[str, str | None, int]] = field(default_factory=list)


def _load() -> dict[str, Module]:
    modules: dict[str, Module] = {}
    for path in sorted((SRC / "ppml").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        name = ".".join(parts)
        modules[name] = Module(name, path, is_package, ast.parse(path.read_text(), str(path)))
    for module in modules.values():
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "ppml":
                        module.imports.append((alias.name, None, node.lineno))
            elif isinstance(node, ast.ImportFrom):
                target = _absolute(module, node)
                if target.split(".")[0] != "ppml":
                    continue
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    if submodule in modules:
                        module.imports.append((submodule, None, node.lineno))
                    else:
                        module.imports.append((target, alias.name, node.lineno))
    return modules


def _absolute(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.name.split(".")
    if not module.is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


MODULES = _load()


def _package(name: str) -> str:
    """The layer unit a module belongs to: `ppml.kms.service` -> `ppml.kms`."""
    parts = name.split(".")
    if len(parts) == 1:
        return name
    candidate = ".".join(parts[:2])
    return candidate


def _layer(name: str) -> int:
    unit = _package(name)
    for index, layer in enumerate(LAYERS):
        if unit in layer:
            return index
    raise AssertionError(f"{name} is in no layer: add its package to ARCHITECTURE.md and LAYERS")


def test_every_module_is_in_a_layer() -> None:
    for name in MODULES:
        _layer(name)


def test_modules_import_only_their_own_package_and_lower_layers() -> None:
    wrong = []
    for module in MODULES.values():
        own, own_layer = _package(module.name), _layer(module.name)
        for target, name, line in module.imports:
            unit = _package(target)
            if unit == own or _layer(target) < own_layer:
                continue
            if target == "ppml" and name == "__version__":
                continue  # the root package's own constant, not its facade
            wrong.append(f"{module.path.relative_to(SRC)}:{line} imports {target}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_no_module_imports_a_private_name_of_another_module() -> None:
    wrong = []
    for module in MODULES.values():
        for target, name, line in module.imports:
            private_module = any(
                part.startswith("_") and not part.startswith("__") and part != "_internal"
                for part in target.split(".")[1:]
            ) and not target.startswith(module.name)
            private_name = name is not None and name.startswith("_") and not name.startswith("__")
            if private_name or (private_module and _package(target) != _package(module.name)):
                wrong.append(f"{module.path.relative_to(SRC)}:{line} imports {target} {name or ''}")
    assert not wrong, "private names imported across modules:\n" + "\n".join(wrong)


def test_no_module_reads_a_private_attribute_of_another_module() -> None:
    wrong = []
    for module in MODULES.values():
        aliases: dict[str, str] = {}
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "ppml" and alias.asname:
                        aliases[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom):
                target = _absolute(module, node)
                for alias in node.names:
                    if f"{target}.{alias.name}" in MODULES:
                        aliases[alias.asname or alias.name] = f"{target}.{alias.name}"
        for node in ast.walk(module.tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                where = f"{module.path.relative_to(SRC)}:{node.lineno}"
                wrong.append(f"{where} reads {aliases[node.value.id]}.{node.attr}")
    assert not wrong, "private attributes read across modules:\n" + "\n".join(wrong)


def _cycles() -> list[list[str]]:
    # A package's __init__ re-exports its modules: it is left out (importing it is importing
    # them), the cycles between the modules themselves are not.
    graph = {
        name: {
            t
            for t, _, _ in module.imports
            if t in MODULES
            and t != name
            and not MODULES[t].is_package
            and _package(t) == _package(name)
        }
        for name, module in MODULES.items()
        if not module.is_package
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_inside_a_package() -> None:
    cycles = _cycles()
    assert not cycles, f"import cycles: {cycles}"


def _is_typer_command(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any(
        isinstance(d, ast.Call)
        and isinstance(d.func, ast.Attribute)
        and d.func.attr in {"command", "callback"}
        for d in node.decorator_list
    )


def _counted_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    assert node.end_lineno is not None
    if _is_typer_command(node) and node.body:
        # The signature holds the option declarations: count the body only.
        return node.end_lineno - node.body[0].lineno + 1
    return node.end_lineno - node.lineno + 1


@pytest.mark.parametrize("kind", ["class", "function"])
def test_no_class_or_function_is_too_long(kind: str) -> None:
    wrong = []
    for module in MODULES.values():
        for node in ast.walk(module.tree):
            if kind == "class" and isinstance(node, ast.ClassDef):
                assert node.end_lineno is not None
                length, limit = node.end_lineno - node.lineno + 1, MAX_CLASS_LINES
            elif kind == "function" and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length, limit = _counted_lines(node), MAX_FUNCTION_LINES
            else:
                continue
            if length > limit:
                wrong.append(
                    f"{module.path.relative_to(SRC)}:{node.lineno} {node.name}: {length} lines"
                )
    assert not wrong, f"{kind} definitions over the limit:\n" + "\n".join(wrong)
