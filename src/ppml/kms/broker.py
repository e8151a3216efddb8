"""The key broker (RATS relying party): releases data keys to attested workloads only.

A release is: verify the attestation token -> find the key -> evaluate the key's default-deny
release policy against the token's claims -> seal the data key with HPKE to the workload's
public key from the token. The plaintext data key never leaves the KMS unsealed. Every release
and every refusal is an audit record; callers see one of two fixed refusals --
`AttestationFailed("attestation failed")` for a token that does not verify, and
`AccessDenied("access denied")` for everything after it (unknown key or version, policy) -- so
that a workload cannot learn which keys exist. The precise reason is in the audit and the log.

`ReleasedKey` is what travels back to the workload; `open_released` is the workload's side.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ppml._internal.clock import Clock, MonotonicClock, utc_now
from ppml.attestation.claims import TokenClaims
from ppml.crypto.envelope import DATA_KEY_BYTES, DataKey, WrappedKey, validate_key_name
from ppml.crypto.hpke import (
    PUBLIC_KEY_BYTES,
    RELEASE_PURPOSES,
    ReleasePurpose,
    open_sealed,
    release_info,
    seal_to,
)
from ppml.errors import AttestationFailed, ConfigurationError, IntegrityError, UsageError
from ppml.kms.audit import Refusal
from ppml.kms.policy import AttestedFacts, Reason, Rule, primary_measurement
from ppml.kms.release_policies import ReleasePolicies
from ppml.kms.releases import ReleaseTerms
from ppml.kms.service import KeyService

__all__ = [
    "ATTESTATION_FAILED",
    "MAX_TOKEN_CHARS",
    "KeyBroker",
    "ReleasedKey",
    "TokenVerifier",
    "open_released",
]

ATTESTATION_FAILED: Final = "attestation failed"
MAX_TOKEN_CHARS: Final = 16 * 1024
OP_DATAKEY: Final = "release_datakey"
OP_UNWRAP: Final = "release_unwrap"
_PURPOSE: Final[dict[str, ReleasePurpose]] = {OP_DATAKEY: "datakey", OP_UNWRAP: "unwrap"}
_MAX_SEALED_BYTES = 1024
_MAX_DETAIL_CHARS = 128
_MAX_KINDS = 65_536  # kinds of refusal remembered (client address, operation, reason)

TokenVerifier = Callable[[str], TokenClaims]
"""Checks an attestation token and returns its claims, or raises `AttestationFailed`."""

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ReleasedKey:
    """A released data key: its wrapped form (for the file header) and the data key sealed with
    HPKE to the workload's public key, under `release_info(wrapped, purpose)`."""

    wrapped: WrappedKey
    sealed_key: bytes
    purpose: ReleasePurpose

    def __post_init__(self) -> None:
        if not isinstance(self.wrapped, WrappedKey):
            raise UsageError("a released key needs a WrappedKey")
        if not isinstance(self.sealed_key, bytes) or not (
            0 < len(self.sealed_key) <= _MAX_SEALED_BYTES
        ):
            raise UsageError("invalid sealed key")
        if self.purpose not in RELEASE_PURPOSES:
            raise UsageError(f"invalid release purpose {self.purpose!r}")

    def to_dict(self) -> dict[str, Any]:
        """The wire form: the wrapped key's text form and the sealed key in base64."""
        return {
            "wrapped_key": self.wrapped.to_text(),
            "sealed_key": base64.b64encode(self.sealed_key).decode(),
            "purpose": self.purpose,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReleasedKey:
        """Parse the wire form; anything malformed is an opaque `IntegrityError`."""
        if not isinstance(data, Mapping) or set(data) != {"wrapped_key", "sealed_key", "purpose"}:
            raise IntegrityError()
        wrapped_text, sealed_text, purpose = (
            data["wrapped_key"],
            data["sealed_key"],
            data["purpose"],
        )
        if not (isinstance(wrapped_text, str) and isinstance(sealed_text, str)):
            raise IntegrityError()
        if purpose not in RELEASE_PURPOSES:
            raise IntegrityError()
        try:
            sealed = base64.b64decode(sealed_text.encode("ascii"), validate=True)
            return cls(WrappedKey.from_text(wrapped_text), sealed, purpose)
        except (binascii.Error, ValueError, UsageError):
            raise IntegrityError() from None


def open_released(
    released: ReleasedKey,
    private_key: X25519PrivateKey,
    *,
    purpose: ReleasePurpose | None = None,
    wrapped: WrappedKey | None = None,
) -> DataKey:
    """The workload's side: open a released key with the private key whose public half the
    attestation token carried. Pass `purpose` and (for an unwrap) the `wrapped` key you sent to
    also check that the broker answered what was asked. Any mismatch or tampering is an opaque
    `IntegrityError`."""
    if not isinstance(released, ReleasedKey):
        raise UsageError("open_released needs a ReleasedKey")
    if purpose is not None and purpose != released.purpose:
        raise IntegrityError()
    if wrapped is not None and wrapped != released.wrapped:
        raise IntegrityError()
    plaintext = open_sealed(
        private_key, released.sealed_key, info=release_info(released.wrapped, released.purpose)
    )
    if len(plaintext) != DATA_KEY_BYTES:
        raise IntegrityError()
    return DataKey(plaintext, released.wrapped)


class KeyBroker:
    """Releases data keys of a `KeyService` to workloads whose attestation tokens satisfy the
    keys' release policies. `allow_sim` is the workspace's dev flag: without it, claims from
    the sim TEE are refused whatever the policy says."""

    def __init__(
        self,
        keys: KeyService,
        verify_token: TokenVerifier,
        *,
        allow_sim: bool,
        clock: Clock = utc_now,
        refusal_window_s: float = 10.0,
    ) -> None:
        if not callable(verify_token):
            raise ConfigurationError("the key broker needs a token verifier")
        self._keys = keys
        self._verify_token = verify_token
        self._allow_sim = bool(allow_sim)
        self._clock = clock
        self._refusals = _Sparse(refusal_window_s)

    def __repr__(self) -> str:
        return f"KeyBroker({self._keys!r}, allow_sim={self._allow_sim})"

    @property
    def policies(self) -> ReleasePolicies:
        """The release policies this broker enforces."""
        return self._keys.policies(allow_sim=self._allow_sim)

    def matching_keys(self, facts: AttestedFacts) -> list[str]:
        """The keys whose policies `facts` satisfy (the attestation service's appraisal)."""
        return self.policies.matching_keys(facts)

    def authenticate(
        self, op: str, key_name: str | None, token: str, *, client: str | None = None
    ) -> TokenClaims:
        """The claims of `token`, verified, for a release `op` ("release_datakey" or
        "release_unwrap") of `key_name`; else `AttestationFailed` (fixed message), audited.

        Refusals of calls no token authenticates are audited sparingly, per `client` (its
        address), operation and reason: the first in each window in full, the others counted
        into the next record of that kind (``suppressed``), so that a flood cannot bury the
        audit log. Everything after a verified token is audited in full."""
        if op not in (OP_DATAKEY, OP_UNWRAP):
            raise UsageError(f"unknown release operation {op!r}")
        return self._verify(op, key_name, None, token, client=client)

    def claims_of(self, token: str) -> TokenClaims | None:
        """The claims of `token` if it verifies and is usable now, else None; records nothing
        (the fast path of `authenticate`, for a caller that cannot wait on the audit log)."""
        try:
            claims, reason = self._screen(token, "")
        except ConfigurationError:
            return None
        return claims if reason is None else None

    def datakey(
        self, key_name: str, token: str = "", *, claims: TokenClaims | None = None
    ) -> ReleasedKey:
        """A fresh data key of `key_name`'s current version, sealed to the token's public key
        (`claims`: a token `authenticate` verified already)."""
        validate_key_name(key_name)
        if claims is None:
            claims = self._verify(OP_DATAKEY, key_name, None, token)
        terms = self._terms(claims, OP_DATAKEY)
        wrapped, sealed = self._keys.releases.data_key(key_name, terms)
        return ReleasedKey(wrapped, sealed, "datakey")

    def unwrap(
        self, wrapped: WrappedKey, token: str = "", *, claims: TokenClaims | None = None
    ) -> ReleasedKey:
        """The data key inside `wrapped` (an existing file's), sealed to the token's public key
        (`claims`: a token `authenticate` verified already)."""
        if not isinstance(wrapped, WrappedKey):
            raise UsageError("unwrap needs a WrappedKey")
        if claims is None:
            claims = self._verify(OP_UNWRAP, wrapped.key_name, wrapped.version, token)
        terms = self._terms(claims, OP_UNWRAP)
        released, sealed = self._keys.releases.unwrapped(wrapped, terms)
        return ReleasedKey(released, sealed, "unwrap")

    # -- administration (the HTTP admin routes use these) --------------------------------

    def set_policy(self, key_name: str, rules: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Replace the key's release policy with `rules` (dicts: tee, measurement, debug_ok,
        min_tcb); returns the policy as a dict."""
        parsed = [Rule.from_dict(r) for r in rules]
        return self.policies.replace(key_name, parsed).to_dict()

    def get_policy(self, key_name: str) -> dict[str, Any]:
        return self.policies.show(key_name).to_dict()

    # -- internals -----------------------------------------------------------------------

    def _screen(self, token: str, op: str) -> tuple[TokenClaims | None, str | None]:
        """(claims, None) for a token usable now; else the claims (when its signature
        verified) and the refusal reason. A fault of the verifier propagates."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
            return None, Reason.TOKEN_REJECTED
        try:
            claims = self._verify_token(token)
        except AttestationFailed as exc:
            _log.info("key broker %s: token did not verify: %s", op, exc.message)
            return None, Reason.TOKEN_REJECTED
        if not isinstance(claims, TokenClaims):
            raise ConfigurationError("the token verifier returned no claims")
        expires = claims.expires_at
        if expires.tzinfo is None or self._now() >= expires:
            return claims, Reason.TOKEN_EXPIRED
        public_key = claims.public_key
        if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_BYTES:
            return claims, Reason.BAD_PUBLIC_KEY
        return claims, None

    def _verify(
        self,
        op: str,
        key_name: str | None,
        version: int | None,
        token: str,
        *,
        client: str | None = None,
    ) -> TokenClaims:
        """The token's claims, or an audited refusal (`AttestationFailed`, fixed message).

        A refusal of a call from a client address that no token authenticates is audited
        sparingly (`authenticate`); one whose token verified (expired, an unusable key) and any
        in-process call are audited in full."""
        try:
            claims, reason = self._screen(token, op)
        except Exception as exc:
            # Not a verdict on the token: a fault. Record it, then let it surface as one.
            _log.error("key broker %s %r: token verifier failed: %s", op, key_name, type(exc))
            self._keys.releases.record(
                op,
                key_name=key_name,
                version=version,
                outcome="error",
                detail={"reason": Reason.VERIFIER_ERROR},
            )
            raise
        if reason is None:
            assert claims is not None
            return claims
        record: dict[str, Any] = dict(_detail(claims, _PURPOSE[op])) if claims else {}
        record["reason"] = reason
        suppressed: int | None = 0
        if client is not None:
            record["client"] = _clip(client)
            if claims is None:  # nothing authenticated this call
                suppressed = self._refusals.admit((client, op, reason))
        if suppressed is not None:
            if suppressed:
                record["suppressed"] = suppressed
            self._keys.releases.record(
                op, key_name=key_name, version=version, outcome="denied", detail=record
            )
        _log.info("key broker %s %r: refused: %s", op, key_name, reason)
        raise AttestationFailed(ATTESTATION_FAILED)

    def flush(self) -> None:
        """Record the refusals counted but not yet recorded (at shutdown)."""
        for (client, op, reason), count in self._refusals.drain():
            detail: dict[str, Any] = {"reason": reason, "suppressed": count}
            if client is not None:
                detail["client"] = _clip(client)
            self._keys.releases.record(
                op, key_name=None, version=None, outcome="denied", detail=detail
            )

    def _terms(self, claims: TokenClaims, op: str) -> ReleaseTerms:
        """A release `op` for the workload of `claims`: decided by the key's policy, the data
        key sealed to the token's public key."""
        purpose = _PURPOSE[op]
        detail = _detail(claims, purpose)
        allow_sim = self._allow_sim

        def seal(wrapped: WrappedKey, dek: bytes) -> bytes:
            try:
                return seal_to(claims.public_key, dek, info=release_info(wrapped, purpose))
            except UsageError:  # e.g. a low-order point: nothing can be sealed to it
                raise Refusal(
                    AttestationFailed(ATTESTATION_FAILED), "denied", Reason.BAD_PUBLIC_KEY, detail
                ) from None

        return ReleaseTerms(
            op, lambda policy: policy.evaluate(claims, allow_sim=allow_sim), seal, detail
        )

    def _now(self) -> _dt.datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise ConfigurationError("the clock must return timezone-aware times")
        return now


class _Sparse:
    """Which refusals to record: per kind, the first of each `window_s` window, and then, with
    the first of a later window, how many were left out in between."""

    def __init__(self, window_s: float, clock: MonotonicClock = time.monotonic) -> None:
        self._window, self._clock = window_s, clock
        self._kinds: dict[Any, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def admit(self, kind: Any) -> int | None:
        """None: leave this one out (counted); else record it, with this many left out before."""
        now = self._clock()
        with self._lock:
            started, left_out = self._kinds.get(kind, (-math.inf, 0))
            if now - started < self._window:
                self._kinds[kind] = (started, left_out + 1)
                return None
            self._kinds[kind] = (now, 0)
            if len(self._kinds) > _MAX_KINDS:
                self._shrink(now)
            return left_out

    def _shrink(self, now: float) -> None:
        """Forget the kinds whose window is over; counts still owed move to one kind per
        operation and reason, with no client (many clients)."""
        kept: dict[Any, tuple[float, int]] = {}
        owed: dict[Any, int] = {}
        for kind, (started, left_out) in self._kinds.items():
            if now - started < self._window and len(kept) < _MAX_KINDS // 2:
                kept[kind] = (started, left_out)
            elif left_out:
                merged = (None, *kind[1:]) if isinstance(kind, tuple) else kind
                owed[merged] = owed.get(merged, 0) + left_out
        for kind, count in owed.items():
            started, left_out = kept.get(kind, (now, 0))
            kept[kind] = (started, left_out + count)
        self._kinds = kept

    def drain(self) -> list[tuple[Any, int]]:
        with self._lock:
            out = [(k, n) for k, (_, n) in self._kinds.items() if n]
            self._kinds = {k: (t, 0) for k, (t, _) in self._kinds.items()}
        return out


def _clip(value: object) -> str | None:
    return None if value is None else str(value)[:_MAX_DETAIL_CHARS]


def _detail(claims: TokenClaims, purpose: ReleasePurpose) -> dict[str, Any]:
    """What the audit records of a release: who asked, never the token or key material."""
    return {
        "purpose": purpose,
        "tee": _clip(claims.tee),
        "measurement": _clip(primary_measurement(claims)),
        "debug": bool(claims.debug),
        "tcb_status": _clip(claims.tcb_status),
        "token_id": _clip(claims.token_id),
    }
