"""Release policies: the reference values that say which attested workloads may get a named key.

A policy is a set of rules; a rule names a TEE type, the TEE's primary measurement, whether a
debug TEE is acceptable and the lowest TCB status accepted. Attested facts satisfy a policy when
they satisfy one of its rules. Evaluation is default-deny: an empty policy, an unknown TEE type,
a missing or malformed measurement and the sim TEE outside a dev workspace all deny. Each
decision carries a reason code for the audit log; callers outside the KMS never see it.

Rules are stored in the key store with a MAC under a key derived from the master key, so that a
rule written into the file by anyone but the KMS is detected and denies (fail closed).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from hmac import compare_digest
from typing import TYPE_CHECKING, Any, Final, Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as _pyca_hmac

from ppml._internal.canonical import canonical_json
from ppml.attestation.claims import TcbStatus, TeeType
from ppml.errors import UsageError

if TYPE_CHECKING:
    from ppml.kms.service import KeyService

__all__ = [
    "PRIMARY_MEASUREMENT",
    "AttestedFacts",
    "Decision",
    "Policy",
    "PolicyStore",
    "Reason",
    "Rule",
    "parse_measurement",
    "parse_tcb_status",
    "parse_tee",
    "primary_measurement",
]

# The measurement a rule is compared with, per TEE type: the one that names the code that runs.
PRIMARY_MEASUREMENT: Final[Mapping[TeeType, str]] = {
    TeeType.SIM: "measurement",
    TeeType.SGX: "mr_enclave",
    TeeType.TDX: "mr_td",
    TeeType.SNP: "measurement",
}
MEASUREMENT_BYTES: Final = (32, 48)
_HEX = re.compile(r"^[0-9a-f]*$")
_RULE_MAC_LABEL = b"ppml/kms/release-rule/v1\x00"


class Reason:
    """The reason codes of release decisions and policy changes (audit detail and log only)."""

    ALLOWED: Final = "allowed"
    TOKEN_REJECTED: Final = "token_rejected"  # noqa: S105 -- a reason code
    TOKEN_EXPIRED: Final = "token_expired"  # noqa: S105 -- a reason code
    VERIFIER_ERROR: Final = "verifier_error"
    UNKNOWN_KEY: Final = "unknown_key"
    UNKNOWN_VERSION: Final = "unknown_version"
    UNKNOWN_RULE: Final = "unknown_rule"
    BAD_PUBLIC_KEY: Final = "bad_public_key"
    NO_POLICY: Final = "no_policy"
    POLICY_TAMPERED: Final = "policy_tampered"
    SIM_NOT_ALLOWED: Final = "sim_not_allowed"
    UNKNOWN_TEE: Final = "unknown_tee"
    MEASUREMENT_MISSING: Final = "measurement_missing"
    TEE_MISMATCH: Final = "tee_mismatch"
    MEASUREMENT_MISMATCH: Final = "measurement_mismatch"
    DEBUG_NOT_ALLOWED: Final = "debug_not_allowed"
    TCB_TOO_LOW: Final = "tcb_too_low"


# When no rule matches, the reported reason is that of the rule that matched furthest.
_DEPTH = (Reason.TEE_MISMATCH, Reason.MEASUREMENT_MISMATCH, Reason.DEBUG_NOT_ALLOWED)


class AttestedFacts(Protocol):
    """What policies are evaluated on: `TokenClaims` at the broker, `EvidenceClaims` when the
    attestation service appraises evidence."""

    @property
    def tee(self) -> TeeType: ...
    @property
    def measurements(self) -> Mapping[str, str]: ...
    @property
    def debug(self) -> bool: ...
    @property
    def tcb_status(self) -> TcbStatus: ...


def parse_tee(text: str | TeeType) -> TeeType:
    """A TEE type from its name (sim, sgx, tdx, snp)."""
    try:
        return TeeType(text.lower() if isinstance(text, str) else text)
    except ValueError:
        names = ", ".join(t.value for t in TeeType)
        raise UsageError(f"unknown TEE type {str(text)[:32]!r}: use one of {names}") from None


def parse_tcb_status(text: str | TcbStatus) -> TcbStatus:
    """A TCB status from its name (case-insensitive), e.g. UpToDate or SWHardeningNeeded."""
    if isinstance(text, TcbStatus):
        return text
    by_name = {s.value.lower(): s for s in TcbStatus}
    status = by_name.get(text.lower()) if isinstance(text, str) else None
    if status is None:
        names = ", ".join(s.value for s in TcbStatus)
        raise UsageError(f"unknown TCB status {str(text)[:40]!r}: use one of {names}")
    return status


def parse_measurement(text: str) -> str:
    """A measurement as lowercase hex of 32 or 48 bytes (64 or 96 hex digits)."""
    value = text.strip().lower() if isinstance(text, str) else ""
    if not _HEX.match(value) or len(value) // 2 not in MEASUREMENT_BYTES or len(value) % 2:
        raise UsageError(
            "invalid measurement: expected 64 or 96 hex digits (32 or 48 bytes), "
            f"got {len(value) if isinstance(text, str) else 'no text'}"
            + ("" if _HEX.match(value) else " with non-hex characters")
        )
    return value


def primary_measurement(facts: AttestedFacts) -> str | None:
    """The TEE's primary measurement in `facts`, or None when missing (which denies)."""
    name = PRIMARY_MEASUREMENT.get(facts.tee)
    value = facts.measurements.get(name) if name is not None else None
    return value if isinstance(value, str) else None


def _measurement_bytes(text: str) -> bytes | None:
    value = text.lower()
    if len(value) // 2 not in MEASUREMENT_BYTES or not _HEX.match(value) or len(value) % 2:
        return None
    return bytes.fromhex(value)


@dataclass(frozen=True, slots=True)
class Rule:
    """One reference value: a TEE type and measurement, debug acceptance and the lowest TCB."""

    tee: TeeType
    measurement: str
    debug_ok: bool = False
    min_tcb: TcbStatus = TcbStatus.UP_TO_DATE

    def __post_init__(self) -> None:
        object.__setattr__(self, "tee", parse_tee(self.tee))
        object.__setattr__(self, "measurement", parse_measurement(self.measurement))
        object.__setattr__(self, "min_tcb", parse_tcb_status(self.min_tcb))
        if not isinstance(self.debug_ok, bool):
            raise UsageError("debug_ok must be true or false")

    def check(self, facts: AttestedFacts) -> str:
        """`Reason.ALLOWED`, or the first of this rule's conditions `facts` fail."""
        if facts.tee is not self.tee:
            return Reason.TEE_MISMATCH
        measured = primary_measurement(facts)
        measured_bytes = _measurement_bytes(measured) if measured is not None else None
        if measured_bytes is None or not compare_digest(
            measured_bytes, bytes.fromhex(self.measurement)
        ):
            return Reason.MEASUREMENT_MISMATCH
        if facts.debug is not False and not self.debug_ok:
            return Reason.DEBUG_NOT_ALLOWED
        if not (
            isinstance(facts.tcb_status, TcbStatus) and facts.tcb_status.at_least(self.min_tcb)
        ):
            return Reason.TCB_TOO_LOW
        return Reason.ALLOWED

    def to_dict(self) -> dict[str, Any]:
        return {
            "tee": self.tee.value,
            "measurement": self.measurement,
            "debug_ok": self.debug_ok,
            "min_tcb": self.min_tcb.value,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rule:
        if not isinstance(data, Mapping) or set(data) != {
            "tee",
            "measurement",
            "debug_ok",
            "min_tcb",
        }:
            raise UsageError("a rule has exactly: tee, measurement, debug_ok, min_tcb")
        return cls(
            parse_tee(data["tee"]),
            data["measurement"],
            data["debug_ok"],
            parse_tcb_status(data["min_tcb"]),
        )


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of evaluating a policy: allowed or not, why, and the rule that allowed."""

    allowed: bool
    reason: str
    rule: Rule | None = None


@dataclass(frozen=True, slots=True)
class Policy:
    """The release policy of one named key. `intact` is False when a stored rule failed its
    MAC: such a policy denies everything."""

    key_name: str
    rules: tuple[Rule, ...] = ()
    intact: bool = True

    def evaluate(self, facts: AttestedFacts, *, allow_sim: bool) -> Decision:
        """Default-deny: allowed only when `facts` satisfy one rule (and sim is acceptable)."""
        if not self.intact:
            return Decision(False, Reason.POLICY_TAMPERED)
        if not isinstance(facts.tee, TeeType):
            return Decision(False, Reason.UNKNOWN_TEE)
        if facts.tee is TeeType.SIM and not allow_sim:
            return Decision(False, Reason.SIM_NOT_ALLOWED)
        if not self.rules:
            return Decision(False, Reason.NO_POLICY)
        if primary_measurement(facts) is None:
            return Decision(False, Reason.MEASUREMENT_MISSING)
        furthest = Reason.TEE_MISMATCH
        for rule in self.rules:
            reason = rule.check(facts)
            if reason == Reason.ALLOWED:
                return Decision(True, reason, rule)
            if _depth(reason) > _depth(furthest):
                furthest = reason
        return Decision(False, furthest)

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key_name, "rules": [r.to_dict() for r in self.rules]}


def _depth(reason: str) -> int:
    return _DEPTH.index(reason) if reason in _DEPTH else len(_DEPTH)


def rule_mac(mac_key: bytes, store_id: bytes, key_name: str, rule: Rule) -> bytes:
    """The MAC a stored rule carries: binds the store, the key name and every field."""
    h = _pyca_hmac.HMAC(mac_key, hashes.SHA256())
    h.update(_RULE_MAC_LABEL + store_id)
    h.update(canonical_json({"key": key_name, **rule.to_dict()}))
    return h.finalize()


class PolicyStore:
    """The release policies of one key store, for a workspace that does (`allow_sim=True`,
    dev) or does not accept the sim TEE. Obtain one with `KeyService.policies`."""

    def __init__(self, keys: KeyService, *, allow_sim: bool) -> None:
        self._keys = keys
        self.allow_sim = allow_sim

    def __repr__(self) -> str:
        return f"PolicyStore({self._keys!r}, allow_sim={self.allow_sim})"

    def allow(self, key_name: str, rule: Rule) -> Policy:
        """Add `rule` to the key's policy (replacing a rule for the same TEE and measurement).
        `KeyNotFound` for an unknown key; `UsageError` for a sim rule outside dev."""
        return self._keys.allow_release(key_name, rule, allow_sim=self.allow_sim)

    def replace(self, key_name: str, rules: Sequence[Rule]) -> Policy:
        """Replace the key's whole policy with `rules` (an empty sequence denies everything)."""
        return self._keys.replace_release_policy(key_name, rules, allow_sim=self.allow_sim)

    def revoke(self, key_name: str, measurement: str) -> Policy:
        """Remove the key's rules for `measurement`; `UsageError` when it has none."""
        return self._keys.revoke_release(key_name, measurement)

    def show(self, key_name: str) -> Policy:
        """The key's policy (`IntegrityError` if a stored rule was altered)."""
        return self._keys.release_policy(key_name)

    def evaluate(self, key_name: str, facts: AttestedFacts) -> Decision:
        """The decision for one key; an unknown key denies like an empty policy."""
        return self._keys.evaluate_release(key_name, facts, allow_sim=self.allow_sim)

    def matching_keys(self, facts: AttestedFacts) -> list[str]:
        """The names of the keys whose policies `facts` satisfy, sorted (the appraisal function
        of the attestation service)."""
        return self._keys.matching_keys(facts, allow_sim=self.allow_sim)
