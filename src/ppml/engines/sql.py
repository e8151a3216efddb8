"""Embedded SQL over encrypted tables: DuckDB in-process, over decrypted Arrow tables.

Each input table is decrypted into memory with `ppml.data.read_table` and registered in a fresh
in-memory DuckDB connection; nothing is ever written to disk:

- spilling is off (``temp_directory=''``): a query that does not fit in ``memory_limit`` fails
  instead of writing plaintext to a temporary file;
- after the tables are registered, ``enable_external_access=false`` (no file reads or writes, no
  ``COPY``, ``ATTACH``, ``EXPORT``, no extension install or load, no secrets, no Python
  replacement scans) and ``lock_configuration=true`` (no ``SET`` can undo any of it);
- before DuckDB sees the text, it must be exactly one ``SELECT`` statement (``WITH``, ``VALUES``,
  ``FROM t``, ``DESCRIBE``, ``SUMMARIZE`` and ``SHOW`` are SELECTs too).

Error messages never carry cell values. The query is first bound and run against empty tables of
the same schemas: any error there depends on the query text and the schemas only, and DuckDB's
message is passed on. An error that appears only on the real data (a value that does not
convert, ``error(col)``, ...) may quote a value, so its message is replaced by a generic one.

Only the tables a query names, and of those only the columns its plan reads, are decrypted
(Parquet Modular Encryption decrypts per column): DuckDB plans the query over empty tables of
the same schemas and its projection pushdown says which columns each scan needs; the pruned
tables are used only when the query binds to them with exactly the result schema it has on the
full tables. CSV, JSON and text files are decrypted whole (they have no columns on disk).

The engine knows nothing of workspaces: keys come from the `DataKeyProvider` it is given (the
workspace's KMS under ``ppml sql``, a remote attested provider inside a TEE).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ppml.crypto.envelope import DataKeyProvider
from ppml.errors import InputNotFound, UsageError

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa

__all__ = [
    "SqlOptions",
    "check_query",
    "connect",
    "needed_columns",
    "run_sql",
    "validate_table_name",
]

_log = logging.getLogger(__name__)

_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_MEMORY_LIMIT = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB|%)?$", re.IGNORECASE)

# DuckDB messages kept as they are even when the data is involved: they describe resources and
# the query, never values.
_RESOURCE_ERRORS = ("OutOfMemoryException", "InterruptException")

_WITHHELD = (
    "the query failed on the data ({kind}); DuckDB's message is withheld because it may "
    "quote values from the tables"
)


@dataclass(frozen=True, slots=True)
class SqlOptions:
    """How to run a query.

    `memory_limit`: DuckDB's memory limit (e.g. "4GB", "50%"); default DuckDB's (80% of RAM).
    Spilling is always off, so a query over the limit fails rather than writing to disk.
    `threads`: DuckDB worker threads (default: one per core).
    `prune_columns`: decrypt only the columns the query names.
    `read_workers`: files decrypted in parallel (default: the number of cores, at most 8).
    """

    memory_limit: str | None = None
    threads: int | None = None
    prune_columns: bool = True
    read_workers: int | None = None

    def __post_init__(self) -> None:
        if self.memory_limit is not None and not _MEMORY_LIMIT.match(self.memory_limit.strip()):
            raise UsageError(f"invalid memory limit {self.memory_limit!r} (e.g. 4GB or 50%)")
        if self.threads is not None and not 1 <= self.threads <= 1024:
            raise UsageError("threads must be between 1 and 1024")
        if self.read_workers is not None and not 1 <= self.read_workers <= 64:
            raise UsageError("read workers must be between 1 and 64")


# --------------------------------------------------------------------------- public API


def run_sql(
    query: str,
    tables: Mapping[str, Path | str | pa.Table],
    provider: DataKeyProvider,
    *,
    options: SqlOptions | None = None,
) -> pa.Table:
    """Run one SELECT over `tables` ({name: encrypted or plain file or directory, or an Arrow
    table}) and return the result as an Arrow table.

    Files are decrypted with keys from `provider`, into memory only. Bad SQL, unknown tables or
    columns, and refused statements raise `UsageError` (exit 2) with a one-line message.
    """
    import pyarrow as pa

    opts = options or SqlOptions()
    check_query(query)
    sources = _sources(tables)
    referenced = _referenced_tables(query)
    plan = _plan(query, sources, referenced, provider, opts)
    loaded = _load(sources, plan, provider, opts)
    con = connect(loaded, opts)
    try:
        try:
            result = con.sql(query).to_arrow_table()
        except Exception as exc:
            raise _data_error(exc) from None
    finally:
        con.close()
    assert isinstance(result, pa.Table)
    return result


def check_query(query: str) -> None:
    """Refuse anything but exactly one SELECT statement; a parse error is a `UsageError` with
    DuckDB's message (which quotes only the query)."""
    import duckdb

    if not isinstance(query, str) or not query.strip():
        raise UsageError("the query is empty")
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise UsageError(_one_line(exc)) from None
    if len(statements) != 1:
        raise UsageError(f"expected one SQL statement, got {len(statements)}")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise UsageError(
            f"only a read-only query (SELECT) is allowed, not {kind.name.replace('_', ' ')}"
        )


def validate_table_name(name: str) -> str:
    """Table names: a letter or '_', then letters, digits or '_' (at most 63 characters)."""
    if not isinstance(name, str) or not _TABLE_NAME.match(name):
        raise UsageError(
            f"invalid table name {name!r}: use letters, digits and '_', starting with a letter "
            "or '_' (at most 63 characters)"
        )
    return name


def connect(
    tables: Mapping[str, pa.Table], options: SqlOptions | None = None
) -> duckdb.DuckDBPyConnection:
    """A fresh in-memory DuckDB connection with `tables` registered, then locked down: no
    spilling to disk, no external access, no extensions, configuration locked."""
    import duckdb

    opts = options or SqlOptions()
    config: dict[str, str | bool | int | float | list[str]] = {
        "temp_directory": "",  # never spill (plaintext) to disk
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
        "allow_community_extensions": False,
        "allow_unsigned_extensions": False,
        "python_enable_replacements": False,
    }
    if opts.memory_limit is not None:
        config["memory_limit"] = opts.memory_limit.strip()
    if opts.threads is not None:
        config["threads"] = opts.threads
    try:
        con = duckdb.connect(":memory:", config=config)
    except duckdb.Error as exc:
        raise UsageError(_one_line(exc)) from None
    try:
        for name, table in tables.items():
            con.register(name, table)
        con.execute("SET enable_progress_bar = false")  # never draw on the terminal
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con


def needed_columns(
    query: str, schemas: Mapping[str, pa.Schema], options: SqlOptions | None = None
) -> dict[str, list[str] | None]:
    """The columns of each table that `query` reads (None: every column), as DuckDB's optimized
    plan over empty tables of these schemas says. A query that does not plan is a `UsageError`.
    """
    opts = options or SqlOptions()
    check_query(query)
    _dry_run(query, schemas, None, opts)
    return _scanned_columns(query, schemas, opts)


# --------------------------------------------------------------------------- sources


@dataclass
class _Part:
    path: Path
    kind: str  # "parquet" or "other"
    schema: pa.Schema | None = None
    table: pa.Table | None = None  # non-Parquet parts are read whole to learn their schema


@dataclass
class _Source:
    name: str
    table: pa.Table | None = None  # an Arrow table given by the caller
    parts: list[_Part] = field(default_factory=list)


def _sources(tables: Mapping[str, Path | str | pa.Table]) -> dict[str, _Source]:
    import pyarrow as pa

    if not tables:
        raise UsageError("no tables: give at least one NAME=PATH")
    sources: dict[str, _Source] = {}
    seen: dict[str, str] = {}
    for name, value in tables.items():
        validate_table_name(name)
        if name.lower() in seen:  # SQL names are case-insensitive
            raise UsageError(f"table {name!r} given twice (as {seen[name.lower()]!r})")
        seen[name.lower()] = name
        if isinstance(value, pa.Table):
            sources[name] = _Source(name, table=value)
        else:
            sources[name] = _Source(name, parts=[_Part(p, _kind(p)) for p in _part_files(value)])
    return sources


def _part_files(value: Path | str) -> list[Path]:
    path = Path(value)
    if not path.exists():
        raise InputNotFound("no such file or directory", path=path)
    if path.is_file():
        return [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
    )
    if not files:
        raise UsageError("directory holds no data files", path=path)
    return files


def _kind(path: Path) -> str:
    from ppml.data import detect_file_kind

    try:
        return "parquet" if detect_file_kind(path) == "parquet" else "other"
    except OSError as exc:
        raise UsageError(exc.strerror or "cannot read the file", path=path) from None


def _parquet_schema(path: Path, provider: DataKeyProvider) -> pa.Schema:
    """The Arrow schema from a Parquet footer (decrypting the footer only, not the data)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ppml.data.files import annotate_errors
    from ppml.data.parquet import _KeySession, is_encrypted_parquet

    with annotate_errors(path):
        if not is_encrypted_parquet(path):
            try:
                schema = pq.read_schema(path)
            except (OSError, pa.ArrowException):
                raise UsageError("not a readable Parquet file", path=path) from None
        else:
            with _KeySession(provider, path) as session, session.guard(decrypting=True):
                props = session.decryption_properties()
                with pq.ParquetFile(path, decryption_properties=props) as pf:
                    schema = pf.schema_arrow
    return schema.remove_metadata()


def _learn_schema(part: _Part, provider: DataKeyProvider) -> None:
    from ppml.data import read_table

    if part.schema is not None:
        return
    if part.kind == "parquet":
        part.schema = _parquet_schema(part.path, provider)
    else:
        part.table = read_table(part.path, provider)
        part.schema = part.table.schema


def _read_part(part: _Part, columns: list[str] | None, provider: DataKeyProvider) -> pa.Table:
    from ppml.data import read_table

    if part.table is not None:
        return part.table if columns is None else part.table.select(columns)
    assert part.schema is not None
    present = None if columns is None else [c for c in columns if c in part.schema.names]
    if present is not None and not present and part.schema.names:
        present = [part.schema.names[0]]  # keep the row count
    table = read_table(part.path, provider, columns=present)
    if columns is not None:
        table = table.select([c for c in columns if c in table.schema.names])
    return table


def _schema_of(source: _Source) -> pa.Schema:
    import pyarrow as pa

    if source.table is not None:
        return source.table.schema
    schemas = [p.schema for p in source.parts]
    assert all(s is not None for s in schemas)
    if len(schemas) == 1:
        assert schemas[0] is not None
        return schemas[0]
    try:
        return pa.unify_schemas([s for s in schemas if s is not None], promote_options="default")
    except (pa.ArrowException, TypeError):
        raise UsageError(f"the parts of table {source.name!r} have incompatible schemas") from None


def _workers(opts: SqlOptions, jobs: int) -> int:
    default = min(8, os.cpu_count() or 1)
    return max(1, min(jobs, opts.read_workers or default))


def _parallel(fn: Any, items: Sequence[Any], workers: int) -> list[Any]:
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ppml-sql-read") as pool:
        return list(pool.map(fn, items))


# --------------------------------------------------------------------------- planning


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _referenced_tables(query: str) -> frozenset[str] | None:
    """The (lower-case) names the query's FROM clauses name, from DuckDB's parse tree; None if
    the tree is not available (then every table is loaded)."""
    import duckdb

    try:
        con = duckdb.connect(":memory:", config={"enable_external_access": False})
        try:
            rows = con.sql("SELECT json_serialize_sql($1)", params=[query]).fetchall()
        finally:
            con.close()
        tree = json.loads(rows[0][0])
    except (duckdb.Error, ValueError, IndexError, TypeError):
        return None
    if not isinstance(tree, dict) or tree.get("error") is not False:
        return None
    return frozenset(
        str(node.get("table_name", "")).lower()
        for node in _walk(tree.get("statements"))
        if node.get("type") == "BASE_TABLE"
    )


# Optimizers that may drop the scan of an empty table (there is no data in the probe), so that
# its columns could not be seen; the one that matters, `unused_columns`, stays on.
_PROBE_DISABLED_OPTIMIZERS = "statistics_propagation,empty_result_pullup"


def _scanned_columns(
    query: str, schemas: Mapping[str, pa.Schema], opts: SqlOptions
) -> dict[str, list[str] | None]:
    """The columns of each table that DuckDB's optimized plan reads (None: every column).

    The query is planned (not run) over empty native tables of the same schemas: projection
    pushdown leaves in each scan exactly the columns whose values matter, through ``*``,
    whole-row references, ``EXISTS``, natural joins and all; columns used only by a pushed-down
    filter are taken from the filter's text. A table whose scan is not in the plan is read whole.
    """
    con = _probe_connection(schemas, opts)
    try:
        rows = con.sql("EXPLAIN (FORMAT JSON) " + query).fetchall()
    finally:
        con.close()
    plan = json.loads(rows[0][1])
    found: dict[str, set[str]] = {}
    for node in _walk(plan):
        info = node.get("extra_info")
        if not isinstance(info, dict) or not isinstance(info.get("Table"), str):
            continue
        table = info["Table"].rsplit(".", 1)[-1].lower()
        names = found.setdefault(table, set())
        for key in ("Projections", "Filters"):
            value = info.get(key)
            texts = [value] if isinstance(value, str) else list(value or [])
            names.update(str(t) for t in texts)
    result: dict[str, list[str] | None] = {}
    for name, schema in schemas.items():
        seen = found.get(name.lower())
        if seen is None:
            result[name] = None
            continue
        blob = "\n".join(seen)
        cols = [c for c in schema.names if c in seen or _mentions(blob, c)]
        result[name] = cols or schema.names[:1]
    return result


def _mentions(text: str, column: str) -> bool:
    pattern = r"(?<![\w\"])" + re.escape(column) + r"(?![\w\"])"
    return bool(re.search(pattern, text, re.IGNORECASE)) or f'"{column}"' in text


def _probe_connection(schemas: Mapping[str, pa.Schema], opts: SqlOptions) -> Any:
    import duckdb

    con = duckdb.connect(
        ":memory:",
        config={
            "temp_directory": "",
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "python_enable_replacements": False,
        },
    )
    try:
        for name, schema in schemas.items():
            con.register("__ppml_probe_source", schema.empty_table())
            validate_table_name(name)  # letters, digits and '_' only: safe to quote
            con.execute(f'CREATE TABLE "{name}" AS SELECT * FROM __ppml_probe_source')  # noqa: S608
            con.unregister("__ppml_probe_source")
        con.execute(f"SET disabled_optimizers = '{_PROBE_DISABLED_OPTIMIZERS}'")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con


@dataclass(frozen=True)
class _Plan:
    columns: dict[str, list[str] | None]  # the tables to load, with their columns (None: all)


def _plan(
    query: str,
    sources: dict[str, _Source],
    referenced: frozenset[str] | None,
    provider: DataKeyProvider,
    opts: SqlOptions,
) -> _Plan:
    """Decide what to decrypt, and check the query against empty tables (no data at all)."""
    wanted = (
        [s for s in sources.values() if s.name.lower() in referenced]
        if referenced is not None
        else list(sources.values())
    )
    _learn_schemas(wanted, provider, opts)
    schemas = {s.name: _schema_of(s) for s in wanted}
    try:
        full_result = _dry_run(query, schemas, None, opts)
    except UsageError:
        if len(wanted) == len(sources):
            raise
        # The query may reach a table without naming it in FROM: check with every table.
        _learn_schemas(list(sources.values()), provider, opts)
        schemas = {s.name: _schema_of(s) for s in sources.values()}
        _dry_run(query, schemas, None, opts)
        return _Plan({name: None for name in schemas})
    full: dict[str, list[str] | None] = {name: None for name in schemas}
    if not opts.prune_columns:
        return _Plan(full)
    try:
        pruned = _scanned_columns(query, schemas, opts)
    except Exception:  # the probe is an optimization only: read everything
        _log.debug("no column pruning: the plan could not be inspected", exc_info=True)
        return _Plan(full)
    if all(cols is None or len(cols) == len(schemas[n]) for n, cols in pruned.items()):
        return _Plan(full)
    try:
        pruned_result = _dry_run(query, schemas, pruned, opts)
    except UsageError:
        pruned_result = None
    if pruned_result is None or not pruned_result.equals(full_result):
        _log.debug("column pruning does not preserve the result schema: reading every column")
        return _Plan(full)
    return _Plan(pruned)


def _learn_schemas(sources: Iterable[_Source], provider: DataKeyProvider, opts: SqlOptions) -> None:
    parts = [p for s in sources for p in s.parts if p.schema is None]
    _parallel(lambda p: _learn_schema(p, provider), parts, _workers(opts, len(parts)))


def _dry_run(
    query: str,
    schemas: Mapping[str, pa.Schema],
    columns: Mapping[str, list[str] | None] | None,
    opts: SqlOptions,
) -> pa.Schema:
    """Bind and run `query` over empty tables: errors depend on the query and schemas only."""
    empty = {}
    for name, schema in schemas.items():
        cols = columns.get(name) if columns is not None else None
        if columns is not None and name not in columns:
            continue
        shape = schema if cols is None else _select_schema(schema, cols)
        empty[name] = shape.empty_table()
    con = connect(empty, opts)
    try:
        result = con.sql(query).to_arrow_table()
    except Exception as exc:
        raise UsageError(_query_error(exc)) from None
    finally:
        con.close()
    shape_of_result: pa.Schema = result.schema
    return shape_of_result


def _select_schema(schema: pa.Schema, columns: Sequence[str]) -> pa.Schema:
    import pyarrow as pa

    return pa.schema([schema.field(c) for c in columns])


def _load(
    sources: dict[str, _Source], plan: _Plan, provider: DataKeyProvider, opts: SqlOptions
) -> dict[str, pa.Table]:
    """Decrypt what the plan needs, each part file in parallel."""
    import pyarrow as pa

    jobs: list[tuple[str, _Part | None, list[str] | None]] = []
    for name, cols in plan.columns.items():
        source = sources[name]
        if source.table is not None:
            jobs.append((name, None, cols))
        else:
            jobs.extend((name, part, cols) for part in source.parts)

    def one(job: tuple[str, _Part | None, list[str] | None]) -> pa.Table:
        name, part, cols = job
        if part is None:
            table = sources[name].table
            assert table is not None
            return table  # DuckDB reads only the columns it needs from an Arrow table
        return _read_part(part, cols, provider)

    tables = _parallel(one, jobs, _workers(opts, len(jobs)))
    pieces: dict[str, list[pa.Table]] = {}
    for (name, _, _), table in zip(jobs, tables, strict=True):
        pieces.setdefault(name, []).append(table)
    for source in sources.values():  # drop what was read only to learn a schema
        for part in source.parts:
            part.table = None
    loaded: dict[str, pa.Table] = {}
    for name, parts in pieces.items():
        try:
            loaded[name] = (
                parts[0] if len(parts) == 1 else pa.concat_tables(parts, promote_options="default")
            )
        except pa.ArrowException:
            raise UsageError(f"the parts of table {name!r} have incompatible schemas") from None
    return loaded


# --------------------------------------------------------------------------- errors


def _one_line(exc: BaseException) -> str:
    """DuckDB's message up to its ``LINE n:`` excerpt, on one line."""
    lines = []
    for line in str(exc).splitlines():
        if line.startswith("LINE "):
            break
        if line.strip():
            lines.append(line.strip())
    return " ".join(lines) or type(exc).__name__


def _query_error(exc: BaseException) -> str:
    import duckdb

    if isinstance(exc, duckdb.Error):
        return _one_line(exc)
    _log.debug("unexpected error checking a query", exc_info=exc)
    return f"the query could not be run ({type(exc).__name__})"


def _error_kind(exc: BaseException) -> str:
    name = type(exc).__name__.removesuffix("Exception").removesuffix("Error")
    return re.sub(r"(?<!^)(?=[A-Z])", " ", name).lower() + " error" if name else "error"


def _data_error(exc: BaseException) -> UsageError:
    """A failure on the real data: keep DuckDB's message only when it cannot hold values."""
    if type(exc).__name__ in _RESOURCE_ERRORS:
        return UsageError(_one_line(exc))
    _log.debug("query failed on the data: %s", type(exc).__name__)
    return UsageError(_WITHHELD.format(kind=_error_kind(exc)))
