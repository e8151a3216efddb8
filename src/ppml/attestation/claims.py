"""What attestation establishes about a workload: TEE type, measurements, debug, TCB status.

`EvidenceClaims` is what a `Verifier` extracts from verified evidence; `TokenClaims` is what a
signed attestation token carries to the key broker (the same facts, plus the workload's public
key, the policies it matched and the token's lifetime).
"""

from __future__ import annotations

import datetime as _dt
import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "REPORT_DATA_BYTES",
    "EvidenceClaims",
    "TcbStatus",
    "TeeType",
    "TokenClaims",
    "report_data_for",
]

REPORT_DATA_BYTES = 64


class TeeType(enum.StrEnum):
    SIM = "sim"
    SGX = "sgx"
    TDX = "tdx"
    SNP = "snp"


class TcbStatus(enum.StrEnum):
    """Intel's TCB status names (used for every TEE type), best first; `Unknown` when no
    collateral was given. `rank` orders them for "at least" comparisons; Unknown and Revoked
    rank lowest."""

    UP_TO_DATE = "UpToDate"
    SW_HARDENING_NEEDED = "SWHardeningNeeded"
    CONFIGURATION_NEEDED = "ConfigurationNeeded"
    CONFIGURATION_AND_SW_HARDENING_NEEDED = "ConfigurationAndSWHardeningNeeded"
    OUT_OF_DATE = "OutOfDate"
    OUT_OF_DATE_CONFIGURATION_NEEDED = "OutOfDateConfigurationNeeded"
    REVOKED = "Revoked"
    UNKNOWN = "Unknown"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def at_least(self, minimum: TcbStatus) -> bool:
        """Whether this status is as good as `minimum` (Revoked and Unknown never are, unless
        `minimum` is Unknown itself, which accepts anything but Revoked)."""
        if self is TcbStatus.REVOKED:
            return False
        if minimum is TcbStatus.UNKNOWN:
            return True
        return self is not TcbStatus.UNKNOWN and self.rank >= minimum.rank


_RANK = {
    TcbStatus.UP_TO_DATE: 7,
    TcbStatus.SW_HARDENING_NEEDED: 6,
    TcbStatus.CONFIGURATION_NEEDED: 5,
    TcbStatus.CONFIGURATION_AND_SW_HARDENING_NEEDED: 4,
    TcbStatus.OUT_OF_DATE: 3,
    TcbStatus.OUT_OF_DATE_CONFIGURATION_NEEDED: 2,
    TcbStatus.REVOKED: 0,
    TcbStatus.UNKNOWN: 1,
}


def report_data_for(nonce: bytes, public_key: bytes) -> bytes:
    """The report data a workload's evidence must carry: SHA-512(nonce || public key), which
    binds the evidence to this challenge and to the key the data keys will be sealed to."""
    return hashlib.sha512(nonce + public_key).digest()


@dataclass(frozen=True, slots=True)
class EvidenceClaims:
    """Facts read from verified evidence. Measurements are lowercase hex, by name (sim:
    {"measurement"}; sgx: {"mr_enclave", "mr_signer", ...}; tdx: {"mr_td", "rtmr0", ...})."""

    tee: TeeType
    measurements: Mapping[str, str]
    debug: bool
    tcb_status: TcbStatus
    report_data: bytes
    extra: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """The verified content of an attestation token."""

    tee: TeeType
    measurements: Mapping[str, str]
    debug: bool
    tcb_status: TcbStatus
    public_key: bytes  # the workload's X25519 public key (raw 32 bytes) data keys are sealed to
    policies_matched: tuple[str, ...]
    issued_at: _dt.datetime
    expires_at: _dt.datetime
    token_id: str
    # Facts besides measurements (an SGX ISVSVN, an SEV-SNP guest policy, advisory ids ...).
    extra: Mapping[str, object] = field(default_factory=dict)
