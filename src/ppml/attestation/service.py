"""The attestation service (RATS Verifier) as a domain class: hands out challenges, verifies
evidence bound to a challenge and a workload key, appraises it, and issues a token."""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ppml._internal.clock import Clock, utc_now
from ppml.attestation.challenge import DEFAULT_CHALLENGE_TTL, Challenge, ChallengeStore
from ppml.attestation.claims import EvidenceClaims, TeeType, TokenClaims, report_data_for
from ppml.attestation.sim import SimVerifier
from ppml.attestation.token import DEFAULT_ISSUER, DEFAULT_TOKEN_TTL, TokenIssuer
from ppml.attestation.verifier import Verifier
from ppml.errors import AttestationFailed, ConfigurationError, PPMLError

__all__ = ["Appraiser", "AttestationResult", "AttestationService", "no_policies"]

_log = logging.getLogger("ppml.attestation")

WORKLOAD_KEY_BYTES = 32
_MAX_LOGGED_TEE = 32

Appraiser = Callable[[EvidenceClaims], Sequence[str]]
"""Returns the names of the key policies that verified claims satisfy (provided by the KMS)."""


def no_policies(claims: EvidenceClaims) -> Sequence[str]:
    """The default appraiser: the claims satisfy no key policy."""
    return ()


@dataclass(frozen=True, slots=True)
class AttestationResult:
    """A successful attestation. The token is a bearer credential: not in the repr."""

    token: str = field(repr=False)
    claims: TokenClaims
    expires_at: _dt.datetime


class AttestationService:
    """Verifies evidence for the TEE types it has verifiers for, and issues tokens.

    Fails closed: unknown TEE types, TEE types without a verifier, and sim evidence unless
    `allow_sim` is set are all refused. Refusals raise `AttestationFailed` with the precise
    reason and are logged to "ppml.attestation"; tokens and keys are never logged.
    """

    def __init__(
        self,
        *,
        verifiers: Mapping[TeeType, Verifier],
        challenges: ChallengeStore,
        issuer: TokenIssuer,
        appraise: Appraiser | None = None,
        allow_sim: bool = False,
    ) -> None:
        for tee, verifier in verifiers.items():
            if not isinstance(tee, TeeType) or verifier.tee is not tee:
                raise ConfigurationError(f"the verifier registered for {tee!s} is for another TEE")
        if not isinstance(challenges, ChallengeStore) or not isinstance(issuer, TokenIssuer):
            raise ConfigurationError("a ChallengeStore and a TokenIssuer are required")
        self._verifiers = MappingProxyType(dict(verifiers))
        self._challenges = challenges
        self._issuer = issuer
        self._appraise: Appraiser = appraise if appraise is not None else no_policies
        self._allow_sim = allow_sim is True

    @classmethod
    def for_keys(
        cls,
        token_key: EllipticCurvePrivateKey,
        sim_platform_public_key: Ed25519PublicKey | None = None,
        *,
        allow_sim: bool = False,
        appraise: Appraiser | None = None,
        verifiers: Mapping[TeeType, Verifier] | None = None,
        issuer: str = DEFAULT_ISSUER,
        token_ttl: _dt.timedelta = DEFAULT_TOKEN_TTL,
        challenge_ttl: _dt.timedelta = DEFAULT_CHALLENGE_TTL,
        clock: Clock = utc_now,
    ) -> AttestationService:
        """A service signing tokens with `token_key`. Sim evidence is verified against
        `sim_platform_public_key` only when `allow_sim` is set (development workspaces);
        hardware `verifiers` are added as given."""
        table: dict[TeeType, Verifier] = dict(verifiers or {})
        if allow_sim:
            if sim_platform_public_key is None:
                raise ConfigurationError("allow_sim needs the sim platform public key")
            table[TeeType.SIM] = SimVerifier(sim_platform_public_key)
        else:
            table.pop(TeeType.SIM, None)
        return cls(
            verifiers=table,
            challenges=ChallengeStore(ttl=challenge_ttl, clock=clock),
            issuer=TokenIssuer(token_key, issuer=issuer, ttl=token_ttl, clock=clock),
            appraise=appraise,
            allow_sim=allow_sim,
        )

    @property
    def issuer(self) -> TokenIssuer:
        return self._issuer

    @property
    def tee_types(self) -> frozenset[TeeType]:
        """The TEE types whose evidence this service accepts."""
        return frozenset(t for t in self._verifiers if t is not TeeType.SIM or self._allow_sim)

    def challenge(self, client: str | None = None) -> Challenge:
        """A fresh single-use nonce for a workload to bind into its evidence (`client`: who asks,
        e.g. a network address, for the per-client limit)."""
        return self._challenges.issue(client)

    def attest(
        self, tee: str, evidence: bytes, nonce: bytes, public_key: bytes
    ) -> AttestationResult:
        """Verify `evidence` of TEE type `tee`, bound to the challenge `nonce` and the workload's
        X25519 `public_key`, appraise it, and return a signed token."""
        try:
            return self._attest(tee, evidence, nonce, public_key)
        except PPMLError as exc:
            _log.warning("attestation refused: tee=%r: %s", _loggable(tee), exc.message)
            raise

    def _attest(
        self, tee_name: str, evidence: bytes, nonce: bytes, public_key: bytes
    ) -> AttestationResult:
        try:
            tee = TeeType(tee_name)
        except ValueError:
            raise AttestationFailed("unknown TEE type") from None
        if tee is TeeType.SIM and not self._allow_sim:
            raise AttestationFailed("sim evidence is not accepted by this service")
        verifier = self._verifiers.get(tee)
        if verifier is None:
            raise AttestationFailed(f"no verifier configured for TEE type {tee.value}")
        self._challenges.consume(nonce)
        if not isinstance(public_key, bytes) or len(public_key) != WORKLOAD_KEY_BYTES:
            raise AttestationFailed(f"the workload public key must be {WORKLOAD_KEY_BYTES} bytes")
        if not isinstance(evidence, bytes):
            raise AttestationFailed("evidence must be bytes")
        expected = report_data_for(nonce, public_key)
        claims = verifier.verify(evidence, expected_report_data=expected)
        if claims.tee is not tee:
            raise AttestationFailed("the verifier returned claims for another TEE type")
        policies = self._appraise(claims)
        if isinstance(policies, str | bytes) or not all(isinstance(p, str) for p in policies):
            raise ConfigurationError("the appraiser must return a sequence of policy names")
        issued = self._issuer.mint(claims, public_key, tuple(policies))
        _log.info(
            "attestation accepted: tee=%s measurements=%s debug=%s policies=%s token_id=%s",
            tee.value,
            dict(claims.measurements),
            claims.debug,
            list(issued.claims.policies_matched),
            issued.claims.token_id,
        )
        return AttestationResult(
            token=issued.token, claims=issued.claims, expires_at=issued.claims.expires_at
        )


def _loggable(tee: object) -> str:
    text = tee if isinstance(tee, str) else type(tee).__name__
    return text[:_MAX_LOGGED_TEE]
