"""The embedded KMS: named, versioned key-encryption keys under a master key, the data keys they
wrap, and each key's release policy; every operation, refused ones included, is recorded in the
audit log. The release policies are `ppml.kms.release_policies`, the releases (the key broker's
primitives) `ppml.kms.releases`; all three work on one `ppml.kms.ledger.KeyLedger`."""

from __future__ import annotations

import datetime as _dt
import os
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ppml._internal.clock import Clock, utc_now
from ppml.crypto.envelope import DATA_KEY_BYTES, DataKey, WrappedKey, validate_key_name
from ppml.errors import KeyExists, UsageError
from ppml.kms import sqlite as _sqlite
from ppml.kms.audit import AuditLog, Refusal
from ppml.kms.ledger import KeyLedger
from ppml.kms.master import MasterKey
from ppml.kms.release_policies import ReleasePolicies
from ppml.kms.releases import KeyReleases
from ppml.kms.state_guard import CheckedKey, StateVerification

__all__ = ["KeyInfo", "KeyService", "KeyVersionInfo"]

_MAX_VERSION = 2**32 - 1


@dataclass(frozen=True, slots=True)
class KeyVersionInfo:
    """One version of a named key (metadata only)."""

    version: int
    created_at: _dt.datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "created_at": self.created_at.isoformat(timespec="microseconds"),
        }


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """A named key: when it was created, its current (newest) version and all its versions."""

    name: str
    created_at: _dt.datetime
    current_version: int
    versions: tuple[KeyVersionInfo, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "created_at": self.created_at.isoformat(timespec="microseconds"),
            "current_version": self.current_version,
            "versions": [v.to_dict() for v in self.versions],
        }


def _info(row: _sqlite.KeyRow) -> KeyInfo:
    versions = tuple(KeyVersionInfo(v, _dt.datetime.fromisoformat(c)) for v, c in row.versions)
    return KeyInfo(
        row.name, _dt.datetime.fromisoformat(row.created_at), versions[-1].version, versions
    )


def _checked_info(key: CheckedKey) -> KeyInfo:
    name, created_at = key.rows.key or (key.name, "")
    versions = tuple(
        KeyVersionInfo(int(v), _dt.datetime.fromisoformat(c)) for _, v, _, c in key.rows.versions
    )
    return KeyInfo(
        str(name), _dt.datetime.fromisoformat(created_at), versions[-1].version, versions
    )


class KeyService:
    """Named keys in one key store file; implements `ppml.crypto.envelope.DataKeyProvider`."""

    def __init__(
        self,
        db_path: Path,
        master_key: bytes,
        *,
        actor: str = "local",
        clock: Clock = utc_now,
        random_bytes: Callable[[int], bytes] = os.urandom,
        counter_dir: Path | None = None,
    ) -> None:
        """Open (or create) the key store at `db_path` with `master_key`.

        `counter_dir`: where to keep the state counter that detects a rollback of the whole
        file (`ppml.kms.state.StateCounter`); None keeps none.
        """
        self._ledger = KeyLedger(
            Path(db_path),
            MasterKey(master_key),
            actor=actor,
            clock=clock,
            random_bytes=random_bytes,
            counter_dir=counter_dir,
        )
        self._releases = KeyReleases(self._ledger)

    def __repr__(self) -> str:
        return f"KeyService({str(self._ledger.path)!r}, actor={self._ledger.actor!r})"

    @property
    def audit(self) -> AuditLog:
        return self._ledger.audit

    @property
    def releases(self) -> KeyReleases:
        """The releases of data keys to attested workloads (the key broker's primitives)."""
        return self._releases

    def policies(self, *, allow_sim: bool) -> ReleasePolicies:
        """The release policies, for a workspace that does (dev) or does not accept sim."""
        return ReleasePolicies(self._ledger, allow_sim=allow_sim)

    def close(self) -> None:
        self._ledger.close()

    def __enter__(self) -> KeyService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- metadata ------------------------------------------------------------------------

    def list_keys(self) -> list[KeyInfo]:
        with self._ledger.read() as conn:
            self._ledger.state.summary(conn, full=True)
            return [_info(row) for row in _sqlite.key_rows(conn)]

    def describe(self, name: str) -> KeyInfo:
        validate_key_name(name)
        with self._ledger.read() as conn:
            return _checked_info(self._ledger.existing_key(conn, name))

    def verify_state(self) -> StateVerification:
        """Check every row that decides a release or a key against the authenticated state
        record, the record against the audit log and the state counter (`ppml audit verify`).
        A store made before state records existed is anchored first. Never raises for what it
        finds: the result says what is wrong."""
        return self._ledger.verify_state()

    # -- operations (each one audited) ---------------------------------------------------

    def create_key(self, name: str) -> KeyInfo:
        validate_key_name(name)
        ledger = self._ledger

        def body(conn: sqlite3.Connection, now: str) -> tuple[KeyInfo, int, Mapping[str, Any]]:
            if ledger.key(conn, name).exists:
                raise Refusal(
                    KeyExists(f"a key named {name!r} exists already"), "denied", "key exists"
                )
            _sqlite.insert_key(conn, name, now)
            ledger.add_version(conn, name, 1, now)
            return _info(_sqlite.key_rows(conn, name)[0]), 1, {}

        return ledger.run("create", name, None, body)

    def rotate(self, name: str) -> KeyInfo:
        validate_key_name(name)
        ledger = self._ledger

        def body(conn: sqlite3.Connection, now: str) -> tuple[KeyInfo, int, Mapping[str, Any]]:
            current = ledger.current_version(ledger.key(conn, name))
            if current >= _MAX_VERSION:
                raise Refusal(
                    UsageError(f"key {name!r} has no versions left"), "denied", "versions exhausted"
                )
            ledger.add_version(conn, name, current + 1, now)
            info = _info(_sqlite.key_rows(conn, name)[0])
            return info, current + 1, {"previous_version": current}

        return ledger.run("rotate", name, None, body)

    def generate_data_key(self, key_name: str) -> DataKey:
        validate_key_name(key_name)
        ledger = self._ledger

        def body(conn: sqlite3.Connection, now: str) -> tuple[DataKey, int, Mapping[str, Any]]:
            key = ledger.key(conn, key_name)
            version = ledger.current_version(key)
            dek = ledger.random_exact(DATA_KEY_BYTES)
            wrapped = ledger.wrap_dek(key, version, dek)
            return DataKey(dek, wrapped), version, {}

        return ledger.run("generate_data_key", key_name, None, body)

    def unwrap(self, wrapped: WrappedKey) -> bytes:
        if not isinstance(wrapped, WrappedKey):
            raise UsageError("unwrap needs a WrappedKey")
        ledger = self._ledger

        def body(conn: sqlite3.Connection, now: str) -> tuple[bytes, int, Mapping[str, Any]]:
            dek = ledger.unwrap_dek(ledger.key(conn, wrapped.key_name), wrapped)
            return dek, wrapped.version, {}

        return ledger.run("unwrap", wrapped.key_name, wrapped.version, body)

    def rewrap(self, wrapped: WrappedKey) -> WrappedKey:
        if not isinstance(wrapped, WrappedKey):
            raise UsageError("rewrap needs a WrappedKey")
        ledger = self._ledger

        def body(conn: sqlite3.Connection, now: str) -> tuple[WrappedKey, int, Mapping[str, Any]]:
            key = ledger.key(conn, wrapped.key_name)
            dek = ledger.unwrap_dek(key, wrapped)
            version = ledger.current_version(key)
            new = ledger.wrap_dek(key, version, dek)
            return new, version, {"from_version": wrapped.version}

        return ledger.run("rewrap", wrapped.key_name, wrapped.version, body)
