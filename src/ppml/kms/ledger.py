"""The KMS's shared core: one key database opened with the master key, its audit log and its
authenticated state, and the audited transaction every operation runs in.

The key service (`ppml.kms.service`), the release policies (`ppml.kms.release_policies`) and
the releases (`ppml.kms.releases`) are written over one `KeyLedger`: each of their operations
is a body run by `KeyLedger.run`, which checks the master key and the state first, commits the
operation's audit record with it (refusals included) and writes the next state record when the
operation changed a key or a rule.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from hmac import compare_digest
from pathlib import Path
from typing import Any, TypeVar

from ppml import names
from ppml._internal.clock import Clock, utc_now
from ppml.crypto.envelope import DATA_KEY_BYTES, WrappedKey, dek_aad, seal, unseal
from ppml.errors import (
    ConfigurationError,
    IntegrityError,
    KeyAccessError,
    KeyNotFound,
    KeyVersionNotFound,
    PPMLError,
)
from ppml.kms import sqlite as _sqlite
from ppml.kms import state as _state
from ppml.kms.audit import AuditEntry, AuditLog, Outcome, Refusal, initialize_head
from ppml.kms.master import MasterKey
from ppml.kms.state_guard import CheckedKey, StateError, StateGuard, StateVerification
from ppml.kms.stored_rules import StoredRules

__all__ = ["Body", "KeyLedger", "unknown_key"]

_NONCE_BYTES = 12
_STORE_ID_BYTES = 16

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

Body = Callable[[sqlite3.Connection, str], tuple[_T, int | None, Mapping[str, Any]]]
"""An operation's work inside its transaction, given the connection and the time (ISO text):
returns its result, the key version it concerned and the audit detail; raises `Refusal`."""


def unknown_key(
    name: str,
    reason: str = "unknown key",
    detail: Mapping[str, Any] | None = None,
    *,
    error: PPMLError | None = None,
) -> Refusal:
    """The refusal of an operation on a key that does not exist (`error`: what the caller sees
    instead of `KeyNotFound`)."""
    return Refusal(error or KeyNotFound(f"no key named {name!r}"), "denied", reason, detail)


class KeyLedger:
    """One key store file opened with the master key: its database, audit log, authenticated
    state and stored rules, and the audited transactions the KMS runs on them."""

    def __init__(
        self,
        db_path: Path,
        master: MasterKey,
        *,
        actor: str,
        clock: Clock = utc_now,
        random_bytes: Callable[[int], bytes] = os.urandom,
        counter_dir: Path | None = None,
    ) -> None:
        names.ACTOR.check(actor)
        self.actor, self._clock, self._random = actor, clock, random_bytes
        self._master = master
        self._master_ok = False

        def on_create(conn: sqlite3.Connection, store_id: bytes) -> None:
            _sqlite.put_meta(conn, "master_check", master.check_value(store_id))
            genesis = initialize_head(conn, master.audit_key, store_id)
            _state.write_record(
                conn, master.state_key, store_id, version=0, summary={}, audit_seq=0,
                audit_mac=genesis,
            )  # fmt: skip

        self.db = _sqlite.KeyDatabase(
            Path(db_path),
            new_store_id=lambda: self.random_exact(_STORE_ID_BYTES),
            on_create=on_create,
        )
        self.path = self.db.path
        self.audit = AuditLog(self.db, master.audit_key, guard=self.require_master_key)
        counter = (
            None
            if counter_dir is None
            else _state.StateCounter(counter_dir, master.state_key, self.db.store_id)
        )
        self.rules = StoredRules(master, self.db.store_id, self.path)
        self.state = StateGuard(
            self.db,
            self.audit,
            master.state_key,
            counter,
            append=self._append_ok,
            now=self.now,
            authenticates=self._authenticates,
        )

    def close(self) -> None:
        self.db.close()

    # -- reading -------------------------------------------------------------------------

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction whose state check failures surface as `IntegrityError`; the
        master key and the whole state are checked first."""
        self.require_master()
        with self.db.read() as conn, self.state.checked():
            yield conn

    def key(self, conn: sqlite3.Connection, name: str) -> CheckedKey:
        """One key's rows, checked against the authenticated state."""
        return self.state.key(conn, name)

    def existing_key(self, conn: sqlite3.Connection, name: str) -> CheckedKey:
        """`key`, for a key that must exist: else `KeyNotFound`."""
        key = self.state.key(conn, name)
        if not key.exists:
            raise KeyNotFound(f"no key named {name!r}")
        return key

    def verify_state(self) -> StateVerification:
        """`KeyService.verify_state`: the master key checked, then the whole state."""
        self.require_master_key()
        return self.state.verify()

    # -- operations ----------------------------------------------------------------------

    def run(self, op: str, key_name: str, version_asked: int | None, body: Body[_T]) -> _T:
        """Run `body` in one write transaction together with its audit record.

        A refusal rolls back whatever `body` wrote, but its audit record still commits; the
        result is returned (and the refusal raised) only once the record is durable. An
        operation that changes the state leaves a new state record (`StateGuard.advance`).
        """
        self.require_master()
        ts = self.now()
        changes_state = op in _state.STATE_OPS

        def work(
            conn: sqlite3.Connection,
        ) -> tuple[_T | None, Refusal | None, _state.StateRecord | None]:
            try:
                with _sqlite.savepoint(conn):
                    try:
                        value, version, detail = body(conn, ts.isoformat(timespec="microseconds"))
                    except StateError as exc:
                        raise Refusal(
                            exc.error(self.path),
                            "error",
                            "state check failed",
                            {"problem": exc.problem},
                        ) from None
                    if changes_state:
                        record = self.state.advance(conn, ts, op, key_name, version, detail)
                        return value, None, record
            except Refusal as exc:
                self.append(conn, ts, op, key_name, version_asked, exc.outcome, exc.record_detail())
                return None, exc, None
            self.append(conn, ts, op, key_name, version, "ok", detail)
            return value, None, None

        # Group commit: concurrent operations share one durable commit.
        value, refusal, record = self.db.write_shared(work)
        if refusal is not None:
            _log.info("kms %s %r by %s: %s", op, key_name, self.actor, refusal.reason)
            raise refusal.error from None
        if record is not None:
            self.state.committed(record)
        return value  # type: ignore[return-value]  # None only together with a refusal

    def append(
        self, conn: sqlite3.Connection, ts: _dt.datetime, op: str, key_name: str | None,
        version: int | None, outcome: Outcome, detail: Mapping[str, Any], *,
        state_version: int | None = None,
    ) -> AuditEntry:  # fmt: skip
        """Append an audit record of this ledger's actor inside the caller's transaction."""
        return self.audit.append(
            conn,
            ts=ts,
            actor=self.actor,
            op=op,
            key_name=key_name,
            version=version,
            outcome=outcome,
            detail=detail,
            state_version=state_version,
        )

    def _append_ok(
        self, conn: sqlite3.Connection, ts: _dt.datetime, op: str, key_name: str | None,
        version: int | None, detail: Mapping[str, Any], *, state_version: int,
    ) -> None:  # fmt: skip
        self.append(conn, ts, op, key_name, version, "ok", detail, state_version=state_version)

    # -- the master key ------------------------------------------------------------------

    def require_master(self) -> None:
        """Check the master key against the store, then (once) the whole state."""
        if self._master_ok:
            return
        self.require_master_key()
        self.state.open()
        self._master_ok = True

    def require_master_key(self) -> None:
        """Check the master key against the store only (the audit log's own verification)."""
        with self.db.read() as conn:
            stored = _sqlite.get_meta(conn, "master_check")
        expected = self._master.check_value(self.db.store_id)
        if stored is None or not compare_digest(stored, expected):
            _log.warning("the master key given does not open key store %s", self.path)
            raise KeyAccessError("the master key does not open this key store", path=self.path)

    def _authenticates(self, key: CheckedKey) -> bool:
        if not key.exists or not key.rows.versions or not self.rules.policy(key).intact:
            return False
        for row in key.rows.versions:
            try:
                self._master.open_kek(key.name, row[1], row[2])
            except (IntegrityError, TypeError, ValueError, AttributeError, OverflowError):
                return False
        return True

    # -- time and randomness -------------------------------------------------------------

    def now(self) -> _dt.datetime:
        ts = self._clock()
        if ts.tzinfo is None or ts.utcoffset() is None:
            raise ConfigurationError("the clock must return timezone-aware times")
        return ts.astimezone(_dt.UTC)

    def random_exact(self, n: int) -> bytes:
        data = self._random(n)
        if not isinstance(data, bytes) or len(data) != n:
            raise ConfigurationError("the random source returned the wrong number of bytes")
        return data

    # -- key-encryption keys and data keys -----------------------------------------------

    @staticmethod
    def current_version(key: CheckedKey) -> int:
        version = key.current_version
        if version is None:
            raise unknown_key(key.name)
        return version

    def add_version(self, conn: sqlite3.Connection, name: str, version: int, now: str) -> None:
        kek = self.random_exact(DATA_KEY_BYTES)
        nonce = self.random_exact(_NONCE_BYTES)
        blob = self._master.seal_kek(name, version, kek, nonce=nonce)
        _sqlite.insert_version(conn, name, version, blob, now)

    def _kek(self, key: CheckedKey, version: int) -> bytes:
        name = key.name
        blob = key.wrapped_kek(version)
        if blob is None:
            if not key.exists:
                raise unknown_key(name)
            raise Refusal(
                KeyVersionNotFound(f"key {name!r} has no version {version}"),
                "denied",
                "unknown version",
            )
        try:
            return self._master.open_kek(name, version, blob)
        except IntegrityError:
            # The master key was checked already, so the stored KEK itself was altered.
            _log.error("stored key %r version %d failed authentication", name, version)
            raise Refusal(
                IntegrityError(path=self.path),
                "error",
                "stored key-encryption key failed authentication",
            ) from None

    def wrap_dek(self, key: CheckedKey, version: int, dek: bytes) -> WrappedKey:
        kek = self._kek(key, version)
        nonce = self.random_exact(_NONCE_BYTES)
        name = key.name
        return WrappedKey(name, version, seal(kek, dek, dek_aad(name, version), nonce=nonce))

    def unwrap_dek(self, key: CheckedKey, wrapped: WrappedKey) -> bytes:
        kek = self._kek(key, wrapped.version)
        try:
            return unseal(kek, wrapped.blob, wrapped.aad())
        except IntegrityError:
            raise Refusal(
                IntegrityError(), "error", "wrapped data key failed authentication"
            ) from None
