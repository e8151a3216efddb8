"""The contract every TEE backend's evidence verifier meets: verify evidence bound to an expected
report data, or raise `AttestationFailed`."""

from __future__ import annotations

import hmac
from typing import Protocol, runtime_checkable

from ppml.attestation.claims import REPORT_DATA_BYTES, EvidenceClaims, TeeType
from ppml.errors import AttestationFailed

__all__ = ["Verifier", "check_report_data"]


@runtime_checkable
class Verifier(Protocol):
    """Verifies one TEE type's evidence (RATS Verifier). Implementations never raise anything
    but `AttestationFailed` for bad evidence; its message is the precise internal reason."""

    @property
    def tee(self) -> TeeType:
        """The TEE type whose evidence this verifier accepts."""
        ...

    def verify(self, evidence: bytes, *, expected_report_data: bytes) -> EvidenceClaims:
        """Check `evidence` (signature, chain, format) and that it carries exactly
        `expected_report_data`; return what it attests."""
        ...


def check_report_data(actual: bytes, expected: bytes) -> None:
    """Compare report data in constant time over the full 64 bytes; raise `AttestationFailed`
    if either is not 64 bytes long or they differ."""
    if not isinstance(expected, bytes) or len(expected) != REPORT_DATA_BYTES:
        raise AttestationFailed(f"expected report data must be {REPORT_DATA_BYTES} bytes")
    if not isinstance(actual, bytes) or len(actual) != REPORT_DATA_BYTES:
        raise AttestationFailed(f"evidence report data is not {REPORT_DATA_BYTES} bytes")
    if not hmac.compare_digest(actual, expected):
        raise AttestationFailed("evidence report data does not match the challenge and key")
