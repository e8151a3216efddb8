"""Hive-style partition directories (``col=value/``), as Spark writes and discovers them.

`partition_dir` names the directory of one row's partition values, escaping the characters
Spark escapes (``%XX``) and writing null as ``__HIVE_DEFAULT_PARTITION__``; `discover` reads
the values back from the directories between a read's root and each file, with Spark's type
inference (integer, long, double, date, else string).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ppml.errors import UsageError

__all__ = ["NULL_PARTITION", "Discovered", "discover", "partition_dir"]

NULL_PARTITION = "__HIVE_DEFAULT_PARTITION__"
_ESCAPED = frozenset("\"#%'*/:=?\\\x7f{[]^") | frozenset(chr(c) for c in range(1, 0x20))


def _escape(text: str) -> str:
    return "".join(f"%{ord(c):02X}" if c in _ESCAPED else c for c in text)


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "%" and _is_hex(text[i + 1 : i + 3]):
            out.append(chr(int(text[i + 1 : i + 3], 16)))
            i += 3
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _is_hex(text: str) -> bool:
    return len(text) == 2 and all(c in "0123456789abcdefABCDEF" for c in text)


def _text(value: Any) -> str:
    if value is None:
        return NULL_PARTITION
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.date):
        return value.isoformat()
    text = str(value)
    return _escape(text) if text else NULL_PARTITION


def partition_dir(names: Sequence[str], values: Sequence[Any]) -> str:
    """``a=1/b=x`` for one row's partition values (string, integer, boolean or date)."""
    return "/".join(f"{_escape(n)}={_text(v)}" for n, v in zip(names, values, strict=True))


@dataclass(frozen=True, slots=True)
class Discovered:
    """The partition columns under a read's roots: names, Spark type names, and each file's
    values (in the order of `names`)."""

    names: tuple[str, ...]
    types: tuple[str, ...]  # "integer", "long", "double", "date", "string"
    values: dict[Path, tuple[Any, ...]]


def _segments(file: Path, roots: Sequence[Path]) -> list[tuple[str, str]] | None:
    for root in roots:
        if not root.is_dir():
            continue
        try:
            relative = file.relative_to(root)
        except ValueError:
            continue
        found = []
        for part in relative.parts[:-1]:
            if "=" in part and not part.startswith("="):
                name, _, value = part.partition("=")
                found.append((_unescape(name), _unescape(value)))
        return found
    return None


def _infer(values: list[str | None]) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "string"
    try:
        numbers = [int(v) for v in present]
        return "integer" if all(-(2**31) <= n < 2**31 for n in numbers) else "long"
    except ValueError:
        pass
    try:
        for v in present:
            float(v)
        return "double"
    except ValueError:
        pass
    try:
        for v in present:
            if len(v) != 10:
                raise ValueError(v)
            dt.date.fromisoformat(v)
        return "date"
    except ValueError:
        return "string"


def _convert(value: str | None, kind: str) -> Any:
    if value is None:
        return None
    if kind in ("integer", "long"):
        return int(value)
    if kind == "double":
        return float(value)
    if kind == "date":
        return dt.date.fromisoformat(value)
    return value


def discover(roots: Sequence[Path], files: Sequence[Path]) -> Discovered | None:
    """The partition columns of `files` found under directory `roots` (``None`` if none): every
    file must have the same column names, in the same order, as Spark requires."""
    absolute_roots = [Path(os.path.abspath(r)) for r in roots]
    found: dict[Path, list[tuple[str, str]]] = {}
    for f in files:
        segments = _segments(Path(os.path.abspath(f)), absolute_roots)
        found[f] = segments or []
    layouts = {tuple(n for n, _ in s) for s in found.values()}
    if layouts == {()}:
        return None
    if len(layouts) != 1:
        shown = ", ".join(sorted("/".join(layout) or "(none)" for layout in layouts))
        raise UsageError(f"conflicting partition directory layouts: {shown}")
    (names,) = layouts
    raw = {
        f: [None if v == NULL_PARTITION else v for _, v in segments]
        for f, segments in found.items()
    }
    kinds = tuple(_infer([vals[i] for vals in raw.values()]) for i in range(len(names)))
    values = {
        f: tuple(_convert(v, kinds[i]) for i, v in enumerate(vals)) for f, vals in raw.items()
    }
    return Discovered(names, kinds, values)
