"""The KMS audit log: one record per key operation, hash-chained with HMAC-SHA256 and anchored.

Record n carries mac_n = HMAC(audit_key, mac_{n-1} || canonical_json(record n)), starting from a
genesis MAC bound to the key store's id, and a separately MACed head row holds the last sequence
number, its MAC and the version of the KMS state (`ppml.kms.state`) the log has reached:
`AuditLog.verify` detects an edited, inserted, deleted, reordered or truncated record. A rollback
of the whole file to an older copy of itself is consistent in itself; the KMS state counter
(`ppml.kms.state.StateCounter`, outside the file) detects one that undoes a state change, and
only storage the KMS cannot rewrite (an append-only copy, a remote log) guards the records in
between.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from hmac import compare_digest
from types import MappingProxyType
from typing import Any, Literal

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as _pyca_hmac

from ppml._internal.canonical import canonical_json
from ppml.errors import IntegrityError, PPMLError, UsageError
from ppml.kms.sqlite import KeyDatabase

__all__ = [
    "AuditEntry",
    "AuditHead",
    "AuditLog",
    "AuditVerification",
    "Outcome",
    "Refusal",
    "initialize_head",
]

Outcome = Literal["ok", "denied", "error"]

_MAC_BYTES = 32
_GENESIS_LABEL = b"ppml/kms/audit/genesis/v1\x00"
_HEAD_LABEL = b"ppml/kms/audit/head/v1\x00"
# Since key store schema 4 the head also binds the KMS state version; a head without one (a
# store not yet anchored, `ppml.kms.state`) carries the version-1 MAC.
_HEAD_LABEL_V2 = b"ppml/kms/audit/head/v2\x00"
_SELECT = "SELECT seq, ts, actor, op, key_name, version, outcome, detail, mac FROM audit"
_SELECT_HEAD = "SELECT seq, mac, head_mac, state_version FROM audit_head WHERE id = 1"

_log = logging.getLogger(__name__)


class Refusal(Exception):
    """Raised inside an audited operation: its writes are undone, a record with `outcome` and
    `detail` plus `reason` is appended, then `error` (what the caller may see) is raised."""

    def __init__(
        self,
        error: PPMLError,
        outcome: Outcome,
        reason: str,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(reason)
        self.error, self.outcome, self.reason = error, outcome, reason
        self.detail: Mapping[str, Any] = detail if detail is not None else {}

    def record_detail(self) -> dict[str, Any]:
        return {**self.detail, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audit record. `detail` never holds key material."""

    seq: int
    ts: _dt.datetime
    actor: str
    op: str
    key_name: str | None
    version: int | None
    outcome: str
    detail: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "ts": _timestamp(self.ts),
            "actor": self.actor,
            "op": self.op,
            "key_name": self.key_name,
            "version": self.version,
            "outcome": self.outcome,
            "detail": dict(self.detail),
        }


@dataclass(frozen=True, slots=True)
class AuditVerification:
    """The result of `AuditLog.verify`: `count` records checked good before the first problem."""

    ok: bool
    count: int
    first_bad_seq: int | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _timestamp(ts: _dt.datetime) -> str:
    return ts.astimezone(_dt.UTC).isoformat(timespec="microseconds")


def _mac(key: bytes, *parts: bytes) -> bytes:
    h = _pyca_hmac.HMAC(key, hashes.SHA256())
    for part in parts:
        h.update(part)
    return h.finalize()


def _genesis(audit_key: bytes, store_id: bytes) -> bytes:
    return _mac(audit_key, _GENESIS_LABEL, store_id)


def _head_mac(audit_key: bytes, seq: int, mac: bytes, state_version: int | None) -> bytes:
    if state_version is None:
        return _mac(audit_key, _HEAD_LABEL, seq.to_bytes(8, "big"), mac)
    return _mac(
        audit_key, _HEAD_LABEL_V2, seq.to_bytes(8, "big"), mac, state_version.to_bytes(8, "big")
    )


@dataclass(frozen=True, slots=True)
class AuditHead:
    """The log's verified head: the last record's sequence number and MAC, and the KMS state
    version the log has reached (None in a store not yet anchored)."""

    seq: int
    mac: bytes
    state_version: int | None


def _fields(row: tuple[Any, ...], detail: Any) -> dict[str, Any]:
    seq, ts, actor, op, key_name, version, outcome = row[:7]
    return {
        "seq": seq,
        "ts": ts,
        "actor": actor,
        "op": op,
        "key_name": key_name,
        "version": version,
        "outcome": outcome,
        "detail": detail,
    }


def initialize_head(conn: sqlite3.Connection, audit_key: bytes, store_id: bytes) -> bytes:
    """Anchor an empty log: the head points at sequence 0, the genesis MAC (returned) and
    state version 0."""
    genesis = _genesis(audit_key, store_id)
    conn.execute(
        "INSERT INTO audit_head (id, seq, mac, head_mac, state_version) VALUES (1, 0, ?, ?, 0)",
        (genesis, _head_mac(audit_key, 0, genesis, 0)),
    )
    return genesis


class AuditLog:
    """The audit records of one key store: appended by the key service, read and verified here."""

    def __init__(
        self, db: KeyDatabase, audit_key: bytes, *, guard: Callable[[], None] | None = None
    ) -> None:
        self._db = db
        self._key = audit_key
        self._guard = guard

    def __repr__(self) -> str:
        return f"AuditLog({str(self._db.path)!r})"

    def append(
        self,
        conn: sqlite3.Connection,
        *,
        ts: _dt.datetime,
        actor: str,
        op: str,
        key_name: str | None,
        version: int | None,
        outcome: Outcome,
        detail: Mapping[str, Any],
        state_version: int | None = None,
    ) -> AuditEntry:
        """Add a record inside the caller's write transaction (so it commits with the operation).

        `state_version` (for an operation that changed the KMS state) becomes the head's state
        version; by default it is kept.
        """
        head = self.head(conn)
        seq = head.seq + 1
        ts_text = _timestamp(ts)
        detail_obj = dict(detail)
        row = (seq, ts_text, actor, op, key_name, version, outcome)
        mac = _mac(self._key, head.mac, canonical_json(_fields(row, detail_obj)))
        if state_version is None:
            state_version = head.state_version
        conn.execute(
            "INSERT INTO audit (seq, ts, actor, op, key_name, version, outcome, detail, mac) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*row, canonical_json(detail_obj).decode(), mac),
        )
        conn.execute(
            "UPDATE audit_head SET seq = ?, mac = ?, head_mac = ?, state_version = ? WHERE id = 1",
            (seq, mac, _head_mac(self._key, seq, mac, state_version), state_version),
        )
        return AuditEntry(
            seq,
            _dt.datetime.fromisoformat(ts_text),
            actor,
            op,
            key_name,
            version,
            outcome,
            MappingProxyType(detail_obj),
        )

    def entries(self, limit: int | None = None, key_name: str | None = None) -> list[AuditEntry]:
        """The newest `limit` records (all by default), optionally of one key, oldest first."""
        if limit is not None and limit < 0:
            raise UsageError("the audit entry limit cannot be negative")
        with self._db.read() as conn:
            rows = conn.execute(
                _SELECT + " WHERE (?1 IS NULL OR key_name = ?1) ORDER BY seq DESC LIMIT ?2",
                (key_name, -1 if limit is None else limit),
            ).fetchall()
        return [self._entry(row) for row in reversed(rows)]

    def verify(self) -> AuditVerification:
        """Recompute the chain and check the head; stops at the first problem found."""
        if self._guard is not None:
            self._guard()
        with self._db.read() as conn:
            return self.verify_in(conn)

    def head(self, conn: sqlite3.Connection) -> AuditHead:
        """The head, checked against its MAC; `IntegrityError` if it is missing or forged."""
        row = conn.execute(_SELECT_HEAD).fetchone()
        if row is None or not self._head_ok(*row):
            _log.error("audit head of %s is missing or forged", self._db.path)
            raise IntegrityError("the audit log's head is missing or forged", path=self._db.path)
        return AuditHead(int(row[0]), bytes(row[1]), row[3])

    def record_mac(self, conn: sqlite3.Connection, seq: int) -> bytes | None:
        """The stored MAC of record `seq` (the genesis MAC for 0), None if there is none."""
        if seq == 0:
            return self._genesis()
        row = conn.execute("SELECT mac FROM audit WHERE seq = ?", (seq,)).fetchone()
        return row[0] if row is not None and isinstance(row[0], bytes) else None

    def last_seq(self, conn: sqlite3.Connection) -> int:
        """The highest sequence number stored (0 for none)."""
        row = conn.execute("SELECT max(seq) FROM audit").fetchone()
        return int(row[0]) if isinstance(row[0], int) else 0

    def verify_in(self, conn: sqlite3.Connection) -> AuditVerification:
        """`verify` inside the caller's transaction."""
        head = conn.execute(_SELECT_HEAD).fetchone()
        prev, count = self._genesis(), 0
        for row in conn.execute(_SELECT + " ORDER BY seq"):
            seq, expected = row[0], count + 1
            if seq > expected:
                return _bad(count, expected, f"record {expected} is missing")
            if seq < expected:
                return _bad(count, seq, f"record {seq} is out of sequence")
            mac = self._row_mac(prev, row)
            if mac is None or not compare_digest(mac, row[8]):
                return _bad(count, seq, f"record {seq} does not match its MAC")
            prev, count = mac, count + 1
        if head is None:
            return _bad(count, None, "the audit head is missing")
        if not self._head_ok(*head):
            return _bad(count, None, "the audit head does not match its MAC")
        head_seq, head_mac = int(head[0]), bytes(head[1])
        if head_seq > count:
            return _bad(count, count + 1, f"records {count + 1} to {head_seq} are missing")
        if head_seq < count or not compare_digest(head_mac, prev):
            return _bad(count, head_seq + 1, f"records after {head_seq} are not anchored")
        return AuditVerification(True, count, None, f"{count} records, chain and head intact")

    def _genesis(self) -> bytes:
        return _genesis(self._key, self._db.store_id)

    def _head_ok(self, seq: Any, mac: Any, head_mac: Any, state_version: Any = None) -> bool:
        if not (isinstance(seq, int) and 0 <= seq < 2**63):
            return False
        if not (isinstance(mac, bytes) and isinstance(head_mac, bytes)):
            return False
        if state_version is not None and not (
            isinstance(state_version, int) and 0 <= state_version < 2**63
        ):
            return False
        expected = _head_mac(self._key, seq, mac, state_version)
        return len(mac) == _MAC_BYTES and compare_digest(expected, head_mac)

    def _row_mac(self, prev: bytes, row: tuple[Any, ...]) -> bytes | None:
        """The MAC a record should carry, or None if it is malformed (so cannot be genuine)."""
        detail_text, stored = row[7], row[8]
        if not isinstance(detail_text, str) or not isinstance(stored, bytes):
            return None
        try:
            detail = json.loads(detail_text)
            # Only the canonical text is ever written: any other spelling was edited.
            if canonical_json(detail).decode() != detail_text:
                return None
            return _mac(self._key, prev, canonical_json(_fields(row, detail)))
        except (TypeError, ValueError):
            return None

    def _entry(self, row: tuple[Any, ...]) -> AuditEntry:
        try:
            seq, ts, actor, op, key_name, version, outcome, detail_text = row[:8]
            detail = json.loads(detail_text)
            if not isinstance(detail, dict):
                raise ValueError("detail is not an object")
            return AuditEntry(
                int(seq),
                _dt.datetime.fromisoformat(ts),
                str(actor),
                str(op),
                key_name,
                None if version is None else int(version),
                str(outcome),
                MappingProxyType(detail),
            )
        except (TypeError, ValueError):
            _log.error("audit record %r of %s is malformed", row[0], self._db.path)
            raise IntegrityError(path=self._db.path) from None


def _bad(count: int, seq: int | None, reason: str) -> AuditVerification:
    return AuditVerification(False, count, seq, reason)
