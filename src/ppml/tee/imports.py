"""Finding the local modules a Python script imports, so that they are measured with it."""

from __future__ import annotations

import ast
from pathlib import Path

__all__ = ["local_imports"]


def _module_file(base: Path, dotted: str) -> Path | None:
    """The file under `base` that `import dotted` would load, if it is local."""
    parts = dotted.split(".")
    candidate = base.joinpath(*parts)
    if candidate.with_suffix(".py").is_file():
        return candidate.with_suffix(".py")
    if (candidate / "__init__.py").is_file():
        return candidate / "__init__.py"
    return None


def _imported_names(tree: ast.AST, package: list[str]) -> list[str]:
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                names.extend(".".join(parts[: i + 1]) for i in range(len(parts)))
        elif isinstance(node, ast.ImportFrom):
            prefix = package[: len(package) - node.level + 1] if node.level else []
            if node.level and node.level - 1 > len(package):
                continue
            module = [*prefix, *(node.module.split(".") if node.module else [])]
            if module:
                names.extend(".".join(module[: i + 1]) for i in range(len(module)))
            for alias in node.names:
                names.append(".".join([*module, alias.name]))
    return names


def local_imports(script: Path) -> list[Path]:
    """Every module file under the script's directory that the script imports, transitively
    (including each imported package's `__init__.py`). Unparsable files are skipped: they will
    fail when run, and their bytes are measured all the same when they are trusted files."""
    base = script.resolve().parent
    seen: set[Path] = set()
    found: list[Path] = []
    queue: list[tuple[Path, list[str]]] = [(script.resolve(), [])]
    while queue:
        path, package = queue.pop()
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue
        for name in _imported_names(tree, package):
            module = _module_file(base, name)
            if module is None or module in seen:
                continue
            seen.add(module)
            found.append(module)
            pkg = name.split(".") if module.name == "__init__.py" else name.split(".")[:-1]
            queue.append((module, pkg))
    return sorted(found)
