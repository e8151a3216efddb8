"""The key database: the key store file, one private SQLite database (WAL, schema-versioned)
shared by processes.

It owns the connection, the schema (and its migrations) and the key and release-rule tables;
writes run in ``BEGIN IMMEDIATE`` transactions so that concurrent writers serialise instead of
interleaving.

Schema versions: 1 keys, key versions, audit log; 2 adds ``release_rules`` (the release policies);
3 adds ``release_rules.constraints`` (a rule's reference values beyond the primary measurement,
canonical JSON); 4 adds ``state_head`` (the authenticated state record, `ppml.kms.state`) and
``audit_head.state_version``.
An older store is upgraded in place, in one transaction, when it is opened.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ppml._internal.fs import PRIVATE_FILE_MODE
from ppml.errors import ConfigurationError, UsageError

__all__ = [
    "SCHEMA_VERSION",
    "KeyDatabase",
    "KeyRow",
    "RuleRow",
    "delete_rules",
    "get_meta",
    "insert_key",
    "insert_version",
    "key_rows",
    "put_meta",
    "savepoint",
    "upsert_rule",
]

SCHEMA_VERSION = 4
BUSY_TIMEOUT_MS = 30_000

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

_SCHEMA = (
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL)",
    "CREATE TABLE keys (name TEXT PRIMARY KEY, created_at TEXT NOT NULL)",
    """CREATE TABLE key_versions (
        name TEXT NOT NULL REFERENCES keys (name),
        version INTEGER NOT NULL CHECK (version >= 1),
        wrapped_kek BLOB NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (name, version))""",
    """CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        ts TEXT NOT NULL,
        actor TEXT NOT NULL,
        op TEXT NOT NULL,
        key_name TEXT,
        version INTEGER,
        outcome TEXT NOT NULL,
        detail TEXT NOT NULL,
        mac BLOB NOT NULL)""",
    "CREATE INDEX audit_by_key ON audit (key_name, seq)",
    """CREATE TABLE audit_head (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seq INTEGER NOT NULL,
        mac BLOB NOT NULL,
        head_mac BLOB NOT NULL)""",
)

_RELEASE_RULES = (
    """CREATE TABLE release_rules (
        key_name TEXT NOT NULL REFERENCES keys (name),
        tee TEXT NOT NULL,
        measurement TEXT NOT NULL,
        debug_ok INTEGER NOT NULL,
        min_tcb TEXT NOT NULL,
        created_at TEXT NOT NULL,
        mac BLOB NOT NULL,
        PRIMARY KEY (key_name, tee, measurement))""",
)

_RULE_CONSTRAINTS = ("ALTER TABLE release_rules ADD COLUMN constraints TEXT NOT NULL DEFAULT '{}'",)

_STATE = (
    """CREATE TABLE state_head (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        version INTEGER NOT NULL,
        summary BLOB NOT NULL,
        audit_seq INTEGER NOT NULL,
        audit_mac BLOB NOT NULL,
        mac BLOB NOT NULL)""",
    "ALTER TABLE audit_head ADD COLUMN state_version INTEGER",
)

# _MIGRATIONS[n] takes a store from schema version n to n + 1.
_MIGRATIONS: dict[int, tuple[str, ...]] = {1: _RELEASE_RULES, 2: _RULE_CONSTRAINTS, 3: _STATE}
_CURRENT_SCHEMA = _SCHEMA + _RELEASE_RULES + _RULE_CONSTRAINTS + _STATE

OnCreate = Callable[[sqlite3.Connection, bytes], None]


@dataclass(frozen=True, slots=True)
class KeyRow:
    """One named key as stored: its name, creation time and (version, created_at) pairs."""

    name: str
    created_at: str
    versions: tuple[tuple[int, str], ...]


@dataclass(frozen=True, slots=True)
class RuleRow:
    """One release rule as stored (unchecked: `ppml.kms.stored_rules` verifies `mac`)."""

    key_name: str
    tee: object
    measurement: object
    debug_ok: object
    min_tcb: object
    mac: object
    constraints: object = "{}"


@contextlib.contextmanager
def savepoint(conn: sqlite3.Connection) -> Iterator[None]:
    """Run a block inside a savepoint: its writes are undone if it raises."""
    conn.execute("SAVEPOINT ppml_op")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK TO ppml_op")
        conn.execute("RELEASE ppml_op")
        raise
    conn.execute("RELEASE ppml_op")


class _Pending:
    """One thread's work waiting for a shared write transaction."""

    __slots__ = ("done", "error", "result", "work")

    def __init__(self, work: Callable[[sqlite3.Connection], Any]) -> None:
        self.work = work
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None


class KeyDatabase:
    """An open key store file (its SQLite persistence). Thread-safe; several processes may open
    the same file."""

    def __init__(
        self, path: Path, *, new_store_id: Callable[[], bytes], on_create: OnCreate
    ) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._queue: list[_Pending] = []
        self._queue_lock = threading.Lock()
        self._conn: sqlite3.Connection | None = _connect(self.path)
        try:
            self.store_id = self._initialize(new_store_id, on_create)
            _make_private(self.path)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"KeyDatabase({str(self.path)!r})"

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``): committed if the block completes."""
        with self._transaction("BEGIN IMMEDIATE") as conn:
            yield conn

    def write_shared(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run `work` in a write transaction that it may share with other threads' work, and
        return its result once that transaction has committed (group commit: one durable
        commit for all the operations that queued up while the previous one was writing).

        Each work runs in its own savepoint: if it raises, its writes are undone, the others'
        are not, and the exception is raised in its own thread.
        """
        item = _Pending(work)
        with self._queue_lock:
            self._queue.append(item)
        with self._lock:
            if not item.done:
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                self._run_batch(batch)
        if item.error is not None:
            raise item.error
        return item.result  # type: ignore[no-any-return]

    def _run_batch(self, batch: list[_Pending]) -> None:
        try:
            with self._transaction("BEGIN IMMEDIATE") as conn:
                for item in batch:
                    try:
                        with savepoint(conn):
                            item.result = item.work(conn)
                    except BaseException as exc:
                        item.error = exc
        except BaseException as exc:
            for item in batch:
                if item.error is None:
                    item.result, item.error = None, exc
        finally:
            for item in batch:
                item.done = True

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one consistent snapshot for several queries."""
        with self._transaction("BEGIN") as conn:
            yield conn

    @contextlib.contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._conn is None:
                raise UsageError("the key store is closed")
            conn = self._conn
            try:
                conn.execute(begin)
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                _log.error("key store %s: %s: %s", self.path, type(exc).__name__, exc)
                raise ConfigurationError("the key store is unavailable", path=self.path) from None

    def _initialize(self, new_store_id: Callable[[], bytes], on_create: OnCreate) -> bytes:
        with self.read() as conn:
            version = _user_version(conn)
        if version == 0:
            with self.write() as conn:
                # Re-read under the write lock: another process may have created it meanwhile.
                if _user_version(conn) == 0:
                    _create_schema(conn, self.path, new_store_id, on_create)
            with self.read() as conn:
                version = _user_version(conn)
        if 0 < version < SCHEMA_VERSION:
            with self.write() as conn:
                # Re-read under the write lock: another process may have migrated it meanwhile.
                _migrate(conn, self.path)
            with self.read() as conn:
                version = _user_version(conn)
        if version != SCHEMA_VERSION:
            raise ConfigurationError(
                f"key store schema version {version} is not supported (expected {SCHEMA_VERSION})",
                path=self.path,
            )
        with self.read() as conn:
            store_id = get_meta(conn, "store_id")
        if store_id is None:
            raise ConfigurationError("the key store is incomplete", path=self.path)
        return store_id


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    version = _user_version(conn)
    while 0 < version < SCHEMA_VERSION:
        _log.info("key store %s: migrating schema %d to %d", path, version, version + 1)
        for statement in _MIGRATIONS[version]:
            conn.execute(statement)
        version += 1
        conn.execute(f"PRAGMA user_version = {version}")


def _create_schema(
    conn: sqlite3.Connection, path: Path, new_store_id: Callable[[], bytes], on_create: OnCreate
) -> None:
    if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
        raise ConfigurationError("not a ppml key store", path=path)
    for statement in _CURRENT_SCHEMA:
        conn.execute(statement)
    store_id = new_store_id()
    put_meta(conn, "store_id", store_id)
    on_create(conn, store_id)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _connect(path: Path) -> sqlite3.Connection:
    if not path.parent.is_dir():
        raise ConfigurationError("the key store's directory does not exist", path=path)
    try:
        # Create the file ourselves so it is private from the first byte; SQLite gives its
        # -wal and -shm files the same mode as the database file.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE)
        os.close(fd)
    except OSError as exc:
        raise ConfigurationError(f"cannot open the key store: {exc.strerror}", path=path) from None
    _make_private(path)
    conn = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        _enable_wal(conn, path)
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.DatabaseError as exc:
        conn.close()
        _log.error("key store %s: %s", path, exc)
        if _is_busy(exc):
            raise ConfigurationError("the key store is busy", path=path) from None
        raise ConfigurationError("not a ppml key store", path=path) from None
    except BaseException:
        conn.close()
        raise
    return conn


def _enable_wal(conn: sqlite3.Connection, path: Path) -> None:
    # Switching a new file to WAL takes an exclusive lock without calling the busy handler, so
    # a process that races another to create the store waits here instead.
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            break
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.005)
    if str(mode).lower() != "wal":
        raise ConfigurationError("the key store cannot use WAL mode here", path=path)


def _is_busy(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _make_private(path: Path) -> None:
    for name in (path.name, path.name + "-wal", path.name + "-shm"):
        candidate = path.with_name(name)
        try:
            if candidate.stat().st_mode & 0o077:
                os.chmod(candidate, PRIVATE_FILE_MODE)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConfigurationError(
                f"cannot make the key store private: {exc.strerror}", path=candidate
            ) from None


def get_meta(conn: sqlite3.Connection, name: str) -> bytes | None:
    row = conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
    return row[0] if row is not None and isinstance(row[0], bytes) else None


def put_meta(conn: sqlite3.Connection, name: str, value: bytes) -> None:
    conn.execute("INSERT INTO meta (name, value) VALUES (?, ?)", (name, value))


def insert_key(conn: sqlite3.Connection, name: str, created_at: str) -> None:
    conn.execute("INSERT INTO keys (name, created_at) VALUES (?, ?)", (name, created_at))


def insert_version(
    conn: sqlite3.Connection, name: str, version: int, wrapped: bytes, created_at: str
) -> None:
    conn.execute(
        "INSERT INTO key_versions (name, version, wrapped_kek, created_at) VALUES (?, ?, ?, ?)",
        (name, version, wrapped, created_at),
    )


def key_rows(conn: sqlite3.Connection, name: str | None = None) -> list[KeyRow]:
    """Named keys (all, or the one called `name`) with their versions, ordered by name."""
    rows = conn.execute(
        "SELECT k.name, k.created_at, v.version, v.created_at FROM keys k "
        "JOIN key_versions v ON v.name = k.name WHERE (?1 IS NULL OR k.name = ?1) "
        "ORDER BY k.name, v.version",
        (name,),
    ).fetchall()
    grouped: dict[str, tuple[str, list[tuple[int, str]]]] = {}
    for key_name, created_at, version, version_created_at in rows:
        grouped.setdefault(key_name, (created_at, []))[1].append((version, version_created_at))
    return [KeyRow(n, c, tuple(vs)) for n, (c, vs) in grouped.items()]


def upsert_rule(
    conn: sqlite3.Connection,
    key_name: str,
    *,
    tee: str,
    measurement: str,
    debug_ok: bool,
    min_tcb: str,
    created_at: str,
    mac: bytes,
    constraints: str = "{}",
) -> bool:
    """Insert a rule, or replace the key's rule for the same TEE and measurement; True if it
    replaced one."""
    replaced = (
        conn.execute(
            "SELECT 1 FROM release_rules WHERE key_name = ? AND tee = ? AND measurement = ?",
            (key_name, tee, measurement),
        ).fetchone()
        is not None
    )
    conn.execute(
        "INSERT OR REPLACE INTO release_rules "
        "(key_name, tee, measurement, debug_ok, min_tcb, created_at, mac, constraints) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (key_name, tee, measurement, int(debug_ok), min_tcb, created_at, mac, constraints),
    )
    return replaced


def delete_rules(conn: sqlite3.Connection, key_name: str, measurement: str | None) -> int:
    """Delete the key's rules for `measurement` (any TEE type; all rules when None); returns
    how many."""
    cursor = conn.execute(
        "DELETE FROM release_rules WHERE key_name = ?1 AND (?2 IS NULL OR measurement = ?2)",
        (key_name, measurement),
    )
    return int(cursor.rowcount)
