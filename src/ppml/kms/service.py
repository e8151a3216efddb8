"""The embedded KMS: named, versioned key-encryption keys under a master key, the data keys they
wrap, and each key's release policy; every operation, refused ones included, is recorded in the
audit log. The release operations are the key broker's primitives (`ppml.kms.broker`)."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from hmac import compare_digest
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as _pyca_hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ppml._internal.canonical import canonical_json
from ppml._internal.clock import Clock, utc_now
from ppml.attestation.claims import TcbStatus, TeeType
from ppml.crypto.envelope import (
    DATA_KEY_BYTES,
    DataKey,
    WrappedKey,
    dek_aad,
    seal,
    unseal,
    validate_key_name,
)
from ppml.errors import (
    AccessDenied,
    ConfigurationError,
    IntegrityError,
    KeyAccessError,
    KeyExists,
    KeyNotFound,
    KeyVersionNotFound,
    UsageError,
)
from ppml.kms import store as _store
from ppml.kms.audit import AuditEntry, AuditLog, Outcome, Refusal, initialize_head
from ppml.kms.policy import (
    Decision,
    Policy,
    PolicyStore,
    Reason,
    Rule,
    parse_measurement,
    rule_mac,
)

if TYPE_CHECKING:
    from ppml.kms.policy import AttestedFacts

__all__ = ["ACCESS_DENIED", "Authorize", "KeyInfo", "KeyService", "KeyVersionInfo", "SealKey"]

MASTER_KEY_BYTES = 32
_KEK_WRAP_INFO = b"ppml/kms/kek-wrap/v1"
_AUDIT_INFO = b"ppml/kms/audit/v1"
_CHECK_INFO = b"ppml/kms/master-check/v1"
_POLICY_INFO = b"ppml/kms/release-policy/v1"
# The one message every release refusal after a valid token carries (unknown key or version,
# policy denial): a caller cannot tell which keys exist. The reason goes to the audit and log.
ACCESS_DENIED = "access denied"
_NONCE_BYTES = 12
_STORE_ID_BYTES = 16
_MAX_VERSION = 2**32 - 1
_ACTOR = re.compile(r"^[\x21-\x7e][\x20-\x7e]{0,127}$")

_log = logging.getLogger(__name__)
_T = TypeVar("_T")


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


_Body = Callable[[sqlite3.Connection, str], tuple[_T, int | None, Mapping[str, Any]]]
Authorize = Callable[[Policy], Decision]
"""Decides a release from the key's policy (the broker evaluates it against token claims)."""
SealKey = Callable[[WrappedKey, bytes], bytes]
"""Seals a released data key (plaintext) for its recipient; raises `Refusal` to refuse."""


def _derive(master_key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master_key)


def _kek_aad(name: str, version: int) -> bytes:
    return b"ppml/kek/v1\x00" + name.encode() + b"\x00" + version.to_bytes(4, "big")


def _sim_refused() -> UsageError:
    return UsageError(
        "sim rules are refused outside a dev workspace: the sim TEE protects nothing, so "
        "production policies never release keys to it"
    )


def _info(row: _store.KeyRow) -> KeyInfo:
    versions = tuple(KeyVersionInfo(v, _dt.datetime.fromisoformat(c)) for v, c in row.versions)
    return KeyInfo(
        row.name, _dt.datetime.fromisoformat(row.created_at), versions[-1].version, versions
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
    ) -> None:
        if not isinstance(master_key, bytes) or len(master_key) != MASTER_KEY_BYTES:
            raise ConfigurationError(f"the master key must be {MASTER_KEY_BYTES} bytes")
        if not isinstance(actor, str) or not _ACTOR.match(actor):
            raise UsageError("invalid actor: use 1-128 printable ASCII characters")
        self._actor, self._clock, self._random = actor, clock, random_bytes
        self._kek_wrap_key = _derive(master_key, _KEK_WRAP_INFO)
        self._check_key = _derive(master_key, _CHECK_INFO)
        audit_key = _derive(master_key, _AUDIT_INFO)
        self._policy_key = _derive(master_key, _POLICY_INFO)
        self._master_ok = False

        def on_create(conn: sqlite3.Connection, store_id: bytes) -> None:
            _store.put_meta(conn, "master_check", self._master_check(store_id))
            initialize_head(conn, audit_key, store_id)

        self._store = _store.KeyStore(
            Path(db_path),
            new_store_id=lambda: self._random_exact(_STORE_ID_BYTES),
            on_create=on_create,
        )
        self._audit = AuditLog(self._store, audit_key, guard=self._require_master)

    def __repr__(self) -> str:
        return f"KeyService({str(self._store.path)!r}, actor={self._actor!r})"

    @property
    def audit(self) -> AuditLog:
        return self._audit

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> KeyService:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- metadata ------------------------------------------------------------------------

    def list_keys(self) -> list[KeyInfo]:
        self._require_master()
        with self._store.read() as conn:
            return [_info(row) for row in _store.key_rows(conn)]

    def describe(self, name: str) -> KeyInfo:
        validate_key_name(name)
        self._require_master()
        with self._store.read() as conn:
            rows = _store.key_rows(conn, name)
        if not rows:
            raise KeyNotFound(f"no key named {name!r}")
        return _info(rows[0])

    # -- operations (each one audited) ---------------------------------------------------

    def create_key(self, name: str) -> KeyInfo:
        validate_key_name(name)

        def body(conn: sqlite3.Connection, now: str) -> tuple[KeyInfo, int, Mapping[str, Any]]:
            if _store.key_exists(conn, name):
                raise Refusal(
                    KeyExists(f"a key named {name!r} exists already"), "denied", "key exists"
                )
            _store.insert_key(conn, name, now)
            self._add_version(conn, name, 1, now)
            return _info(_store.key_rows(conn, name)[0]), 1, {}

        return self._run("create", name, None, body)

    def rotate(self, name: str) -> KeyInfo:
        validate_key_name(name)

        def body(conn: sqlite3.Connection, now: str) -> tuple[KeyInfo, int, Mapping[str, Any]]:
            current = self._current_version(conn, name)
            if current >= _MAX_VERSION:
                raise Refusal(
                    UsageError(f"key {name!r} has no versions left"), "denied", "versions exhausted"
                )
            self._add_version(conn, name, current + 1, now)
            info = _info(_store.key_rows(conn, name)[0])
            return info, current + 1, {"previous_version": current}

        return self._run("rotate", name, None, body)

    def generate_data_key(self, key_name: str) -> DataKey:
        validate_key_name(key_name)

        def body(conn: sqlite3.Connection, now: str) -> tuple[DataKey, int, Mapping[str, Any]]:
            version = self._current_version(conn, key_name)
            dek = self._random_exact(DATA_KEY_BYTES)
            wrapped = self._wrap_dek(conn, key_name, version, dek)
            return DataKey(dek, wrapped), version, {}

        return self._run("generate_data_key", key_name, None, body)

    def unwrap(self, wrapped: WrappedKey) -> bytes:
        if not isinstance(wrapped, WrappedKey):
            raise UsageError("unwrap needs a WrappedKey")

        def body(conn: sqlite3.Connection, now: str) -> tuple[bytes, int, Mapping[str, Any]]:
            return self._unwrap_dek(conn, wrapped), wrapped.version, {}

        return self._run("unwrap", wrapped.key_name, wrapped.version, body)

    def rewrap(self, wrapped: WrappedKey) -> WrappedKey:
        if not isinstance(wrapped, WrappedKey):
            raise UsageError("rewrap needs a WrappedKey")

        def body(conn: sqlite3.Connection, now: str) -> tuple[WrappedKey, int, Mapping[str, Any]]:
            dek = self._unwrap_dek(conn, wrapped)
            version = self._current_version(conn, wrapped.key_name)
            new = self._wrap_dek(conn, wrapped.key_name, version, dek)
            return new, version, {"from_version": wrapped.version}

        return self._run("rewrap", wrapped.key_name, wrapped.version, body)

    # -- release policies ----------------------------------------------------------------

    def policies(self, *, allow_sim: bool) -> PolicyStore:
        """The release policies, for a workspace that does (dev) or does not accept sim."""
        return PolicyStore(self, allow_sim=allow_sim)

    def allow_release(self, key_name: str, rule: Rule, *, allow_sim: bool) -> Policy:
        """Add `rule` to the key's release policy (replacing its rule for the same TEE and
        measurement) and return the policy. Audited as ``policy_allow``."""
        validate_key_name(key_name)
        if not isinstance(rule, Rule):
            raise UsageError("allow_release needs a Rule")

        def body(conn: sqlite3.Connection, now: str) -> tuple[Policy, None, Mapping[str, Any]]:
            if rule.tee is TeeType.SIM and not allow_sim:
                raise Refusal(_sim_refused(), "denied", Reason.SIM_NOT_ALLOWED, rule.to_dict())
            if not _store.key_exists(conn, key_name):
                raise Refusal(
                    KeyNotFound(f"no key named {key_name!r}"),
                    "denied",
                    Reason.UNKNOWN_KEY,
                    rule.to_dict(),
                )
            replaced = self._store_rule(conn, key_name, rule, now)
            return self._policy(conn, key_name), None, {**rule.to_dict(), "replaced": replaced}

        return self._run("policy_allow", key_name, None, body)

    def replace_release_policy(
        self, key_name: str, rules: Sequence[Rule], *, allow_sim: bool
    ) -> Policy:
        """Replace the key's whole release policy with `rules` (none: deny everything) and
        return it. Audited as ``policy_set``."""
        validate_key_name(key_name)
        rules = tuple(rules)
        if not all(isinstance(r, Rule) for r in rules):
            raise UsageError("replace_release_policy needs Rules")

        def body(conn: sqlite3.Connection, now: str) -> tuple[Policy, None, Mapping[str, Any]]:
            detail = {"rules": [r.to_dict() for r in rules]}
            if any(r.tee is TeeType.SIM for r in rules) and not allow_sim:
                raise Refusal(_sim_refused(), "denied", Reason.SIM_NOT_ALLOWED, detail)
            if not _store.key_exists(conn, key_name):
                raise Refusal(
                    KeyNotFound(f"no key named {key_name!r}"), "denied", Reason.UNKNOWN_KEY, detail
                )
            removed = _store.delete_rules(conn, key_name, None)
            for rule in rules:
                self._store_rule(conn, key_name, rule, now)
            return self._policy(conn, key_name), None, {**detail, "removed": removed}

        return self._run("policy_set", key_name, None, body)

    def revoke_release(self, key_name: str, measurement: str) -> Policy:
        """Remove the key's rules for `measurement` and return the policy; `UsageError` if the
        key has no such rule. Audited as ``policy_revoke``."""
        validate_key_name(key_name)
        measurement = parse_measurement(measurement)

        def body(conn: sqlite3.Connection, now: str) -> tuple[Policy, None, Mapping[str, Any]]:
            detail = {"measurement": measurement}
            if not _store.key_exists(conn, key_name):
                raise Refusal(
                    KeyNotFound(f"no key named {key_name!r}"), "denied", Reason.UNKNOWN_KEY, detail
                )
            removed = _store.delete_rules(conn, key_name, measurement)
            if removed == 0:
                raise Refusal(
                    UsageError(
                        f"key {key_name!r} has no release rule for measurement {measurement} "
                        "(see `ppml policy show`)"
                    ),
                    "denied",
                    Reason.UNKNOWN_RULE,
                    detail,
                )
            return self._policy(conn, key_name), None, {**detail, "removed": removed}

        return self._run("policy_revoke", key_name, None, body)

    def release_policy(self, key_name: str) -> Policy:
        """The key's release policy; `IntegrityError` if a stored rule was altered."""
        validate_key_name(key_name)
        self._require_master()
        with self._store.read() as conn:
            if not _store.key_exists(conn, key_name):
                raise KeyNotFound(f"no key named {key_name!r}")
            policy = self._policy(conn, key_name)
        if not policy.intact:
            raise IntegrityError(path=self._store.path)
        return policy

    def evaluate_release(self, key_name: str, facts: AttestedFacts, *, allow_sim: bool) -> Decision:
        """The release decision for one key (not audited: nothing is released)."""
        validate_key_name(key_name)
        self._require_master()
        with self._store.read() as conn:
            if not _store.key_exists(conn, key_name):
                return Decision(False, Reason.UNKNOWN_KEY)
            return self._policy(conn, key_name).evaluate(facts, allow_sim=allow_sim)

    def matching_keys(self, facts: AttestedFacts, *, allow_sim: bool) -> list[str]:
        """The names of the keys whose release policies `facts` satisfy, sorted."""
        self._require_master()
        with self._store.read() as conn:
            names = sorted({row.key_name for row in _store.rule_rows(conn)})
            policies = [self._policy(conn, name) for name in names]
        return [p.key_name for p in policies if p.evaluate(facts, allow_sim=allow_sim).allowed]

    # -- releases (the key broker's primitives) --------------------------------------------

    def release_data_key(
        self,
        key_name: str,
        *,
        authorize: Authorize,
        seal_key: SealKey,
        op: str,
        detail: Mapping[str, Any],
    ) -> tuple[WrappedKey, bytes]:
        """A fresh data key of the key's current version, if `authorize` allows it under the
        key's policy: returns its wrapped form and what `seal_key` made of the plaintext, which
        never leaves this call otherwise. An unknown key and a denial both raise
        `AccessDenied(ACCESS_DENIED)`; every outcome is audited as `op` with `detail`."""
        validate_key_name(key_name)

        def produce(conn: sqlite3.Connection) -> tuple[WrappedKey, bytes]:
            version = self._current_version(conn, key_name)
            dek = self._random_exact(DATA_KEY_BYTES)
            return self._wrap_dek(conn, key_name, version, dek), dek

        return self._release(op, key_name, None, produce, authorize, seal_key, detail)

    def release_unwrapped(
        self,
        wrapped: WrappedKey,
        *,
        authorize: Authorize,
        seal_key: SealKey,
        op: str,
        detail: Mapping[str, Any],
    ) -> tuple[WrappedKey, bytes]:
        """Like `release_data_key`, for the data key inside `wrapped`. An unknown version is
        refused like an unknown key; a wrapped key that fails authentication is an
        `IntegrityError`."""
        if not isinstance(wrapped, WrappedKey):
            raise UsageError("release_unwrapped needs a WrappedKey")

        def produce(conn: sqlite3.Connection) -> tuple[WrappedKey, bytes]:
            if _store.wrapped_kek(conn, wrapped.key_name, wrapped.version) is None:
                raise Refusal(AccessDenied(ACCESS_DENIED), "denied", Reason.UNKNOWN_VERSION, detail)
            return wrapped, self._unwrap_dek(conn, wrapped)

        return self._release(
            op, wrapped.key_name, wrapped.version, produce, authorize, seal_key, detail
        )

    def record(
        self,
        op: str,
        *,
        key_name: str | None,
        version: int | None,
        outcome: Outcome,
        detail: Mapping[str, Any],
    ) -> AuditEntry:
        """Append one audit record for a decision taken outside the key service (the broker's
        token refusals). `detail` must not hold secrets."""
        self._require_master()
        ts = self._now()
        return self._store.write_shared(
            lambda conn: self._audit.append(
                conn,
                ts=ts,
                actor=self._actor,
                op=op,
                key_name=key_name,
                version=version,
                outcome=outcome,
                detail=detail,
            )
        )

    # -- internals -----------------------------------------------------------------------

    def _release(
        self,
        op: str,
        key_name: str,
        version_asked: int | None,
        produce: Callable[[sqlite3.Connection], tuple[WrappedKey, bytes]],
        authorize: Authorize,
        seal_key: SealKey,
        detail: Mapping[str, Any],
    ) -> tuple[WrappedKey, bytes]:
        def body(
            conn: sqlite3.Connection, now: str
        ) -> tuple[tuple[WrappedKey, bytes], int, Mapping[str, Any]]:
            # Order matters: nothing about versions is revealed to a workload the policy denies.
            if not _store.key_exists(conn, key_name):
                raise Refusal(AccessDenied(ACCESS_DENIED), "denied", Reason.UNKNOWN_KEY, detail)
            decision = authorize(self._policy(conn, key_name))
            if not decision.allowed:
                raise Refusal(AccessDenied(ACCESS_DENIED), "denied", decision.reason, detail)
            try:
                wrapped, dek = produce(conn)
            except Refusal as exc:
                raise Refusal(exc.error, exc.outcome, exc.reason, detail) from None
            sealed = seal_key(wrapped, dek)
            return (wrapped, sealed), wrapped.version, {**detail, "reason": decision.reason}

        return self._run(op, key_name, version_asked, body)

    def _store_rule(self, conn: sqlite3.Connection, key_name: str, rule: Rule, now: str) -> bool:
        return _store.upsert_rule(
            conn,
            key_name,
            tee=rule.tee.value,
            measurement=rule.measurement,
            debug_ok=rule.debug_ok,
            min_tcb=rule.min_tcb.value,
            created_at=now,
            mac=self._rule_mac(key_name, rule),
            constraints=canonical_json(rule.constraints()).decode("utf-8"),
        )

    def _rule_mac(self, key_name: str, rule: Rule) -> bytes:
        return rule_mac(self._policy_key, self._store.store_id, key_name, rule)

    def _policy(self, conn: sqlite3.Connection, key_name: str) -> Policy:
        """The key's stored policy, its rules checked against their MACs."""
        rules: list[Rule] = []
        intact = True
        for row in _store.rule_rows(conn, key_name):
            rule = self._checked_rule(row)
            if rule is None:
                intact = False
            else:
                rules.append(rule)
        if not intact:
            _log.error("a release rule of key %r in %s was altered", key_name, self._store.path)
        return Policy(key_name, tuple(rules), intact)

    def _checked_rule(self, row: _store.RuleRow) -> Rule | None:
        try:
            if not isinstance(row.debug_ok, int) or row.debug_ok not in (0, 1):
                return None
            if not all(
                isinstance(v, str) for v in (row.tee, row.measurement, row.min_tcb, row.constraints)
            ):
                return None
            constraints = json.loads(str(row.constraints))
            if not isinstance(constraints, dict):
                return None
            rule = Rule.from_dict(
                {
                    "tee": TeeType(str(row.tee)),
                    "measurement": str(row.measurement),
                    "debug_ok": bool(row.debug_ok),
                    "min_tcb": TcbStatus(str(row.min_tcb)),
                    **constraints,
                }
            )
        except (ValueError, UsageError, TypeError, RecursionError):
            return None
        if rule.measurement != row.measurement or not isinstance(row.mac, bytes):
            return None
        if not compare_digest(self._rule_mac(row.key_name, rule), row.mac):
            return None
        return rule

    def _run(self, op: str, key_name: str, version_asked: int | None, body: _Body[_T]) -> _T:
        """Run `body` in one write transaction together with its audit record.

        A refusal rolls back whatever `body` wrote, but its audit record still commits; the
        result is returned (and the refusal raised) only once the record is durable.
        """
        self._require_master()
        ts = self._now()

        def work(conn: sqlite3.Connection) -> tuple[_T | None, Refusal | None]:
            try:
                with _store.savepoint(conn):
                    value, version, detail = body(conn, ts.isoformat(timespec="microseconds"))
            except Refusal as exc:
                self._record(
                    conn, ts, op, key_name, version_asked, exc.outcome, exc.record_detail()
                )
                return None, exc
            self._record(conn, ts, op, key_name, version, "ok", detail)
            return value, None

        # Group commit: concurrent operations share one durable commit.
        value, refusal = self._store.write_shared(work)
        if refusal is not None:
            _log.info("kms %s %r by %s: %s", op, key_name, self._actor, refusal.reason)
            raise refusal.error from None
        return value  # type: ignore[return-value]  # None only together with a refusal

    def _record(
        self,
        conn: sqlite3.Connection,
        ts: _dt.datetime,
        op: str,
        key_name: str,
        version: int | None,
        outcome: Outcome,
        detail: Mapping[str, Any] | str,
    ) -> None:
        if isinstance(detail, str):
            detail = {"reason": detail}
        self._audit.append(
            conn,
            ts=ts,
            actor=self._actor,
            op=op,
            key_name=key_name,
            version=version,
            outcome=outcome,
            detail=detail,
        )

    def _require_master(self) -> None:
        if self._master_ok:
            return
        with self._store.read() as conn:
            stored = _store.get_meta(conn, "master_check")
        expected = self._master_check(self._store.store_id)
        if stored is None or not compare_digest(stored, expected):
            _log.warning("the master key given does not open key store %s", self._store.path)
            raise KeyAccessError(
                "the master key does not open this key store", path=self._store.path
            )
        self._master_ok = True

    def _master_check(self, store_id: bytes) -> bytes:
        h = _pyca_hmac.HMAC(self._check_key, hashes.SHA256())
        h.update(b"ppml/kms/master-check/v1\x00" + store_id)
        return h.finalize()

    def _now(self) -> _dt.datetime:
        ts = self._clock()
        if ts.tzinfo is None or ts.utcoffset() is None:
            raise ConfigurationError("the clock must return timezone-aware times")
        return ts.astimezone(_dt.UTC)

    def _random_exact(self, n: int) -> bytes:
        data = self._random(n)
        if not isinstance(data, bytes) or len(data) != n:
            raise ConfigurationError("the random source returned the wrong number of bytes")
        return data

    def _current_version(self, conn: sqlite3.Connection, name: str) -> int:
        version = _store.latest_version(conn, name)
        if version is None:
            raise Refusal(KeyNotFound(f"no key named {name!r}"), "denied", "unknown key")
        return version

    def _add_version(self, conn: sqlite3.Connection, name: str, version: int, now: str) -> None:
        kek = self._random_exact(DATA_KEY_BYTES)
        nonce = self._random_exact(_NONCE_BYTES)
        blob = seal(self._kek_wrap_key, kek, _kek_aad(name, version), nonce=nonce)
        _store.insert_version(conn, name, version, blob, now)

    def _kek(self, conn: sqlite3.Connection, name: str, version: int) -> bytes:
        blob = _store.wrapped_kek(conn, name, version)
        if blob is None:
            if not _store.key_exists(conn, name):
                raise Refusal(KeyNotFound(f"no key named {name!r}"), "denied", "unknown key")
            raise Refusal(
                KeyVersionNotFound(f"key {name!r} has no version {version}"),
                "denied",
                "unknown version",
            )
        try:
            return unseal(self._kek_wrap_key, blob, _kek_aad(name, version))
        except IntegrityError:
            # The master key was checked already, so the stored KEK itself was altered.
            _log.error("stored key %r version %d failed authentication", name, version)
            raise Refusal(
                IntegrityError(path=self._store.path),
                "error",
                "stored key-encryption key failed authentication",
            ) from None

    def _wrap_dek(
        self, conn: sqlite3.Connection, name: str, version: int, dek: bytes
    ) -> WrappedKey:
        kek = self._kek(conn, name, version)
        nonce = self._random_exact(_NONCE_BYTES)
        return WrappedKey(name, version, seal(kek, dek, dek_aad(name, version), nonce=nonce))

    def _unwrap_dek(self, conn: sqlite3.Connection, wrapped: WrappedKey) -> bytes:
        kek = self._kek(conn, wrapped.key_name, wrapped.version)
        try:
            return unseal(kek, wrapped.blob, wrapped.aad())
        except IntegrityError:
            raise Refusal(
                IntegrityError(), "error", "wrapped data key failed authentication"
            ) from None
