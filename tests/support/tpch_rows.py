"""Comparing TPC-H query results from two engines (Spark, DuckDB): rows normalised (decimals as
floats) and sorted the same way, values compared with a tolerance for floats."""

from __future__ import annotations

import datetime
import decimal
import math


def _value(v: object) -> object:
    return float(v) if isinstance(v, decimal.Decimal | float) else v


def _sort_key(row: tuple[object, ...]) -> tuple[tuple[int, object], ...]:
    # Floats rounded for ordering only; None first; the comparison itself uses a tolerance.
    out: list[tuple[int, object]] = []
    for v in row:
        if v is None:
            out.append((0, 0))
        elif isinstance(v, float):
            out.append((1, round(v, 2)))
        elif isinstance(v, datetime.date):
            out.append((2, v.isoformat()))
        else:
            out.append((1, v) if isinstance(v, int) else (3, str(v)))
    return tuple(out)


def sorted_rows(rows: list[tuple[object, ...]]) -> list[tuple[object, ...]]:
    """`rows` with decimals as floats, in an order independent of the engine."""
    return sorted((tuple(_value(v) for v in row) for row in rows), key=_sort_key)


def same_value(a: object, b: object) -> bool:
    """Equal, floats (against floats or integers) within 1e-6."""
    if isinstance(a, float) and isinstance(b, float | int):
        return math.isclose(a, float(b), rel_tol=1e-6, abs_tol=1e-6)
    if isinstance(b, float) and isinstance(a, int):
        return math.isclose(float(a), b, rel_tol=1e-6, abs_tol=1e-6)
    return a == b
