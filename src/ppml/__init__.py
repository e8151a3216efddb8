"""ppml: privacy-preserving analytics and machine learning on encrypted data inside TEEs.

The data API for workloads is importable from here: `ppml.read_table`, `ppml.write_table`,
`ppml.read_pandas`, `ppml.write_pandas` (see `ppml.api`), `ppml.sql`, `ppml.sql_pandas` (see
`ppml.engines.sql`). They are loaded on first use, so that `import ppml` stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "read_pandas",
    "read_table",
    "sql",
    "sql_pandas",
    "write_pandas",
    "write_table",
]

_API = frozenset({"read_pandas", "read_table", "write_pandas", "write_table"})
_SQL = frozenset({"sql", "sql_pandas"})


def __getattr__(name: str) -> Any:
    if name in _API:
        from ppml import api

        return getattr(api, name)
    if name in _SQL:
        from ppml.engines import sql

        return getattr(sql, name)
    raise AttributeError(f"module 'ppml' has no attribute {name!r}")
