"""Releases: the key broker's primitives in the key store. A data key leaves the KMS only
sealed for its recipient, only when the key's release policy allows it, and every outcome,
refused ones included, is an audit record; a caller cannot tell which keys exist."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from ppml.crypto.envelope import DATA_KEY_BYTES, WrappedKey, validate_key_name
from ppml.errors import AccessDenied, UsageError
from ppml.kms import state as _state
from ppml.kms.audit import AuditEntry, Outcome, Refusal
from ppml.kms.ledger import KeyLedger, unknown_key
from ppml.kms.policy import Decision, Policy, Reason
from ppml.kms.state_guard import CheckedKey

__all__ = ["ACCESS_DENIED", "Authorize", "KeyReleases", "ReleaseTerms", "SealKey"]

# The one message every release refusal after a valid token carries (unknown key or version,
# policy denial): a caller cannot tell which keys exist. The reason goes to the audit and log.
ACCESS_DENIED: Final = "access denied"

Authorize = Callable[[Policy], Decision]
"""Decides a release from the key's policy (the broker evaluates it against token claims)."""
SealKey = Callable[[WrappedKey, bytes], bytes]
"""Seals a released data key (plaintext) for its recipient; raises `Refusal` to refuse."""
_Produce = Callable[[CheckedKey], tuple[WrappedKey, bytes]]


@dataclass(frozen=True, slots=True)
class ReleaseTerms:
    """How one release is decided (`authorize`), sealed for its recipient (`seal_key`) and
    audited (as `op`, with `detail`, which must not hold secrets)."""

    op: str
    authorize: Authorize
    seal_key: SealKey
    detail: Mapping[str, Any]


class KeyReleases:
    """Releases of the data keys of one key store (obtain with `KeyService.releases`)."""

    def __init__(self, ledger: KeyLedger) -> None:
        self._ledger = ledger

    def __repr__(self) -> str:
        return f"KeyReleases({str(self._ledger.path)!r})"

    def data_key(self, key_name: str, terms: ReleaseTerms) -> tuple[WrappedKey, bytes]:
        """A fresh data key of the key's current version, if `terms.authorize` allows it under
        the key's policy: returns its wrapped form and what `terms.seal_key` made of the
        plaintext, which never leaves this call otherwise. An unknown key and a denial both
        raise `AccessDenied(ACCESS_DENIED)`; every outcome is audited."""
        validate_key_name(key_name)
        ledger = self._ledger

        def produce(key: CheckedKey) -> tuple[WrappedKey, bytes]:
            version = ledger.current_version(key)
            dek = ledger.random_exact(DATA_KEY_BYTES)
            return ledger.wrap_dek(key, version, dek), dek

        return self._release(key_name, None, produce, terms)

    def unwrapped(self, wrapped: WrappedKey, terms: ReleaseTerms) -> tuple[WrappedKey, bytes]:
        """Like `data_key`, for the data key inside `wrapped`. An unknown version is refused
        like an unknown key; a wrapped key that fails authentication is an `IntegrityError`."""
        if not isinstance(wrapped, WrappedKey):
            raise UsageError("KeyReleases.unwrapped needs a WrappedKey")

        def produce(key: CheckedKey) -> tuple[WrappedKey, bytes]:
            if key.wrapped_kek(wrapped.version) is None:
                raise Refusal(
                    AccessDenied(ACCESS_DENIED), "denied", Reason.UNKNOWN_VERSION, terms.detail
                )
            return wrapped, self._ledger.unwrap_dek(key, wrapped)

        return self._release(wrapped.key_name, wrapped.version, produce, terms)

    def record(
        self,
        op: str,
        *,
        key_name: str | None,
        version: int | None,
        outcome: Outcome,
        detail: Mapping[str, Any],
    ) -> AuditEntry:
        """Append one audit record for a decision taken before the key store is reached (the
        broker's token refusals). `detail` must not hold secrets."""
        if op in _state.STATE_OPS:
            raise UsageError(f"{op!r} is recorded by the key service itself")
        ledger = self._ledger
        ledger.require_master()
        ts = ledger.now()
        return ledger.db.write_shared(
            lambda conn: ledger.append(conn, ts, op, key_name, version, outcome, detail)
        )

    def _release(
        self, key_name: str, version_asked: int | None, produce: _Produce, terms: ReleaseTerms
    ) -> tuple[WrappedKey, bytes]:
        ledger, detail = self._ledger, terms.detail

        def body(
            conn: sqlite3.Connection, now: str
        ) -> tuple[tuple[WrappedKey, bytes], int, Mapping[str, Any]]:
            # Order matters: nothing about versions is revealed to a workload the policy denies.
            key = ledger.key(conn, key_name)
            if not key.exists:
                raise unknown_key(
                    key_name, Reason.UNKNOWN_KEY, detail, error=AccessDenied(ACCESS_DENIED)
                )
            decision = terms.authorize(ledger.rules.policy(key))
            if not decision.allowed:
                raise Refusal(AccessDenied(ACCESS_DENIED), "denied", decision.reason, detail)
            try:
                wrapped, dek = produce(key)
            except Refusal as exc:
                raise Refusal(exc.error, exc.outcome, exc.reason, detail) from None
            sealed = terms.seal_key(wrapped, dek)
            return (wrapped, sealed), wrapped.version, {**detail, "reason": decision.reason}

        return ledger.run(terms.op, key_name, version_asked, body)
