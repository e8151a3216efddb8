"""Release policies: the reference values that say which attested workloads may get a named key.

A policy is a set of rules; a rule names a TEE type, the TEE's primary measurement, whether a
debug TEE is acceptable and the lowest TCB status accepted, and optionally more reference values
of its TEE type (all must hold):

- SGX: ``mr_signer``, ``isv_prod_id``, ``min_isv_svn``; with all three, the measurement may
  be ``*`` (`ANY_MEASUREMENT`): any enclave of that signer and product at that security version
  or later (how a vendor's enclave updates keep their keys), instead of one MRENCLAVE;
- TDX: ``mr_seam``, ``rtmr0`` .. ``rtmr3``;
- SEV-SNP: ``migration_agent_ok`` and ``smt_ok`` (False refuses a guest whose launch policy
  allows a migration agent, or SMT), ``min_reported_tcb`` (the lowest REPORTED_TCB component
  levels: ``bootloader``, ``tee``, ``snp``, ``microcode``, and ``fmc`` on Turin); a debug guest
  is one whose policy allows debugging.

Digests are compared over their decoded bytes, at full width, in constant time: a value of
another length is a mismatch, never a prefix match. Attested facts satisfy a policy when they
satisfy one of its rules. Evaluation is default-deny: an empty policy, an unknown TEE type,
a missing or malformed measurement and the sim TEE outside a dev workspace all deny. Each
decision carries a reason code for the audit log; callers outside the KMS never see it.

These are values only: the KMS stores rules with a MAC under a key derived from the master key
(`ppml.kms.stored_rules`), so that a rule written into the file by anyone but the KMS is detected
and denies (fail closed); `ppml.kms.release_policies` changes and evaluates a key store's policies.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from hmac import compare_digest
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Protocol

from ppml.attestation.claims import TcbStatus, TeeType
from ppml.errors import UsageError

__all__ = [
    "ANY_MEASUREMENT",
    "PRIMARY_MEASUREMENT",
    "AttestedFacts",
    "Decision",
    "Policy",
    "Reason",
    "Rule",
    "load_policy_file",
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
_HEX = re.compile(r"[0-9a-f]*")


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
    ATTRIBUTE_MISMATCH: Final = "attribute_mismatch"  # ISVPRODID, an SEV-SNP guest policy bit
    SVN_TOO_LOW: Final = "svn_too_low"  # ISVSVN, an SEV-SNP reported TCB component
    TCB_TOO_LOW: Final = "tcb_too_low"


# When no rule matches, the reported reason is that of the rule that matched furthest.
_DEPTH = (
    Reason.TEE_MISMATCH,
    Reason.MEASUREMENT_MISMATCH,
    Reason.ATTRIBUTE_MISMATCH,
    Reason.DEBUG_NOT_ALLOWED,
    Reason.SVN_TOO_LOW,
)

# The extra reference values, per TEE type: digests (name -> bytes) and the other fields.
_DIGESTS: Final[Mapping[TeeType, Mapping[str, int]]] = {
    TeeType.SGX: {"mr_signer": 32},
    TeeType.TDX: {"mr_seam": 48, "rtmr0": 48, "rtmr1": 48, "rtmr2": 48, "rtmr3": 48},
}
_SGX_FIELDS: Final = ("isv_prod_id", "min_isv_svn")
_SNP_FIELDS: Final = ("migration_agent_ok", "smt_ok", "min_reported_tcb")
_ALL_DIGESTS: Final = ("mr_signer", "mr_seam", "rtmr0", "rtmr1", "rtmr2", "rtmr3")
_TCB_COMPONENTS: Final = ("bootloader", "tee", "snp", "microcode", "fmc")
_SMT_BIT: Final = 1 << 16
_MIGRATION_AGENT_BIT: Final = 1 << 18
_BASE_FIELDS: Final = frozenset({"tee", "measurement", "debug_ok", "min_tcb"})
_OPTIONAL_FIELDS: Final = frozenset((*_ALL_DIGESTS, *_SGX_FIELDS, *_SNP_FIELDS))
MAX_POLICY_FILE_BYTES: Final = 1024 * 1024


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
    @property
    def extra(self) -> Mapping[str, object]: ...


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


ANY_MEASUREMENT: Final = "*"


def parse_measurement(text: str) -> str:
    """A measurement as lowercase hex of 32 or 48 bytes (64 or 96 hex digits), or
    `ANY_MEASUREMENT` (``*``, which only an SGX signer rule may use)."""
    value = text.strip().lower() if isinstance(text, str) else ""
    if value == ANY_MEASUREMENT:
        return value
    if not _HEX.fullmatch(value) or len(value) // 2 not in MEASUREMENT_BYTES or len(value) % 2:
        raise UsageError(
            "invalid measurement: expected 64 or 96 hex digits (32 or 48 bytes), "
            f"got {len(value) if isinstance(text, str) else 'no text'}"
            + ("" if _HEX.fullmatch(value) else " with non-hex characters")
        )
    return value


def primary_measurement(facts: AttestedFacts) -> str | None:
    """The TEE's primary measurement in `facts`, or None when missing (which denies)."""
    name = PRIMARY_MEASUREMENT.get(facts.tee)
    value = facts.measurements.get(name) if name is not None else None
    return value if isinstance(value, str) else None


def _measurement_bytes(text: str) -> bytes | None:
    value = text.lower()
    if len(value) // 2 not in MEASUREMENT_BYTES or not _HEX.fullmatch(value) or len(value) % 2:
        return None
    return bytes.fromhex(value)


def _uint(value: object, name: str, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise UsageError(f"{name} must be an integer from 0 to {maximum}")
    return value


def _digest(text: object, name: str, size: int) -> str:
    value = text.strip().lower() if isinstance(text, str) else ""
    if len(value) != 2 * size or not _HEX.fullmatch(value):
        raise UsageError(f"invalid {name}: expected {2 * size} hex digits ({size} bytes)")
    return value


def _same_digest(measured: object, expected_hex: str) -> bool:
    """Full-width, constant-time comparison of a measured hex digest with a reference value."""
    if not isinstance(measured, str) or len(measured) % 2 or not _HEX.fullmatch(measured.lower()):
        return False
    return compare_digest(bytes.fromhex(measured.lower()), bytes.fromhex(expected_hex))


def _fact_uint(facts: AttestedFacts, name: str) -> int | None:
    extra = getattr(facts, "extra", None)
    value = extra.get(name) if isinstance(extra, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _fact_tcb(facts: AttestedFacts) -> Mapping[str, object] | None:
    extra = getattr(facts, "extra", None)
    value = extra.get("reported_tcb") if isinstance(extra, Mapping) else None
    return value if isinstance(value, Mapping) else None


@dataclass(frozen=True, slots=True)
class Rule:
    """One reference value: a TEE type and measurement, debug acceptance and the lowest TCB,
    and the optional reference values of its TEE type (see the module docstring)."""

    tee: TeeType
    measurement: str
    debug_ok: bool = False
    min_tcb: TcbStatus = TcbStatus.UP_TO_DATE
    mr_signer: str | None = None
    isv_prod_id: int | None = None
    min_isv_svn: int | None = None
    mr_seam: str | None = None
    rtmr0: str | None = None
    rtmr1: str | None = None
    rtmr2: str | None = None
    rtmr3: str | None = None
    migration_agent_ok: bool = True
    smt_ok: bool = True
    min_reported_tcb: Mapping[str, int] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tee", parse_tee(self.tee))
        object.__setattr__(self, "measurement", parse_measurement(self.measurement))
        object.__setattr__(self, "min_tcb", parse_tcb_status(self.min_tcb))
        for name in ("debug_ok", "migration_agent_ok", "smt_ok"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"{name} must be true or false")
        digests = _DIGESTS.get(self.tee, {})
        for name in _ALL_DIGESTS:
            value = getattr(self, name)
            if value is None:
                continue
            if name not in digests:
                raise UsageError(f"{name} is a reference value of another TEE type")
            object.__setattr__(self, name, _digest(value, name, digests[name]))
        if self.tee is not TeeType.SGX and (
            self.isv_prod_id is not None or self.min_isv_svn is not None
        ):
            raise UsageError("isv_prod_id and min_isv_svn are SGX reference values")
        if self.isv_prod_id is not None:
            _uint(self.isv_prod_id, "isv_prod_id", 0xFFFF)
        if self.min_isv_svn is not None:
            _uint(self.min_isv_svn, "min_isv_svn", 0xFFFF)
        if self.tee is not TeeType.SNP and (
            not self.migration_agent_ok or not self.smt_ok or self.min_reported_tcb is not None
        ):
            raise UsageError(
                "migration_agent_ok, smt_ok and min_reported_tcb are SEV-SNP reference values"
            )
        if self.measurement == ANY_MEASUREMENT and (
            self.tee is not TeeType.SGX
            or self.mr_signer is None
            or self.isv_prod_id is None
            or self.min_isv_svn is None
        ):
            raise UsageError(
                "a rule for any measurement ('*') is an SGX signer rule: it needs mr_signer, "
                "isv_prod_id and min_isv_svn"
            )
        if self.min_reported_tcb is not None:
            tcb = self.min_reported_tcb
            if not isinstance(tcb, Mapping) or not tcb or not set(tcb) <= set(_TCB_COMPONENTS):
                raise UsageError(
                    "min_reported_tcb maps some of " + ", ".join(_TCB_COMPONENTS) + " to levels"
                )
            checked = {k: _uint(tcb[k], f"min_reported_tcb.{k}", 255) for k in _TCB_COMPONENTS
                       if k in tcb}  # fmt: skip
            object.__setattr__(self, "min_reported_tcb", MappingProxyType(checked))

    def check(self, facts: AttestedFacts) -> str:
        """`Reason.ALLOWED`, or the first of this rule's conditions `facts` fail."""
        if facts.tee is not self.tee:
            return Reason.TEE_MISMATCH
        measured = primary_measurement(facts)
        measured_bytes = _measurement_bytes(measured) if measured is not None else None
        if measured_bytes is None:
            return Reason.MEASUREMENT_MISMATCH
        if self.measurement != ANY_MEASUREMENT and not compare_digest(
            measured_bytes, bytes.fromhex(self.measurement)
        ):
            return Reason.MEASUREMENT_MISMATCH
        for name in _ALL_DIGESTS:
            expected = getattr(self, name)
            if expected is not None and not _same_digest(facts.measurements.get(name), expected):
                return Reason.MEASUREMENT_MISMATCH
        if self.isv_prod_id is not None and _fact_uint(facts, "isv_prod_id") != self.isv_prod_id:
            return Reason.ATTRIBUTE_MISMATCH
        if not (self.migration_agent_ok and self.smt_ok):
            policy = _fact_uint(facts, "guest_policy")
            if policy is None:
                return Reason.ATTRIBUTE_MISMATCH
            if not self.migration_agent_ok and policy & _MIGRATION_AGENT_BIT:
                return Reason.ATTRIBUTE_MISMATCH
            if not self.smt_ok and policy & _SMT_BIT:
                return Reason.ATTRIBUTE_MISMATCH
        if facts.debug is not False and not self.debug_ok:
            return Reason.DEBUG_NOT_ALLOWED
        if self.min_isv_svn is not None:
            svn = _fact_uint(facts, "isv_svn")
            if svn is None or svn < self.min_isv_svn:
                return Reason.SVN_TOO_LOW
        if self.min_reported_tcb is not None:
            reported = _fact_tcb(facts)
            for name, minimum in self.min_reported_tcb.items():
                level = reported.get(name) if reported is not None else None
                if isinstance(level, bool) or not isinstance(level, int) or level < minimum:
                    return Reason.SVN_TOO_LOW
        if not (
            isinstance(facts.tcb_status, TcbStatus) and facts.tcb_status.at_least(self.min_tcb)
        ):
            return Reason.TCB_TOO_LOW
        return Reason.ALLOWED

    def constraints(self) -> dict[str, Any]:
        """The optional reference values this rule sets (none: an empty dict)."""
        out: dict[str, Any] = {}
        for name in (*_ALL_DIGESTS, "isv_prod_id", "min_isv_svn"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if not self.migration_agent_ok:
            out["migration_agent_ok"] = False
        if not self.smt_ok:
            out["smt_ok"] = False
        if self.min_reported_tcb is not None:
            out["min_reported_tcb"] = dict(self.min_reported_tcb)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The rule's fields; the optional ones only when set (so a rule that sets none has
        the same form, and the same stored MAC, as before they existed)."""
        return {
            "tee": self.tee.value,
            "measurement": self.measurement,
            "debug_ok": self.debug_ok,
            "min_tcb": self.min_tcb.value,
            **self.constraints(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rule:
        if not isinstance(data, Mapping) or not set(data) >= _BASE_FIELDS:
            raise UsageError(
                "a rule has exactly: tee, measurement, debug_ok, min_tcb (and optional fields)"
            )
        unknown = set(data) - _BASE_FIELDS - _OPTIONAL_FIELDS
        if unknown:
            raise UsageError(f"unknown rule field {sorted(unknown)[0][:40]!r}")
        optional = {k: data[k] for k in _OPTIONAL_FIELDS if k in data}
        return cls(
            parse_tee(data["tee"]),
            data["measurement"],
            data["debug_ok"],
            parse_tcb_status(data["min_tcb"]),
            **optional,
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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, key_name: str | None = None) -> Policy:
        """A policy from its JSON form ``{"key": NAME, "rules": [...]}`` (what `ppml policy
        show --format json` prints); ``key`` is optional when `key_name` is given."""
        if not isinstance(data, Mapping) or not set(data) <= {"key", "rules"}:
            raise UsageError('a policy is an object with "rules" (and optionally "key")')
        rules = data.get("rules")
        if not isinstance(rules, list):
            raise UsageError('a policy\'s "rules" must be a list')
        name = data.get("key", key_name)
        if not isinstance(name, str) or not name:
            name = "policy"
        return cls(name, tuple(Rule.from_dict(r) for r in rules))


def load_policy_file(path: str | Path, *, key_name: str | None = None) -> Policy:
    """Read a policy file: the JSON that `ppml policy show --format json` prints. `UsageError`
    for a missing, oversized or malformed file."""
    file = Path(path)
    try:
        with file.open("rb") as fh:
            data = fh.read(MAX_POLICY_FILE_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"cannot read the policy file: {exc.strerror}", path=file) from None
    if len(data) > MAX_POLICY_FILE_BYTES:
        raise UsageError("the policy file is too large", path=file)
    try:
        doc = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        raise UsageError("the policy file is not JSON", path=file) from None
    try:
        return Policy.from_dict(doc, key_name=key_name)
    except UsageError as exc:
        raise UsageError(exc.message, path=file) from None


def _depth(reason: str) -> int:
    return _DEPTH.index(reason) if reason in _DEPTH else len(_DEPTH)
