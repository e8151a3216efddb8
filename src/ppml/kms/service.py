"""The embedded KMS: named, versioned key-encryption keys under a master key, the data keys they
wrap, and each key's release policy; every operation, refused ones included, is recorded in the
audit log. The release operations are the key broker's primitives (`ppml.kms.broker`)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from hmac import compare_digest
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as _pyca_hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ppml import names
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
from ppml.kms import state as _state
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

__all__ = [
    "ACCESS_DENIED",
    "Authorize",
    "KeyInfo",
    "KeyService",
    "KeyVersionInfo",
    "SealKey",
    "StateVerification",
]

MASTER_KEY_BYTES = 32
_KEK_WRAP_INFO = b"ppml/kms/kek-wrap/v1"
_AUDIT_INFO = b"ppml/kms/audit/v1"
_CHECK_INFO = b"ppml/kms/master-check/v1"
_POLICY_INFO = b"ppml/kms/release-policy/v1"
_STATE_INFO = b"ppml/kms/state/v1"
# The one message every release refusal after a valid token carries (unknown key or version,
# policy denial): a caller cannot tell which keys exist. The reason goes to the audit and log.
ACCESS_DENIED = "access denied"
_NONCE_BYTES = 12
_STORE_ID_BYTES = 16
_MAX_VERSION = 2**32 - 1

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


@dataclass(frozen=True, slots=True)
class StateVerification:
    """The result of `KeyService.verify_state`."""

    ok: bool
    version: int | None
    keys: int
    counter: int | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "version": self.version,
            "keys": self.keys,
            "counter": self.counter,
            "reason": self.reason,
        }


class _StateError(Exception):
    """The stored rows disagree with the authenticated KMS state (`problem` says how)."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem

    def error(self, path: Path) -> IntegrityError:
        return IntegrityError(f"KMS state check failed: {self.problem}", path=path)


@dataclass(frozen=True, slots=True)
class _Key:
    """One key's rows, checked against the authenticated state (its key row and versions; its
    rules only in `rules_intact`, so that an altered policy denies instead of failing)."""

    rows: _state.KeyRows
    rules_intact: bool

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

    def info(self) -> KeyInfo:
        name, created_at = self.rows.key or (self.rows.name, "")
        versions = tuple(
            KeyVersionInfo(int(v), _dt.datetime.fromisoformat(c))
            for _, v, _, c in self.rows.versions
        )
        return KeyInfo(
            str(name), _dt.datetime.fromisoformat(created_at), versions[-1].version, versions
        )


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
        counter_dir: Path | None = None,
    ) -> None:
        """Open (or create) the key store at `db_path` with `master_key`.

        `counter_dir`: where to keep the state counter that detects a rollback of the whole
        file (`ppml.kms.state.StateCounter`); None keeps none.
        """
        if not isinstance(master_key, bytes) or len(master_key) != MASTER_KEY_BYTES:
            raise ConfigurationError(f"the master key must be {MASTER_KEY_BYTES} bytes")
        names.ACTOR.check(actor)
        self._actor, self._clock, self._random = actor, clock, random_bytes
        self._kek_wrap_key = _derive(master_key, _KEK_WRAP_INFO)
        self._check_key = _derive(master_key, _CHECK_INFO)
        audit_key = _derive(master_key, _AUDIT_INFO)
        self._policy_key = _derive(master_key, _POLICY_INFO)
        self._state_key = _derive(master_key, _STATE_INFO)
        self._master_ok = False
        # (version, mac, summary) of the newest state record verified in full.
        self._verified: tuple[int, bytes, Mapping[str, _state.KeyDigests]] | None = None
        self._written: tuple[int, bytes, Mapping[str, _state.KeyDigests]] | None = None

        def on_create(conn: sqlite3.Connection, store_id: bytes) -> None:
            _store.put_meta(conn, "master_check", self._master_check(store_id))
            genesis = initialize_head(conn, audit_key, store_id)
            _state.write_record(
                conn, self._state_key, store_id, version=0, summary={}, audit_seq=0,
                audit_mac=genesis,
            )  # fmt: skip

        self._store = _store.KeyStore(
            Path(db_path),
            new_store_id=lambda: self._random_exact(_STORE_ID_BYTES),
            on_create=on_create,
        )
        self._audit = AuditLog(self._store, audit_key, guard=self._require_master_key)
        self._counter = (
            None
            if counter_dir is None
            else _state.StateCounter(counter_dir, self._state_key, self._store.store_id)
        )

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
        with self._store.read() as conn, self._checked():
            self._summary(conn, full=True)
            return [_info(row) for row in _store.key_rows(conn)]

    def describe(self, name: str) -> KeyInfo:
        validate_key_name(name)
        self._require_master()
        with self._store.read() as conn, self._checked():
            key = self._key(conn, name)
        if not key.exists:
            raise KeyNotFound(f"no key named {name!r}")
        return key.info()

    def verify_state(self) -> StateVerification:
        """Check every row that decides a release or a key against the authenticated state
        record, the record against the audit log and the state counter (`ppml audit verify`).
        A store made before state records existed is anchored first. Never raises for what it
        finds: the result says what is wrong."""
        self._require_master_key()
        counter: int | None = None
        try:
            if self._counter is not None:
                counter = self._counter.read()
            self._open_state()  # anchors a store that has no record yet, checks every row
            with self._store.read() as conn:
                summary = self._summary(conn)  # the record just checked
                record = _state.read_record(conn)
        except _StateError as exc:
            return StateVerification(False, None, 0, counter, exc.problem)
        except IntegrityError as exc:
            reason = exc.message.removeprefix("KMS state check failed: ")
            return StateVerification(False, None, 0, counter, reason)
        assert record is not None
        if self._counter is not None:
            counter = self._counter.read()
        return StateVerification(
            True,
            record.version,
            len(summary),
            counter,
            f"state version {record.version}: {len(summary)} keys, every row authenticated",
        )

    # -- operations (each one audited) ---------------------------------------------------

    def create_key(self, name: str) -> KeyInfo:
        validate_key_name(name)

        def body(conn: sqlite3.Connection, now: str) -> tuple[KeyInfo, int, Mapping[str, Any]]:
            if self._key(conn, name).exists:
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
            current = self._current_version(self._key(conn, name))
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
            key = self._key(conn, key_name)
            version = self._current_version(key)
            dek = self._random_exact(DATA_KEY_BYTES)
            wrapped = self._wrap_dek(key, version, dek)
            return DataKey(dek, wrapped), version, {}

        return self._run("generate_data_key", key_name, None, body)

    def unwrap(self, wrapped: WrappedKey) -> bytes:
        if not isinstance(wrapped, WrappedKey):
            raise UsageError("unwrap needs a WrappedKey")

        def body(conn: sqlite3.Connection, now: str) -> tuple[bytes, int, Mapping[str, Any]]:
            return self._unwrap_dek(self._key(conn, wrapped.key_name), wrapped), wrapped.version, {}

        return self._run("unwrap", wrapped.key_name, wrapped.version, body)

    def rewrap(self, wrapped: WrappedKey) -> WrappedKey:
        if not isinstance(wrapped, WrappedKey):
            raise UsageError("rewrap needs a WrappedKey")

        def body(conn: sqlite3.Connection, now: str) -> tuple[WrappedKey, int, Mapping[str, Any]]:
            key = self._key(conn, wrapped.key_name)
            dek = self._unwrap_dek(key, wrapped)
            version = self._current_version(key)
            new = self._wrap_dek(key, version, dek)
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
            self._require_key(conn, key_name, rule.to_dict())
            replaced = self._store_rule(conn, key_name, rule, now)
            policy = self._policy(self._rows_now(conn, key_name))
            return policy, None, {**rule.to_dict(), "replaced": replaced}

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
            self._require_key(conn, key_name, detail)
            removed = _store.delete_rules(conn, key_name, None)
            for rule in rules:
                self._store_rule(conn, key_name, rule, now)
            policy = self._policy(self._rows_now(conn, key_name))
            return policy, None, {**detail, "removed": removed}

        return self._run("policy_set", key_name, None, body)

    def revoke_release(self, key_name: str, measurement: str) -> Policy:
        """Remove the key's rules for `measurement` and return the policy; `UsageError` if the
        key has no such rule. Audited as ``policy_revoke``."""
        validate_key_name(key_name)
        measurement = parse_measurement(measurement)

        def body(conn: sqlite3.Connection, now: str) -> tuple[Policy, None, Mapping[str, Any]]:
            detail = {"measurement": measurement}
            self._require_key(conn, key_name, detail)
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
            policy = self._policy(self._rows_now(conn, key_name))
            return policy, None, {**detail, "removed": removed}

        return self._run("policy_revoke", key_name, None, body)

    def release_policy(self, key_name: str) -> Policy:
        """The key's release policy; `IntegrityError` if a stored rule was altered."""
        validate_key_name(key_name)
        self._require_master()
        with self._store.read() as conn, self._checked():
            key = self._key(conn, key_name)
            if not key.exists:
                raise KeyNotFound(f"no key named {key_name!r}")
            policy = self._policy(key)
        if not policy.intact:
            raise self._state_failure(f"key {key_name!r}: its release rules differ")
        return policy

    def evaluate_release(self, key_name: str, facts: AttestedFacts, *, allow_sim: bool) -> Decision:
        """The release decision for one key (not audited: nothing is released)."""
        validate_key_name(key_name)
        self._require_master()
        with self._store.read() as conn, self._checked():
            key = self._key(conn, key_name)
            if not key.exists:
                return Decision(False, Reason.UNKNOWN_KEY)
            return self._policy(key).evaluate(facts, allow_sim=allow_sim)

    def matching_keys(self, facts: AttestedFacts, *, allow_sim: bool) -> list[str]:
        """The names of the keys whose release policies `facts` satisfy, sorted."""
        self._require_master()
        with self._store.read() as conn, self._checked():
            summary = self._summary(conn)
            rules = _state.rules_by_key(conn)  # one statement
        policies = []
        for name, rows in rules.items():
            # Only the rules decide a match: a key with no rules matches nothing, so a key
            # whose rules were deleted is denied; rules that differ from the record deny.
            expected = summary.get(name)
            if expected is None:
                raise self._state_failure(f"key {name!r} is not in the authenticated state")
            intact = _state.rules_digest(rows) == expected.rules
            policies.append(self._rules_policy(name, rows, intact))
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

        def produce(key: _Key) -> tuple[WrappedKey, bytes]:
            version = self._current_version(key)
            dek = self._random_exact(DATA_KEY_BYTES)
            return self._wrap_dek(key, version, dek), dek

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

        def produce(key: _Key) -> tuple[WrappedKey, bytes]:
            if key.wrapped_kek(wrapped.version) is None:
                raise Refusal(AccessDenied(ACCESS_DENIED), "denied", Reason.UNKNOWN_VERSION, detail)
            return wrapped, self._unwrap_dek(key, wrapped)

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
        if op in _state.STATE_OPS:
            raise UsageError(f"{op!r} is recorded by the key service itself")
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
        produce: Callable[[_Key], tuple[WrappedKey, bytes]],
        authorize: Authorize,
        seal_key: SealKey,
        detail: Mapping[str, Any],
    ) -> tuple[WrappedKey, bytes]:
        def body(
            conn: sqlite3.Connection, now: str
        ) -> tuple[tuple[WrappedKey, bytes], int, Mapping[str, Any]]:
            # Order matters: nothing about versions is revealed to a workload the policy denies.
            key = self._key(conn, key_name)
            if not key.exists:
                raise Refusal(AccessDenied(ACCESS_DENIED), "denied", Reason.UNKNOWN_KEY, detail)
            decision = authorize(self._policy(key))
            if not decision.allowed:
                raise Refusal(AccessDenied(ACCESS_DENIED), "denied", decision.reason, detail)
            try:
                wrapped, dek = produce(key)
            except Refusal as exc:
                raise Refusal(exc.error, exc.outcome, exc.reason, detail) from None
            sealed = seal_key(wrapped, dek)
            return (wrapped, sealed), wrapped.version, {**detail, "reason": decision.reason}

        return self._run(op, key_name, version_asked, body)

    def _require_key(self, conn: sqlite3.Connection, key_name: str, detail: Any) -> None:
        if not self._key(conn, key_name).exists:
            raise Refusal(
                KeyNotFound(f"no key named {key_name!r}"), "denied", Reason.UNKNOWN_KEY, detail
            )

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

    def _policy(self, key: _Key) -> Policy:
        return self._rules_policy(key.rows.name, key.rows.rules, key.rules_intact)

    def _rules_policy(
        self, name: str, rule_rows: tuple[tuple[Any, ...], ...], intact: bool
    ) -> Policy:
        """A key's policy from its rule rows (`intact`: they match the authenticated state);
        every rule also checked against its MAC."""
        rules: list[Rule] = []
        if intact:
            for row in rule_rows:
                rule = self._checked_rule(
                    _store.RuleRow(name, row[1], row[2], row[3], row[4], row[6], row[7])
                )
                if rule is None:
                    intact = False
                    break
                rules.append(rule)
        if not intact:
            _log.error("a release rule of key %r in %s was altered", name, self._store.path)
            return Policy(name, (), False)
        return Policy(name, tuple(rules), True)

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

    # -- the authenticated state (`ppml.kms.state`) --------------------------------------------

    @contextlib.contextmanager
    def _checked(self) -> Iterator[None]:
        """Turn a state check failure into the `IntegrityError` a caller sees (exit 3)."""
        try:
            yield
        except _StateError as exc:
            _log.error("key store %s: KMS state check failed: %s", self._store.path, exc.problem)
            raise exc.error(self._store.path) from None

    def _summary(
        self, conn: sqlite3.Connection, *, full: bool = False
    ) -> Mapping[str, _state.KeyDigests]:
        """The authenticated summary of every key (`_StateError` if the store disagrees).

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
            raise _StateError("the state record is missing")
        if verified is not None and record.version < verified[0]:
            raise _StateError(f"the state went back from version {verified[0]} to {record.version}")
        self._check_record(conn, record)
        problems = _state.differences(_state.scan(conn), record.summary)
        if problems:
            more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
            shown = "; ".join(problems[:3]) + more
            raise _StateError(f"{shown}, against state version {record.version}")
        self._remember(record)
        return record.summary

    def _remember(self, record: _state.StateRecord) -> None:
        verified = self._verified
        if verified is None or record.version >= verified[0]:
            self._verified = (record.version, record.mac, record.summary)

    def _check_record(self, conn: sqlite3.Connection, record: _state.StateRecord) -> None:
        if not record.check(self._state_key, self._store.store_id):
            raise _StateError("the state record does not match its MAC")
        try:
            head = self._audit.head(conn)
        except IntegrityError:
            raise _StateError("the audit log's head is missing or forged") from None
        if head.state_version != record.version:
            raise _StateError(
                f"the state record is version {record.version}, but the audit log reached "
                f"version {head.state_version}: the state was rolled back or replaced"
            )
        if self._audit.last_seq(conn) != head.seq:
            raise _StateError(
                f"the audit log holds records after its head (record {head.seq}): the head was "
                "rolled back"
            )
        last = self._audit.record_mac(conn, head.seq)
        if last is None or not compare_digest(last, head.mac):
            raise _StateError(f"audit record {head.seq} does not match the audit log's head")
        made_by = self._audit.record_mac(conn, record.audit_seq)
        if made_by is None or not compare_digest(made_by, record.audit_mac):
            raise _StateError(
                f"audit record {record.audit_seq}, which made state version {record.version}, "
                "is missing or altered"
            )
        if self._counter is not None:
            try:
                self._counter.check(record.version)
            except IntegrityError as exc:
                raise _StateError(f"{exc.message} (counter: {self._counter.path})") from exc

    def _key(self, conn: sqlite3.Connection, name: str) -> _Key:
        """One key's rows, checked against the authenticated state."""
        summary = self._summary(conn)
        return self._checked_rows(name, _state.read_key_rows(conn, name), summary)

    @staticmethod
    def _checked_rows(
        name: str, rows: _state.KeyRows, summary: Mapping[str, _state.KeyDigests]
    ) -> _Key:
        expected = summary.get(name)
        if expected is None:
            if rows.key is None and not rows.versions and not rows.rules:
                return _Key(rows, True)
            raise _StateError(f"key {name!r} is not in the authenticated state")
        got = rows.digests
        if got.key != expected.key or got.versions != expected.versions:
            raise _StateError("; ".join(rows.differences(expected)))
        return _Key(rows, got.rules == expected.rules)

    def _rows_now(self, conn: sqlite3.Connection, name: str) -> _Key:
        """One key's rows as this transaction just wrote them (not yet in the state record)."""
        return _Key(_state.read_key_rows(conn, name), True)

    def _advance_state(
        self, conn: sqlite3.Connection, ts: _dt.datetime, op: str, key_name: str,
        version: int | None, detail: Mapping[str, Any],
    ) -> _state.StateRecord:  # fmt: skip
        """Record a state change of one key: its audit record, then the new state record, whose
        summary is the verified one with that key's digests taken from its rows as the
        operation left them. The other keys' digests are carried over, never recomputed from
        their rows: an edit of another key's rows stays detected, it is not taken in."""
        summary = dict(self._summary(conn))
        version_now = _state.read_version(conn)
        assert version_now is not None  # `_summary` checked the record in this transaction
        new_version = version_now[0] + 1
        summary[key_name] = _state.read_key_rows(conn, key_name).digests
        record = self._write_state(
            conn, ts, op, key_name, version, {**detail, "state": new_version}, summary, new_version
        )
        self._written = (record.version, record.mac, record.summary)
        return record

    def _write_state(
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
        self._record(conn, ts, op, key_name, version, "ok", detail, state_version=new_version)
        head = self._audit.head(conn)
        return _state.write_record(
            conn,
            self._state_key,
            self._store.store_id,
            version=new_version,
            summary=summary,
            audit_seq=head.seq,
            audit_mac=head.mac,
        )

    def _open_state(self) -> None:
        """On first use: anchor a store made before state records existed, then check the
        whole state once."""
        with self._store.read() as conn:
            missing = _state.read_record(conn) is None
        if missing:
            with self._store.write() as conn:
                if _state.read_record(conn) is None:
                    self._anchor(conn)
        with self._store.read() as conn, self._checked():
            self._summary(conn, full=True)
            version = _state.read_version(conn)
        if self._counter is not None and version is not None and self._counter.read() is None:
            self._counter.advance(version[0])  # protection from this open on, not the next change

    def _anchor(self, conn: sqlite3.Connection) -> None:
        """Give a store from before schema 4 its first state record (version 1), once: only
        if its audit log never had one, its chain is intact and every stored rule and key
        authenticates."""
        head = self._audit.head(conn)
        if head.state_version is not None:
            raise self._state_failure("the state record is missing")
        verification = self._audit.verify_in(conn)
        if not verification.ok:
            raise self._state_failure(
                f"the audit log is broken ({verification.reason}): not anchoring its state"
            )
        rows = _state.scan(conn)
        for name, key in rows.items():
            k = _Key(key, True)
            bad = not k.exists or not key.versions or not self._policy(k).intact
            for row in key.versions:
                try:
                    unseal(self._kek_wrap_key, row[2], _kek_aad(name, row[1]))
                except (IntegrityError, TypeError, ValueError, AttributeError, OverflowError):
                    bad = True
            if bad:
                raise self._state_failure(f"key {name!r} does not authenticate: not anchoring")
        detail = {"state": 1, "keys": len(rows)}
        summary = _state.summary_of(rows)
        record = self._write_state(
            conn, self._now(), "state_anchor", None, None, detail, summary, 1
        )
        _log.info(
            "key store %s: state anchored at version 1 (%d keys)", self._store.path, len(rows)
        )
        if self._counter is not None:
            self._counter.advance(record.version)

    def _state_failure(self, problem: str) -> IntegrityError:
        _log.error("key store %s: KMS state check failed: %s", self._store.path, problem)
        return _StateError(problem).error(self._store.path)

    def _run(self, op: str, key_name: str, version_asked: int | None, body: _Body[_T]) -> _T:
        """Run `body` in one write transaction together with its audit record.

        A refusal rolls back whatever `body` wrote, but its audit record still commits; the
        result is returned (and the refusal raised) only once the record is durable. An
        operation that changes the state leaves a new state record (`_advance_state`).
        """
        self._require_master()
        ts = self._now()
        changes_state = op in _state.STATE_OPS

        def work(
            conn: sqlite3.Connection,
        ) -> tuple[_T | None, Refusal | None, _state.StateRecord | None]:
            try:
                with _store.savepoint(conn):
                    try:
                        value, version, detail = body(conn, ts.isoformat(timespec="microseconds"))
                    except _StateError as exc:
                        raise Refusal(
                            exc.error(self._store.path),
                            "error",
                            "state check failed",
                            {"problem": exc.problem},
                        ) from None
                    if changes_state:
                        record = self._advance_state(conn, ts, op, key_name, version, detail)
                        return value, None, record
            except Refusal as exc:
                self._record(
                    conn, ts, op, key_name, version_asked, exc.outcome, exc.record_detail()
                )
                return None, exc, None
            self._record(conn, ts, op, key_name, version, "ok", detail)
            return value, None, None

        # Group commit: concurrent operations share one durable commit.
        value, refusal, record = self._store.write_shared(work)
        if refusal is not None:
            _log.info("kms %s %r by %s: %s", op, key_name, self._actor, refusal.reason)
            raise refusal.error from None
        if record is not None:
            self._remember(record)
            if self._counter is not None:
                self._counter.advance(record.version)
        return value  # type: ignore[return-value]  # None only together with a refusal

    def _record(
        self,
        conn: sqlite3.Connection,
        ts: _dt.datetime,
        op: str,
        key_name: str | None,
        version: int | None,
        outcome: Outcome,
        detail: Mapping[str, Any] | str,
        *,
        state_version: int | None = None,
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
            state_version=state_version,
        )

    def _require_master(self) -> None:
        """Check the master key against the store, then (once) the whole state."""
        if self._master_ok:
            return
        self._require_master_key()
        self._open_state()
        self._master_ok = True

    def _require_master_key(self) -> None:
        """Check the master key against the store only (the audit log's own verification)."""
        with self._store.read() as conn:
            stored = _store.get_meta(conn, "master_check")
        expected = self._master_check(self._store.store_id)
        if stored is None or not compare_digest(stored, expected):
            _log.warning("the master key given does not open key store %s", self._store.path)
            raise KeyAccessError(
                "the master key does not open this key store", path=self._store.path
            )

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

    def _current_version(self, key: _Key) -> int:
        version = key.current_version
        if version is None:
            raise Refusal(KeyNotFound(f"no key named {key.rows.name!r}"), "denied", "unknown key")
        return version

    def _add_version(self, conn: sqlite3.Connection, name: str, version: int, now: str) -> None:
        kek = self._random_exact(DATA_KEY_BYTES)
        nonce = self._random_exact(_NONCE_BYTES)
        blob = seal(self._kek_wrap_key, kek, _kek_aad(name, version), nonce=nonce)
        _store.insert_version(conn, name, version, blob, now)

    def _kek(self, key: _Key, version: int) -> bytes:
        name = key.rows.name
        blob = key.wrapped_kek(version)
        if blob is None:
            if not key.exists:
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

    def _wrap_dek(self, key: _Key, version: int, dek: bytes) -> WrappedKey:
        kek = self._kek(key, version)
        nonce = self._random_exact(_NONCE_BYTES)
        name = key.rows.name
        return WrappedKey(name, version, seal(kek, dek, dek_aad(name, version), nonce=nonce))

    def _unwrap_dek(self, key: _Key, wrapped: WrappedKey) -> bytes:
        kek = self._kek(key, wrapped.version)
        try:
            return unseal(kek, wrapped.blob, wrapped.aad())
        except IntegrityError:
            raise Refusal(
                IntegrityError(), "error", "wrapped data key failed authentication"
            ) from None
