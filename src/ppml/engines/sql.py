"""Embedded SQL over encrypted tables: DuckDB in-process, over tables decrypted into memory.

Encrypted Parquet tables are read with DuckDB's own Parquet reader -- filters evaluated while
decoding, row groups pruned by their statistics, parallel scans -- over plaintext copies that
exist only in memory. Before DuckDB runs, each file's footer is authenticated
(`ppml.data.pme.PMEFile`), the query is planned over empty tables of the same schemas to learn
which columns it reads, and only those columns' chunks are decrypted and authenticated (every
page, with the AAD Parquet Modular Encryption gives it), still compressed, into an anonymous
memory file (``memfd``, sealed against writes) that DuckDB reads as ``/proc/self/fd/N``. A column
under a key the provider refuses can stay unread; each key is asked of the provider once per
named key and file, on the calling thread, so a refusal is raised as the provider raised it.
CSV, JSON and text files, which have no columns on disk, are decrypted whole into Arrow tables.
Nothing is ever written to disk:

- spilling is off (``temp_directory=''``): a query that does not fit in ``memory_limit`` fails
  instead of writing plaintext to a temporary file;
- after the tables are registered, ``enable_external_access=false`` (no file reads or writes but
  the query's own memory files, no ``COPY``, ``ATTACH``, ``EXPORT``, no extension install or
  load, no secrets, no Python replacement scans) and ``lock_configuration=true`` (no ``SET`` can
  undo any of it);
- before DuckDB sees the text, it must be exactly one ``SELECT`` statement (``WITH``, ``VALUES``,
  ``FROM t``, ``DESCRIBE``, ``SUMMARIZE`` and ``SHOW`` are SELECTs too).

Only the tables a query names are opened (DuckDB's parse tree says which); if the query reaches
another one without naming it in FROM, or a column the plan did not show, it runs again over
every table and column.

Error messages never carry cell values. Binding the query reads schemas only, so an error there
(bad SQL, unknown table or column, wrong types) depends on the query text and the schemas, and
DuckDB's message is passed on. An error that appears only while running on the data (a value
that does not convert, ``error(col)``, ...) may quote a value, so its message is replaced by a
generic one. Decryption happens before the query runs: a file that does not authenticate is an
`IntegrityError` naming it, a refused key the provider's own error.

The engine knows nothing of workspaces: keys come from the `DataKeyProvider` it is given (the
workspace's KMS under ``ppml sql``, a remote attested provider inside a TEE).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ppml import names
from ppml._internal.procs import keep_memory_private
from ppml.crypto.envelope import DataKeyProvider
from ppml.data.tables import part_files
from ppml.errors import IntegrityError, NotEncrypted, PPMLError, UsageError

if TYPE_CHECKING:
    import duckdb
    import pandas as pd
    import pyarrow as pa
    import pyarrow.dataset as ds

    from ppml.data.pme import PMEFile

__all__ = [
    "SqlOptions",
    "check_query",
    "connect",
    "needed_columns",
    "run_sql",
    "sql",
    "sql_pandas",
    "validate_table_name",
]

_log = logging.getLogger(__name__)

_MEMORY_LIMIT = re.compile(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB|%)?", re.IGNORECASE)

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
    `prune_columns`: decrypt only the columns (and row groups) the query reads, while it runs;
    False decrypts every column of each Parquet table it names before the query.
    `read_workers`: CSV, JSON and text files decrypted in parallel (default: the number of
    cores, at most 8).
    """

    memory_limit: str | None = None
    threads: int | None = None
    prune_columns: bool = True
    read_workers: int | None = None

    def __post_init__(self) -> None:
        if self.memory_limit is not None and not _MEMORY_LIMIT.fullmatch(self.memory_limit.strip()):
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
    """Run one SELECT over `tables` ({name: encrypted file or directory, or an Arrow table})
    and return the result as an Arrow table.

    Files are decrypted with keys from `provider`, into memory only. Bad SQL, unknown tables or
    columns, and refused statements raise `UsageError` (exit 2) with a one-line message.
    """
    opts = options or SqlOptions()
    check_query(query)
    sources = _sources(tables)
    with _Loader(provider, opts) as loader:
        con = _open(opts)
        try:
            referenced = _referenced_tables(con, query)
            named = [
                s for s in sources.values() if referenced is None or s.name.lower() in referenced
            ]
            complete = len(named) == len(sources)
            relation = loader.load(con, named, query=query, complete=complete)
            if relation is None:
                # The query reaches a table it does not name in FROM, or a column the plan did
                # not show (or it is wrong anyway): bind again over every table and column.
                con.close()
                con = _open(opts)
                relation = loader.load(con, list(sources.values()), query=query, everything=True)
            assert relation is not None
            try:
                return _fetch(relation)
            except Exception as exc:
                if _interrupted(exc):  # a signal (Ctrl-C, SIGTERM) stopped DuckDB
                    raise KeyboardInterrupt from None
                raise _data_error(exc) from None
        finally:
            con.close()


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
    return names.TABLE.check(name)


def connect(
    tables: Mapping[str, pa.Table | ds.Dataset], options: SqlOptions | None = None
) -> duckdb.DuckDBPyConnection:
    """A fresh in-memory DuckDB connection with `tables` (Arrow tables or pyarrow datasets)
    registered, then locked down: no spilling to disk, no external access, no extensions,
    configuration locked."""
    con = _open(options or SqlOptions())
    try:
        for name, table in tables.items():
            con.register(name, table)
        _lock(con)
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
    return _scanned_columns(
        query, {name: schema.names for name, schema in schemas.items()}, probes=dict(schemas)
    )


# --------------------------------------------------------------------------- connection


def _open(opts: SqlOptions) -> duckdb.DuckDBPyConnection:
    import duckdb

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
        return duckdb.connect(":memory:", config=config)
    except duckdb.Error as exc:
        raise UsageError(_one_line(exc)) from None


def _lock(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("SET enable_progress_bar = false")  # never draw on the terminal
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def _fetch(relation: duckdb.DuckDBPyRelation) -> pa.Table:
    import pyarrow as pa

    result = relation.to_arrow_table()
    assert isinstance(result, pa.Table)
    return result


def _columns_or_all(
    query: str,
    names: Mapping[str, Sequence[str]],
    con: duckdb.DuckDBPyConnection,
    probes: Mapping[str, str | pa.Schema],
) -> dict[str, list[str] | None]:
    try:
        return _scanned_columns(query, names, con, probes)
    except Exception:  # the probe is an optimization only: read everything
        _log.debug("the plan could not be inspected", exc_info=True)
        return {name: None for name in names}


# --------------------------------------------------------------------------- sources


@dataclass
class _Source:
    name: str
    root: Path | None = None  # the file or directory given
    files: list[Path] = field(default_factory=list)
    table: pa.Table | None = None  # given by the caller, or decrypted whole (CSV, JSON, text)
    parquet: list[PMEFile] | None = None  # encrypted Parquet, footers authenticated
    parquet_schema: pa.Schema | None = None

    def schema(self) -> pa.Schema:
        if self.parquet_schema is None and self.parquet is not None:
            self.parquet_schema = _parquet_schema(self, self.parquet)
        if self.parquet_schema is not None:
            return self.parquet_schema
        assert self.table is not None
        return self.table.schema

    def columns(self) -> list[str]:
        """The column names (of every part, in order of appearance)."""
        if self.parquet is not None:
            return list(dict.fromkeys(c for pme in self.parquet for c in pme.columns))
        assert self.table is not None
        return list(self.table.schema.names)


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
            sources[name] = _Source(name, root=Path(value), files=part_files(Path(value)))
    return sources


def _is_parquet(path: Path) -> bool:
    """Parquet (encrypted: `PMEFile` refuses plaintext Parquet) or ppml's streaming format;
    anything else is refused: a plaintext part could add or replace rows with no key at all."""
    from ppml.data import detect_file_kind

    try:
        kind = detect_file_kind(path)
    except OSError as exc:
        raise UsageError(exc.strerror or "cannot read the file", path=path) from None
    if kind == "plain":
        raise NotEncrypted(
            "not an encrypted file: SQL reads encrypted tables only (pass a plaintext table "
            "as an Arrow table to ppml.sql)",
            path=path,
        )
    return kind == "parquet"


class _Loader:
    """One query's tables: footers and keys (each wrapped key unwrapped once, through the
    provider, on this thread), and the memory files DuckDB reads, closed at the end."""

    def __init__(self, provider: DataKeyProvider, opts: SqlOptions) -> None:
        from ppml.data.parquet import key_unwrapper

        keep_memory_private()  # best effort: where unsupported, the query still runs
        self._provider = provider
        self._opts = opts
        self._unwrap = key_unwrapper(provider)
        self._fds: list[int] = []
        self._opened: list[PMEFile] = []
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> _Loader:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        for pme in self._opened:
            pme.close()
        self._opened.clear()
        self._unwrap.forget()

    def open(self, sources: Sequence[_Source]) -> None:
        """Footers of Parquet tables (keys asked for now); other files decrypted whole."""

        from ppml.data.pme import PMEFile

        whole: list[_Source] = []
        parquet: list[_Source] = []
        for source in sources:
            if source.table is not None or source.parquet is not None:
                continue
            kinds = [_is_parquet(p) for p in source.files]  # every part checked
            (parquet if all(kinds) else whole).append(source)
        paths = [path for source in parquet for path in source.files]

        def open_file(path: Path) -> PMEFile:
            with _located(path):
                return PMEFile(path, self._unwrap.unwrap_key)

        # Footers are opened side by side: each asks the provider for its key, and the KMS
        # commits concurrent requests (and their audit records) together.
        opened = _parallel_all(open_file, paths, min(_FOOTER_WORKERS, len(paths)))
        self._opened.extend(opened)
        for source in parquet:
            files, opened = opened[: len(source.files)], opened[len(source.files) :]
            source.parquet = files
        jobs = [(s, p) for s in whole for p in s.files]
        read = _parallel(
            lambda job: _read_whole(job[1], self._provider), jobs, _workers(self._opts, len(jobs))
        )
        for source in whole:
            parts = [t for (s, _), t in zip(jobs, read, strict=True) if s is source]
            source.table = _concat(source, parts)

    def load(
        self,
        con: duckdb.DuckDBPyConnection,
        sources: Sequence[_Source],
        *,
        query: str,
        complete: bool = True,
        everything: bool = False,
    ) -> duckdb.DuckDBPyRelation | None:
        """Register `sources` on `con`, lock it down and bind `query`: Parquet tables as views
        over memory files holding the columns the query reads (every column with
        `everything`), the others as Arrow tables. None: the query did not bind over the
        columns planned (bind again with `everything`); a `UsageError` when it does not bind
        over everything."""
        import duckdb

        self.open(sources)
        parquet = [s for s in sources if s.parquet is not None]
        memory = _MEMFD and bool(parquet)
        prune = self._opts.prune_columns and not everything
        files: dict[str, list[int]] = {}
        shapes: dict[str, list[int]] = {}  # footers alone: the tables' shapes, for the plan
        if memory:
            for source in parquet:
                assert source.parquet is not None
                files[source.name] = [self._memory_fd(source.name) for _ in source.parquet]
                if prune:
                    shapes[source.name] = [
                        self._memory_fd(source.name, pme.plaintext_footer_schema_only())
                        for pme in source.parquet
                    ]
            listed = ", ".join(
                _fd_path(fd) for fds in (*files.values(), *shapes.values()) for fd in fds
            )
            con.execute(f"SET allowed_paths = [{listed}]")
        # From here on the connection reads no file but the query's own memory files.
        con.execute("SET enable_external_access = false")
        columns: dict[str, list[str] | None] = {s.name: None for s in sources}
        if prune:
            probes = {
                s.name: _read_parquet_sql(shapes[s.name]) if s.name in shapes else s.schema()
                for s in sources
            }
            names = {s.name: s.columns() for s in sources}
            columns = _columns_or_all(query, names, con, probes)
            for fds in shapes.values():
                self._close(fds)
        for source in sources:
            if source.parquet is None:
                assert source.table is not None
                con.register(source.name, source.table)
                continue
            wanted = columns.get(source.name)
            parts = []
            for index, pme in enumerate(source.parquet):
                present = None if wanted is None else [c for c in wanted if c in pme.columns]
                with _located(pme.path):
                    if memory:
                        self._fill(files[source.name][index], pme, present)
                    else:
                        parts.append(self._arrow(pme, present))
            if not memory:
                con.register(source.name, _concat(source, parts))
                continue
            # Table names are letters, digits and '_' (validated): safe to quote.
            con.execute(
                f'CREATE VIEW "{source.name}" AS SELECT * FROM '  # noqa: S608
                + _read_parquet_sql(files[source.name])
            )
        _lock(con)
        try:
            return con.sql(query)
        except duckdb.Error as exc:
            pruned = any(c is not None for c in columns.values())
            if everything or (complete and not pruned):
                raise UsageError(_query_error(exc)) from None
            return None

    def _close(self, fds: Sequence[int]) -> None:
        for fd in fds:
            self._fds.remove(fd)
            os.close(fd)

    def _memory_fd(self, table: str, content: bytes = b"") -> int:
        flags = os.MFD_CLOEXEC | getattr(os, "MFD_ALLOW_SEALING", 0)
        try:
            fd = os.memfd_create(f"ppml-sql-{table}", flags)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise UsageError(
                    "too many part files to hold open at once: raise the open-file limit "
                    "(ulimit -n) or use fewer, larger parts"
                ) from None
            raise
        self._fds.append(fd)
        if content:
            os.pwrite(fd, content, 0)
        return fd

    def _fill(self, fd: int, pme: PMEFile, columns: list[str] | None) -> None:
        pme.write_plaintext(fd, columns, pool=self._threads())
        pme.release_file()  # not read again unless the query is bound again over everything
        with contextlib.suppress(OSError, AttributeError):  # sealing is hardening only
            fcntl.fcntl(
                fd,
                fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL,
            )

    def _arrow(self, pme: PMEFile, columns: list[str] | None) -> pa.Table:
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        buffer = io.BytesIO()
        pme.write_plaintext(buffer, columns, pool=self._threads())
        return pq.read_table(pa.BufferReader(buffer.getvalue()))

    def _threads(self) -> ThreadPoolExecutor | None:
        workers = _workers(self._opts, 64)
        if workers <= 1:
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ppml-sql-read")
        return self._pool


_MEMFD = hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


def _fd_path(fd: int) -> str:
    return f"'/proc/self/fd/{fd}'"


def _read_parquet_sql(fds: Sequence[int]) -> str:
    """``read_parquet`` over memory files: the parts of one table, by column name."""
    listed = ", ".join(_fd_path(fd) for fd in fds)
    union = ", union_by_name = true" if len(fds) > 1 else ""
    return f"read_parquet([{listed}]{union})"


def _concat(source: _Source, parts: list[pa.Table]) -> pa.Table:
    import pyarrow as pa

    try:
        return parts[0] if len(parts) == 1 else pa.concat_tables(parts, promote_options="default")
    except pa.ArrowException:
        raise UsageError(f"the parts of table {source.name!r} have incompatible schemas") from None


def _parquet_schema(source: _Source, files: Sequence[PMEFile]) -> pa.Schema:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schemas = []
    for pme in files:
        with _located(pme.path):
            try:
                schemas.append(pq.read_schema(pa.BufferReader(pme.plaintext_footer_schema_only())))
            except (OSError, pa.ArrowException):
                raise IntegrityError(path=pme.path) from None
    if len(schemas) == 1:
        return schemas[0].remove_metadata()
    try:
        return pa.unify_schemas(schemas, promote_options="default").remove_metadata()
    except (pa.ArrowException, TypeError):
        raise UsageError(f"the parts of table {source.name!r} have incompatible schemas") from None


@contextlib.contextmanager
def _located(path: Path) -> Iterator[None]:
    """A provider's error (missing key, access denied) with the file it concerns."""
    try:
        yield
    except IntegrityError:
        raise IntegrityError(path=path) from None
    except PPMLError as exc:
        if exc.path is None:
            exc.path = str(path)
        raise


def _read_whole(path: Path, provider: DataKeyProvider) -> pa.Table:
    from ppml.data import read_table

    return read_table(path, provider)


def _workers(opts: SqlOptions, jobs: int) -> int:
    default = min(8, os.cpu_count() or 1)
    return max(1, min(jobs, opts.read_workers or default))


_FOOTER_WORKERS = 8


def _parallel_all(fn: Any, items: Sequence[Any], workers: int) -> list[Any]:
    """`fn` over `items` on `workers` threads, in order; on a failure, the first one (in
    order) is raised once every call has ended, and the results that did come are closed."""
    if workers <= 1 or len(items) <= 1:
        done: list[Any] = []
        try:
            for item in items:
                done.append(fn(item))
        except BaseException:
            for result in done:
                result.close()
            raise
        return done
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ppml-sql-open") as pool:
        futures = [pool.submit(fn, item) for item in items]
    failure = next((f.exception() for f in futures if f.exception() is not None), None)
    if failure is not None:
        for future in futures:
            if future.exception() is None:
                future.result().close()
        raise failure
    return [f.result() for f in futures]


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


def _referenced_tables(con: duckdb.DuckDBPyConnection, query: str) -> frozenset[str] | None:
    """The (lower-case) names the query's FROM clauses name, from DuckDB's parse tree; None if
    the tree is not available (then every table is opened)."""
    import duckdb

    try:
        rows = con.sql("SELECT json_serialize_sql($1)", params=[query]).fetchall()
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
    query: str,
    names: Mapping[str, Sequence[str]],
    con: duckdb.DuckDBPyConnection | None = None,
    probes: Mapping[str, str | pa.Schema] | None = None,
) -> dict[str, list[str] | None]:
    """The columns of each table that DuckDB's optimized plan reads (None: every column).

    The query is planned (not run) over empty native tables of the same shapes: projection
    pushdown leaves in each scan exactly the columns whose values matter, through ``*``,
    whole-row references, ``EXISTS``, natural joins and all; columns used only by a pushed-down
    filter are taken from the filter's text. A table whose scan is not in the plan is read whole.

    With `con` (external access already off, configuration not yet locked), the empty tables
    are temporary tables there, made from `probes` (an Arrow schema, or the SQL of a table
    function over the table's footers), dropped afterwards; otherwise a connection is made for
    it from `probes` (Arrow schemas).
    """
    shapes = probes if probes is not None else {}
    if con is None:
        probe = _probe_connection(shapes)
        try:
            rows = probe.sql("EXPLAIN (FORMAT JSON) " + query).fetchall()
        finally:
            probe.close()
    else:
        _create_empty_tables(con, shapes, temporary=True)
        try:
            con.execute(f"SET disabled_optimizers = '{_PROBE_DISABLED_OPTIMIZERS}'")
            rows = con.sql("EXPLAIN (FORMAT JSON) " + query).fetchall()
        finally:
            con.execute(
                "RESET disabled_optimizers;\n"
                + ";\n".join(f'DROP TABLE IF EXISTS temp."{name}"' for name in shapes)
            )
    plan = json.loads(rows[0][1])
    found: dict[str, set[str]] = {}
    for node in _walk(plan):
        info = node.get("extra_info")
        if not isinstance(info, dict) or not isinstance(info.get("Table"), str):
            continue
        table = info["Table"].rsplit(".", 1)[-1].lower()
        seen_here = found.setdefault(table, set())
        for key in ("Projections", "Filters"):
            value = info.get(key)
            texts = [value] if isinstance(value, str) else list(value or [])
            seen_here.update(str(t) for t in texts)
    result: dict[str, list[str] | None] = {}
    for name, columns in names.items():
        seen = found.get(name.lower())
        if seen is None:
            result[name] = None
            continue
        blob = "\n".join(seen)
        cols = [c for c in columns if c in seen or _mentions(blob, c)]
        result[name] = cols or list(columns[:1])
    return result


def _mentions(text: str, column: str) -> bool:
    pattern = r"(?<![\w\"])" + re.escape(column) + r"(?![\w\"])"
    return bool(re.search(pattern, text, re.IGNORECASE)) or f'"{column}"' in text


def _probe_connection(schemas: Mapping[str, str | pa.Schema]) -> Any:
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
        _create_empty_tables(con, schemas, temporary=False)
        con.execute(f"SET disabled_optimizers = '{_PROBE_DISABLED_OPTIMIZERS}'")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con


def _create_empty_tables(
    con: duckdb.DuckDBPyConnection, shapes: Mapping[str, str | pa.Schema], *, temporary: bool
) -> None:
    """Native empty tables of `shapes` (temporary ones shadow views of the same names): from an
    Arrow schema, or from the SQL of a table function (read_parquet over footers)."""
    kind = "TEMP TABLE" if temporary else "TABLE"
    registered: list[str] = []
    statements = []
    try:
        for index, (name, shape) in enumerate(shapes.items()):
            validate_table_name(name)  # letters, digits and '_' only: safe to quote
            if isinstance(shape, str):
                source = f"{shape} LIMIT 0"
            else:
                source = f"__ppml_probe_{index}"
                con.register(source, shape.empty_table())
                registered.append(source)
            statements.append(f'CREATE {kind} "{name}" AS SELECT * FROM {source}')  # noqa: S608
        con.execute(";\n".join(statements))
    finally:
        for source in registered:
            con.unregister(source)


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


def _interrupted(exc: BaseException) -> bool:
    """DuckDB's report of a query stopped by a signal (the handler's own exception is lost)."""
    import duckdb

    return isinstance(exc, duckdb.InterruptException) or (
        type(exc) is RuntimeError and str(exc) == "Query interrupted"
    )


def _data_error(exc: BaseException) -> UsageError:
    """A failure on the real data: keep DuckDB's message only when it cannot hold values."""
    if type(exc).__name__ in _RESOURCE_ERRORS:
        return UsageError(_one_line(exc))
    _log.debug("query failed on the data: %s", type(exc).__name__)
    return UsageError(_WITHHELD.format(kind=_error_kind(exc)))


def sql(
    query: str,
    tables: Mapping[str, str | Path | pa.Table],
    *,
    memory_limit: str | None = None,
    threads: int | None = None,
) -> pa.Table:
    """Run one SELECT over encrypted tables and return the result as an Arrow table.

    `tables` maps SQL table names to encrypted files or directories of part files (Parquet,
    CSV, JSON, text) or to Arrow tables. The same engine as ``ppml sql``: DuckDB in-process,
    locked down (no file access but the tables, no extensions, no spilling to disk), the
    tables decrypted into memory only, just the columns the query reads. Keys come from
    `key_provider()`: attested under ``ppml run``, else the workspace's KMS. Anything but one
    SELECT, bad SQL and unknown tables or columns raise `ppml.errors.UsageError`.

    >>> totals = ppml.sql(  # doctest: +SKIP
    ...     "SELECT region, sum(amount) AS total FROM sales GROUP BY region",
    ...     tables={"sales": "data/sales.parquet"},
    ... )
    """
    from ppml.api import key_provider

    options = SqlOptions(memory_limit=memory_limit, threads=threads)
    return run_sql(query, dict(tables), key_provider(), options=options)


def sql_pandas(
    query: str,
    tables: Mapping[str, str | Path | pa.Table],
    *,
    memory_limit: str | None = None,
    threads: int | None = None,
) -> pd.DataFrame:
    """`sql`, with the result as a pandas DataFrame."""
    result = sql(query, tables, memory_limit=memory_limit, threads=threads)
    frame: pd.DataFrame = result.to_pandas()
    return frame
