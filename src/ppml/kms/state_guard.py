"""The key service's guard over the authenticated state (`ppml.kms.state`): checks every row it
uses against the state record, checks the record against the audit log and the state counter,
and writes the next record with each operation that changes the state."""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from hmac import compare_digest
from pathlib import Path
from typing import Any, Protocol

from ppml.errors import IntegrityError
from ppml.kms import state as _state
from ppml.kms.audit import AuditLog
from ppml.kms.sqlite import KeyDatabase

__all__ = ["AppendRecord", "CheckedKey", "StateError", "StateGuard", "StateVerification"]

_log = logging.getLogger(__name__)
_Known = tuple[int, bytes, Mapping[str, _state.KeyDigests]]


@dataclass(frozen=True, slots=True)
class StateVerification:
    """The result of `KeyService.verify_state`."""

    ok: bool
    version: int | None
    keys: int
    counter: int | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StateError(Exception):
    """The stored rows disagree with the authenticated KMS state (`problem` says how)."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem

    def error(self, path: Path) -> IntegrityError:
        return IntegrityError(f"KMS state check failed: {self.problem}", path=path)


@dataclass(frozen=True, slots=True)
class CheckedKey:
    """One key's rows, checked against the authenticated state (its key row and versions; its
    rules only in `rules_intact`, so that an altered policy denies instead of failing)."""

    rows: _state.KeyRows
    rules_intact: bool

    @property
    def name(self) -> str:
        return self.rows.name

    @property
    def exists(self) -> bool:
        return self.rows.key is not None

    @property
    def current_version(self) -> int | None:
        versions = [v[1] for v in self.rows.versions if isinstance(v[1], int)]
        return max(versions) if versions else None

    def wrapped_kek(self, version: int) -> bytes | None:
        for row in self.rows.versions:
            if row[1] == version and isinstance(row[2], bytes):
                return row[2]
        return None


class AppendRecord(Protocol):
    """Appends an audit record of the key service's actor inside the caller's transaction."""

    def __call__(
        self, conn: sqlite3.Connection, ts: _dt.datetime, op: str, key_name: str | None,
        version: int | None, detail: Mapping[str, Any], *, state_version: int,
    ) -> None: ...  # fmt: skip


KeyAuthenticates = Callable[[CheckedKey], bool]
"""Whether a key's rows authenticate on their own (its KEKs unseal, its rules carry their
MACs): checked for every key before a store from before state records is anchored."""


class StateGuard:
    """The authenticated state of one key database, as this process has verified it."""

    def __init__(
        self,
        db: KeyDatabase,
        audit: AuditLog,
        state_key: bytes,
        counter: _state.StateCounter | None,
        *,
        append: AppendRecord,
        now: Callable[[], _dt.datetime],
        authenticates: KeyAuthenticates,
    ) -> None:
        self._db, self._audit, self._key = db, audit, state_key
        self.counter = counter
        self._append, self._now, self._authenticates = append, now, authenticates
        # (version, mac, summary) of the newest state record verified in full.
        self._verified: _Known | None = None
        self._written: _Known | None = None

    # -- reading -------------------------------------------------------------------------

    @contextlib.contextmanager
    def checked(self) -> Iterator[None]:
        """Turn a state check failure into the `IntegrityError` a caller sees (exit 3)."""
        try:
            yield
        except StateError as exc:
            _log.error("key store %s: KMS state check failed: %s", self._db.path, exc.problem)
            raise exc.error(self._db.path) from None

    def failure(self, problem: str) -> IntegrityError:
        """The error of a state check that failed outside `checked` (logged)."""
        _log.error("key store %s: KMS state check failed: %s", self._db.path, problem)
        return StateError(problem).error(self._db.path)

    def summary(
        self, conn: sqlite3.Connection, *, full: bool = False
    ) -> Mapping[str, _state.KeyDigests]:
        """The authenticated summary of every key (`StateError` if the store disagrees).

        The state record is read on every call; only a record not yet verified (another
        process changed the state, or `full`) is checked in full against every row.
        """
        verified = self._verified
        if not full:
            head = _state.read_version(conn)
            # The record verified last, or the one this service wrote itself (in a transaction
            # not committed yet, or committed and not remembered yet).
            for known in (verified, self._written):
                if (
                    head is not None
                    and known is not None
                    and head[0] == known[0]
                    and compare_digest(head[1], known[1])
                ):
                    return known[2]
        record = _state.read_record(conn)
        if record is None:
            raise StateError("the state record is missing")
        if verified is not None and record.version < verified[0]:
            raise StateError(f"the state went back from version {verified[0]} to {record.version}")
        self._check_record(conn, record)
        problems = _state.differences(_state.scan(conn), record.summary)
        if problems:
            more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
            shown = "; ".join(problems[:3]) + more
            raise StateError(f"{shown}, against state version {record.version}")
        self.remember(record)
        return record.summary

    def remember(self, record: _state.StateRecord) -> None:
        """Take `record` (checked, or written by this service and committed) as verified."""
        verified = self._verified
        if verified is None or record.version >= verified[0]:
            self._verified = (record.version, record.mac, record.summary)

    def _check_record(self, conn: sqlite3.Connection, record: _state.StateRecord) -> None:
        if not record.check(self._key, self._db.store_id):
            raise StateError("the state record does not match its MAC")
        try:
            head = self._audit.head(conn)
        except IntegrityError:
            raise StateError("the audit log's head is missing or forged") from None
        if head.state_version != record.version:
            raise StateError(
                f"the state record is version {record.version}, but the audit log reached "
                f"version {head.state_version}: the state was rolled back or replaced"
            )
        if self._audit.last_seq(conn) != head.seq:
            raise StateError(
                f"the audit log holds records after its head (record {head.seq}): the head was "
                "rolled back"
            )
        last = self._audit.record_mac(conn, head.seq)
        if last is None or not compare_digest(last, head.mac):
            raise StateError(f"audit record {head.seq} does not match the audit log's head")
        made_by = self._audit.record_mac(conn, record.audit_seq)
        if made_by is None or not compare_digest(made_by, record.audit_mac):
            raise StateError(
                f"audit record {record.audit_seq}, which made state version {record.version}, "
                "is missing or altered"
            )
        if self.counter is not None:
            try:
                self.counter.check(record.version)
            except IntegrityError as exc:
                raise StateError(f"{exc.message} (counter: {self.counter.path})") from exc

    def key(self, conn: sqlite3.Connection, name: str) -> CheckedKey:
        """One key's rows, checked against the authenticated state."""
        summary = self.summary(conn)
        rows = _state.read_key_rows(conn, name)
        expected = summary.get(name)
        if expected is None:
            if rows.key is None and not rows.versions and not rows.rules:
                return CheckedKey(rows, True)
            raise StateError(f"key {name!r} is not in the authenticated state")
        got = rows.digests
        if got.key != expected.key or got.versions != expected.versions:
            raise StateError("; ".join(rows.differences(expected)))
        return CheckedKey(rows, got.rules == expected.rules)

    @staticmethod
    def rows_now(conn: sqlite3.Connection, name: str) -> CheckedKey:
        """One key's rows as this transaction just wrote them (not yet in the state record)."""
        return CheckedKey(_state.read_key_rows(conn, name), True)

    # -- writing -------------------------------------------------------------------------

    def advance(
        self, conn: sqlite3.Connection, ts: _dt.datetime, op: str, key_name: str,
        version: int | None, detail: Mapping[str, Any],
    ) -> _state.StateRecord:  # fmt: skip
        """Record a state change of one key: its audit record, then the new state record, whose
        summary is the verified one with that key's digests taken from its rows as the
        operation left them. The other keys' digests are carried over, never recomputed from
        their rows: an edit of another key's rows stays detected, it is not taken in."""
        summary = dict(self.summary(conn))
        version_now = _state.read_version(conn)
        assert version_now is not None  # `summary` checked the record in this transaction
        new_version = version_now[0] + 1
        summary[key_name] = _state.read_key_rows(conn, key_name).digests
        record = self._write(
            conn, ts, op, key_name, version, {**detail, "state": new_version}, summary, new_version
        )
        self._written = (record.version, record.mac, record.summary)
        return record

    def committed(self, record: _state.StateRecord) -> None:
        """The transaction that wrote `record` committed: remember it, advance the counter."""
        self.remember(record)
        if self.counter is not None:
            self.counter.advance(record.version)

    def _write(
        self,
        conn: sqlite3.Connection,
        ts: _dt.datetime,
        op: str,
        key_name: str | None,
        version: int | None,
        detail: Mapping[str, Any],
        summary: Mapping[str, _state.KeyDigests],
        new_version: int,
    ) -> _state.StateRecord:
        """The audit record of a state change (its head then bound to `new_version`), and
        the state record that names it."""
        self._append(conn, ts, op, key_name, version, detail, state_version=new_version)
        head = self._audit.head(conn)
        return _state.write_record(
            conn,
            self._key,
            self._db.store_id,
            version=new_version,
            summary=summary,
            audit_seq=head.seq,
            audit_mac=head.mac,
        )

    # -- opening -------------------------------------------------------------------------

    def open(self) -> None:
        """On first use: anchor a store made before state records existed, then check the
        whole state once."""
        with self._db.read() as conn:
            missing = _state.read_record(conn) is None
        if missing:
            with self._db.write() as conn:
                if _state.read_record(conn) is None:
                    self._anchor(conn)
        with self._db.read() as conn, self.checked():
            self.summary(conn, full=True)
            version = _state.read_version(conn)
        if self.counter is not None and version is not None and self.counter.read() is None:
            self.counter.advance(version[0])  # protection from this open on, not the next change

    def _anchor(self, conn: sqlite3.Connection) -> None:
        """Give a store from before schema 4 its first state record (version 1), once: only
        if its audit log never had one, its chain is intact and every stored rule and key
        authenticates."""
        head = self._audit.head(conn)
        if head.state_version is not None:
            raise self.failure("the state record is missing")
        verification = self._audit.verify_in(conn)
        if not verification.ok:
            raise self.failure(
                f"the audit log is broken ({verification.reason}): not anchoring its state"
            )
        rows = _state.scan(conn)
        for name, key in rows.items():
            if not self._authenticates(CheckedKey(key, True)):
                raise self.failure(f"key {name!r} does not authenticate: not anchoring")
        detail = {"state": 1, "keys": len(rows)}
        summary = _state.summary_of(rows)
        record = self._write(conn, self._now(), "state_anchor", None, None, detail, summary, 1)
        _log.info("key store %s: state anchored at version 1 (%d keys)", self._db.path, len(rows))
        if self.counter is not None:
            self.counter.advance(record.version)

    def verify(self) -> StateVerification:
        """Check every row against the state record, the record against the audit log and the
        state counter; never raises for what it finds (the caller checked the master key)."""
        counter: int | None = None
        try:
            if self.counter is not None:
                counter = self.counter.read()
            self.open()  # anchors a store that has no record yet, checks every row
            with self._db.read() as conn:
                summary = self.summary(conn)  # the record just checked
                record = _state.read_record(conn)
        except StateError as exc:
            return StateVerification(False, None, 0, counter, exc.problem)
        except IntegrityError as exc:
            reason = exc.message.removeprefix("KMS state check failed: ")
            return StateVerification(False, None, 0, counter, reason)
        assert record is not None
        if self.counter is not None:
            counter = self.counter.read()
        return StateVerification(
            True,
            record.version,
            len(summary),
            counter,
            f"state version {record.version}: {len(summary)} keys, every row authenticated",
        )
