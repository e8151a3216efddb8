"""Releases: the key broker's primitives in the key store. A data key leaves the KMS only
sealed for its recipient, only when the key's release policy allows it, and every outcome,
refused ones included, is an audit record; a caller cannot tell which keys exist."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from typing import Any, Final

from ppml.crypto.envelope import DATA_KEY_BYTES, WrappedKey, validate_key_name
from ppml.errors import AccessDenied, UsageError
from ppml.kms.audit import AuditEntry, Outcome, Refusal
from ppml.kms.ledger import KeyLedger, unknown_key
from ppml.kms.policy import Decision, Policy, Reason
from ppml.kms.state_guard import CheckedKey

__all__ = ["ACCESS_DENIED", "Authorize", "KeyReleases", "SealKey"]

# The one message every release refusal after a valid token carries (unknown key or version,
# policy denial): a caller cannot tell which keys exist. The reason goes to the audit and log.
ACCESS_DENIED: Final = "access denied"

Authorize = Callable[[Policy], Decision]
"""Decides a release from the key's policy (the broker evaluates it against token claims)."""
SealKey = Callable[[WrappedKey, bytes], bytes]
"""Seals a released data key (plaintext) for its recipient; raises `Refusal` to refuse."""
_Produce = Callable[[CheckedKey], tuple[WrappedKey, bytes]]


class KeyReleases:
    """Releases of the data keys of one key store (obtain with `KeyService.releases`)."""

    def __init__(self, ledger: KeyLedger) -> None:
        self._ledger = ledger

    def __repr__(self) -> str:
        return f"KeyReleases({str(self._ledger.path)!r})"

    def data_key(
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
        ledger = self._ledger

        def produce(key: CheckedKey) -> tuple[WrappedKey, bytes]:
            version = ledger.current_version(key)
            dek = ledger.random_exact(DATA_KEY_BYTES)
            return ledger.wrap_dek(key, version, dek), dek

        return self._release(op, key_name, None, produce, authorize, seal_key, detail)

    def unwrapped(
        self,
        wrapped: WrappedKey,
        *,
        authorize: Authorize,
        seal_key: SealKey,
        op: str,
        detail: Mapping[str, Any],
    ) -> tuple[WrappedKey, bytes]:
        """Like `data_key`, for the data key inside `wrapped`. An unknown version is refused
        like an unknown key; a wrapped key that fails authentication is an `IntegrityError`."""
        if not isinstance(wrapped, WrappedKey):
            raise UsageError("KeyReleases.unwrapped needs a WrappedKey")

        def produce(key: CheckedKey) -> tuple[WrappedKey, bytes]:
            if key.wrapped_kek(wrapped.version) is None:
                raise Refusal(AccessDenied(ACCESS_DENIED), "denied", Reason.UNKNOWN_VERSION, detail)
            return wrapped, self._ledger.unwrap_dek(key, wrapped)

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
        """Append one audit record for a decision taken before the key store is reached (the
        broker's token refusals). `detail` must not hold secrets."""
        return self._ledger.record(
            op, key_name=key_name, version=version, outcome=outcome, detail=detail
        )

    def _release(
        self,
        op: str,
        key_name: str,
        version_asked: int | None,
        produce: _Produce,
        authorize: Authorize,
        seal_key: SealKey,
        detail: Mapping[str, Any],
    ) -> tuple[WrappedKey, bytes]:
        ledger = self._ledger

        def body(
            conn: sqlite3.Connection, now: str
        ) -> tuple[tuple[WrappedKey, bytes], int, Mapping[str, Any]]:
            # Order matters: nothing about versions is revealed to a workload the policy denies.
            key = ledger.key(conn, key_name)
            if not key.exists:
                raise unknown_key(
                    key_name, Reason.UNKNOWN_KEY, detail, error=AccessDenied(ACCESS_DENIED)
                )
            decision = authorize(ledger.rules.policy(key))
            if not decision.allowed:
                raise Refusal(AccessDenied(ACCESS_DENIED), "denied", decision.reason, detail)
            try:
                wrapped, dek = produce(key)
            except Refusal as exc:
                raise Refusal(exc.error, exc.outcome, exc.reason, detail) from None
            sealed = seal_key(wrapped, dek)
            return (wrapped, sealed), wrapped.version, {**detail, "reason": decision.reason}

        return ledger.run(op, key_name, version_asked, body)
