"""The KMS state record: every row that decides a release or a key, authenticated as one whole.

A release is decided by rows anyone who can write the key store file could edit with sqlite3:
the keys, their versions (the newest is the current one) and the release rules. Each row alone
can be authenticated (a wrapped key-encryption key is AES-GCM sealed, a rule carries a MAC), but
a row that was deleted, or an old row put back, authenticates as well as it ever did. So the
key service keeps one more row, the state record:

    version   a counter, raised by one by every operation that changes a key or a rule
    summary   for each key name: SHA-256 of its key row, of its version rows, of its rule rows
    audit_seq, audit_mac   the audit record that made this version (the chain's MAC there)
    mac       HMAC-SHA256 under a key derived from the master key over all of the above

and the audit log's head (itself MACed) carries the same version. On open the service recomputes
the summary from the rows, checks the record's MAC, that the audit head agrees on the version,
that the audit record named is in the chain, and that no record follows the audit head; during
operation every key's rows are compared with the summary before they are used. A deleted,
re-inserted or edited row, or a state record older than the audit log, is refused.

A copy of the whole file (state, rows and audit log together) from an earlier time is consistent
in itself; `StateCounter` keeps the newest state version in a file outside the key store (per
user, not in the workspace), so such a rollback is detected unless that file is rolled back too.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from hmac import compare_digest
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as _pyca_hmac

from ppml._internal.canonical import canonical_json
from ppml._internal.fs import ensure_private_dir, locked, state_root, write_private
from ppml.errors import ConfigurationError, IntegrityError

__all__ = [
    "STATE_OPS",
    "KeyDigests",
    "KeyRows",
    "StateCounter",
    "StateRecord",
    "counter_directory",
    "key_digests",
    "read_key_rows",
    "read_record",
    "read_version",
    "record_mac",
    "rules_by_key",
    "rules_digest",
    "scan",
    "write_record",
]

# The audited operations that change the state (when their outcome is ok).
STATE_OPS = frozenset(
    {"create", "rotate", "policy_allow", "policy_set", "policy_revoke", "state_anchor"}
)
_RECORD_LABEL = b"ppml/kms/state/v1\x00"
_COUNTER_LABEL = b"ppml/kms/state-counter/v1\x00"
_COUNTER_FORMAT = "ppml-kms-counter/1"
_MAX_COUNTER_BYTES = 4096

_SELECT_RECORD = "SELECT version, summary, audit_seq, audit_mac, mac FROM state_head WHERE id = 1"
# Every column of the rows that decide a release or a key, in a fixed order.
_KEYS = "SELECT name, created_at FROM keys"
_VERSIONS = "SELECT name, version, wrapped_kek, created_at FROM key_versions"
_RULES = (
    "SELECT key_name, tee, measurement, debug_ok, min_tcb, created_at, mac, constraints "
    "FROM release_rules"
)

_log = logging.getLogger(__name__)


def counter_directory() -> Path:
    """Where the state counters live: ``$XDG_STATE_HOME/ppml/kms``, else
    ``~/.local/state/ppml/kms``; outside every workspace, hidden from attested workloads."""
    return state_root() / "kms"


@dataclass(frozen=True, slots=True)
class KeyDigests:
    """SHA-256 (hex) of one key's key row, version rows and rule rows."""

    key: str
    versions: str
    rules: str

    def as_list(self) -> list[str]:
        return [self.key, self.versions, self.rules]


@dataclass(frozen=True, slots=True)
class KeyRows:
    """One key's rows as stored (values unchecked; `digests` covers them exactly)."""

    name: str
    key: tuple[Any, ...] | None
    versions: tuple[tuple[Any, ...], ...]
    rules: tuple[tuple[Any, ...], ...]

    @property
    def digests(self) -> KeyDigests:
        return key_digests(self.key, self.versions, self.rules)

    def differences(self, expected: KeyDigests | None) -> list[str]:
        """What about this key differs from `expected` (the summary's entry), in words."""
        if expected is None:
            return [f"key {self.name!r} is not in the authenticated state"]
        got = self.digests
        parts = []
        if got.key != expected.key:
            parts.append("is missing" if self.key is None else "its key row differs")
        if got.versions != expected.versions:
            parts.append("its versions differ")
        if got.rules != expected.rules:
            parts.append("its release rules differ")
        return [f"key {self.name!r}: " + ", ".join(parts)] if parts else []


@dataclass(frozen=True, slots=True)
class StateRecord:
    """The state record as stored (its MAC unchecked until `check`)."""

    version: int
    summary: Mapping[str, KeyDigests]
    summary_bytes: bytes
    audit_seq: int
    audit_mac: bytes
    mac: bytes

    def check(self, mac_key: bytes, store_id: bytes) -> bool:
        expected = record_mac(
            mac_key, store_id, self.version, self.summary_bytes, self.audit_seq, self.audit_mac
        )
        return compare_digest(expected, self.mac)


def _digest(rows: Any) -> str:
    """SHA-256 of rows of SQLite values, each value framed by its type and length, so that two
    different sequences of rows never hash alike (a text '1' is not the integer 1)."""
    h = hashlib.sha256()
    for row in rows:
        h.update(b"r%d;" % len(row))
        for v in row:
            if v is None:
                h.update(b"n;")
            elif isinstance(v, int):
                h.update(b"i%d;" % v)
            elif isinstance(v, str):
                data = v.encode("utf-8", "surrogatepass")
                h.update(b"s%d:" % len(data))
                h.update(data)
            elif isinstance(v, bytes):
                h.update(b"b%d:" % len(v))
                h.update(v)
            else:
                h.update(b"f" + repr(v).encode() + b";")
    return h.hexdigest()


def key_digests(
    key: tuple[Any, ...] | None,
    versions: tuple[tuple[Any, ...], ...],
    rules: tuple[tuple[Any, ...], ...],
) -> KeyDigests:
    return KeyDigests(_digest([] if key is None else [key]), _digest(versions), _digest(rules))


def _name(v: Any) -> str:
    # A row whose name is not text was written by something other than the key service; it
    # gets a name no key can have, so it never matches the summary.
    return v if isinstance(v, str) else "\x00" + repr(v)


def read_key_rows(conn: sqlite3.Connection, name: str) -> KeyRows:
    """The rows of the key called `name` (none: a KeyRows with no key row)."""
    key = conn.execute(_KEYS + " WHERE name = ?", (name,)).fetchall()
    versions = conn.execute(_VERSIONS + " WHERE name = ? ORDER BY version", (name,)).fetchall()
    rules = conn.execute(
        _RULES + " WHERE key_name = ? ORDER BY tee, measurement", (name,)
    ).fetchall()
    return KeyRows(name, _one_key_row(key), tuple(map(tuple, versions)), tuple(map(tuple, rules)))


def _one_key_row(rows: list[Any]) -> tuple[Any, ...] | None:
    """A key's row: None when it has none; a row no key has when there are several (the
    primary key forbids it; a file edited without it could hold two)."""
    if len(rows) > 1:
        return ("\x00duplicate",)
    return tuple(rows[0]) if rows else None


def rules_by_key(conn: sqlite3.Connection) -> dict[str, tuple[tuple[Any, ...], ...]]:
    """Every release rule row, by key name (as `read_key_rows` orders them)."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    for row in conn.execute(_RULES + " ORDER BY tee, measurement"):
        out.setdefault(_name(row[0]), []).append(tuple(row))
    return {name: tuple(rows) for name, rows in sorted(out.items())}


def rules_digest(rules: tuple[tuple[Any, ...], ...]) -> str:
    return _digest(rules)


def scan(conn: sqlite3.Connection) -> dict[str, KeyRows]:
    """Every key's rows, by name (rows of an unknown key's name included)."""
    keys: dict[str, list[tuple[Any, ...]]] = {}
    versions: dict[str, list[tuple[Any, ...]]] = {}
    rules: dict[str, list[tuple[Any, ...]]] = {}
    for row in conn.execute(_KEYS):
        keys.setdefault(_name(row[0]), []).append(tuple(row))
    for row in conn.execute(_VERSIONS + " ORDER BY version"):
        versions.setdefault(_name(row[0]), []).append(tuple(row))
    for row in conn.execute(_RULES + " ORDER BY tee, measurement"):
        rules.setdefault(_name(row[0]), []).append(tuple(row))
    out: dict[str, KeyRows] = {}
    for name in sorted(set(keys) | set(versions) | set(rules)):
        out[name] = KeyRows(
            name,
            _one_key_row(keys.get(name, [])),
            tuple(versions.get(name, [])),
            tuple(rules.get(name, [])),
        )
    return out


def summary_of(rows: Mapping[str, KeyRows]) -> dict[str, KeyDigests]:
    return {name: r.digests for name, r in rows.items()}


def summary_bytes(summary: Mapping[str, KeyDigests]) -> bytes:
    return canonical_json({name: d.as_list() for name, d in sorted(summary.items())})


def differences(rows: Mapping[str, KeyRows], summary: Mapping[str, KeyDigests]) -> list[str]:
    """Every way the stored rows differ from the authenticated summary, in words."""
    found: list[str] = []
    for name, r in rows.items():
        found.extend(r.differences(summary.get(name)))
    for name in sorted(set(summary) - set(rows)):
        found.append(f"key {name!r}: all its rows are missing")
    return found


def record_mac(
    mac_key: bytes, store_id: bytes, version: int, summary: bytes, audit_seq: int, audit_mac: bytes
) -> bytes:
    h = _pyca_hmac.HMAC(mac_key, hashes.SHA256())
    h.update(_RECORD_LABEL + store_id)
    h.update(version.to_bytes(8, "big"))
    h.update(hashlib.sha256(summary).digest())
    h.update(audit_seq.to_bytes(8, "big"))
    h.update(audit_mac)
    return h.finalize()


def read_version(conn: sqlite3.Connection) -> tuple[int, bytes] | None:
    """The state record's version and MAC only (to compare with one verified already)."""
    row = conn.execute("SELECT version, mac FROM state_head WHERE id = 1").fetchone()
    if row is None or not isinstance(row[0], int) or not isinstance(row[1], bytes):
        return None
    return int(row[0]), bytes(row[1])


def read_record(conn: sqlite3.Connection) -> StateRecord | None:
    """The state record, or None if there is none. `IntegrityError` if it is malformed."""
    row = conn.execute(_SELECT_RECORD).fetchone()
    if row is None:
        return None
    version, summary, audit_seq, audit_mac, mac = row
    try:
        if not (isinstance(version, int) and 0 <= version < 2**63):
            raise ValueError("version")
        if not (isinstance(audit_seq, int) and 0 <= audit_seq < 2**63):
            raise ValueError("audit_seq")
        if not all(isinstance(v, bytes) for v in (summary, audit_mac, mac)):
            raise ValueError("types")
        doc = json.loads(summary)
        if not isinstance(doc, dict):
            raise ValueError("summary")
        parsed = {}
        for name, digests in doc.items():
            if not (isinstance(digests, list) and len(digests) == 3):
                raise ValueError("summary entry")
            if not all(isinstance(d, str) for d in digests):
                raise ValueError("summary entry")
            parsed[name] = KeyDigests(*digests)
    except (TypeError, ValueError):
        raise IntegrityError("the KMS state record is malformed") from None
    return StateRecord(version, parsed, summary, audit_seq, audit_mac, mac)


def write_record(
    conn: sqlite3.Connection,
    mac_key: bytes,
    store_id: bytes,
    *,
    version: int,
    summary: Mapping[str, KeyDigests],
    audit_seq: int,
    audit_mac: bytes,
) -> StateRecord:
    data = summary_bytes(summary)
    mac = record_mac(mac_key, store_id, version, data, audit_seq, audit_mac)
    conn.execute(
        "INSERT OR REPLACE INTO state_head (id, version, summary, audit_seq, audit_mac, mac) "
        "VALUES (1, ?, ?, ?, ?, ?)",
        (version, data, audit_seq, audit_mac, mac),
    )
    return StateRecord(version, dict(summary), data, audit_seq, audit_mac, mac)


class StateCounter:
    """The newest state version a key store reached, kept in a file outside it (MACed, so it
    cannot be raised to lock the store out without the master key, only deleted).

    `check` refuses a store whose state is older than the counter; `advance` raises the
    counter (never lowers it: several processes may commit in any order).
    """

    def __init__(self, directory: Path, mac_key: bytes, store_id: bytes) -> None:
        self.path = Path(directory) / f"{store_id.hex()}.counter"
        self._key = mac_key
        self._store_id = store_id

    def __repr__(self) -> str:
        return f"StateCounter({str(self.path)!r})"

    def _mac(self, version: int) -> str:
        h = _pyca_hmac.HMAC(self._key, hashes.SHA256())
        h.update(_COUNTER_LABEL + self._store_id + version.to_bytes(8, "big"))
        return h.finalize().hex()

    @property
    def _lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def read(self, *, locked: bool = False) -> int | None:
        """The counter's version, None when there is no counter file yet. A counter deleted
        after it was written (its lock file remains) is an `IntegrityError`. `locked`: the
        caller holds the lock (so a missing counter is simply missing)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            if locked or not os.path.lexists(self._lock_path):
                return None
            if not self._being_made():
                raise IntegrityError(
                    "the KMS state counter was deleted (its lock file remains)", path=self.path
                ) from None
            return self.read()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the KMS state counter: {exc.strerror}", path=self.path
            ) from None
        with os.fdopen(fd, "rb") as fh:
            data = fh.read(_MAX_COUNTER_BYTES + 1)
        try:
            doc = json.loads(data)
            version = doc["version"]
            ok = (
                len(data) <= _MAX_COUNTER_BYTES
                and doc.get("format") == _COUNTER_FORMAT
                and doc.get("store_id") == self._store_id.hex()
                and isinstance(version, int)
                and 0 <= version < 2**63
                and isinstance(doc.get("mac"), str)
                and compare_digest(self._mac(version), doc["mac"])
            )
        except (ValueError, TypeError, KeyError):
            ok = False
        if not ok:
            raise IntegrityError("the KMS state counter was altered", path=self.path)
        return int(version)

    def _being_made(self) -> bool:
        """Whether the counter appears once the process writing it (holding the lock) is done:
        the lock file is made just before the first counter."""
        try:
            fd = os.open(self._lock_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            return os.path.lexists(self.path)
        finally:
            os.close(fd)

    def check(self, version: int) -> None:
        """Refuse a state older than the counter."""
        counted = self.read()
        if counted is not None and version < counted:
            raise IntegrityError(
                f"the key store was rolled back: its state is version {version}, but it had "
                f"reached version {counted}",
                path=self.path,
            )

    def advance(self, version: int) -> None:
        """Raise the counter to `version` if it is lower."""
        ensure_private_dir(self.path.parent)
        with locked(self._lock_path):
            try:
                current = self.read(locked=True)
            except IntegrityError:
                current = None  # an altered counter is replaced by a genuine one
            if current is not None and current >= version:
                return
            doc = {
                "format": _COUNTER_FORMAT,
                "store_id": self._store_id.hex(),
                "version": version,
                "mac": self._mac(version),
            }
            write_private(self.path, canonical_json(doc))
