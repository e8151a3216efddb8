"""The attestation layer (RATS Verifier): evidence verification per TEE type, appraisal, tokens.

`AttestationService` hands out challenges and turns verified evidence into short-lived signed
tokens; `TokenVerifier` is what a relying party (the key broker) uses to check them.
`verify_evidence` verifies an SGX or TDX quote or an SEV-SNP report on its own; `SgxVerifier`,
`TdxVerifier` and `SnpVerifier` are the service's verifiers for them.

The names below are imported from their modules on first use: what needs only the claims'
types (the KMS's release policies) does not import every verifier.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ppml._internal.lazy import lazy_exports

if TYPE_CHECKING:
    from ppml.attestation.challenge import Challenge, ChallengeCapacityExceeded, ChallengeStore
    from ppml.attestation.claims import (
        REPORT_DATA_BYTES,
        EvidenceClaims,
        TcbStatus,
        TeeType,
        TokenClaims,
        report_data_for,
    )
    from ppml.attestation.evidence import EvidenceVerification, verify_evidence
    from ppml.attestation.hardware_verifier import SgxVerifier, SnpVerifier, TdxVerifier
    from ppml.attestation.service import (
        Appraiser,
        AttestationResult,
        AttestationService,
        no_policies,
    )
    from ppml.attestation.sim import SimEvidence, SimPlatform, SimVerifier, sim_platform_key_id
    from ppml.attestation.token import IssuedToken, TokenIssuer, TokenVerifier, key_thumbprint
    from ppml.attestation.verifier import Verifier, check_report_data

__all__ = [
    "REPORT_DATA_BYTES",
    "Appraiser",
    "AttestationResult",
    "AttestationService",
    "Challenge",
    "ChallengeCapacityExceeded",
    "ChallengeStore",
    "EvidenceClaims",
    "EvidenceVerification",
    "IssuedToken",
    "SgxVerifier",
    "SimEvidence",
    "SimPlatform",
    "SimVerifier",
    "SnpVerifier",
    "TcbStatus",
    "TdxVerifier",
    "TeeType",
    "TokenClaims",
    "TokenIssuer",
    "TokenVerifier",
    "Verifier",
    "check_report_data",
    "key_thumbprint",
    "no_policies",
    "report_data_for",
    "sim_platform_key_id",
    "verify_evidence",
]

__getattr__ = lazy_exports(
    __name__,
    {
        "ppml.attestation.challenge": (
            "Challenge",
            "ChallengeCapacityExceeded",
            "ChallengeStore",
        ),
        "ppml.attestation.claims": (
            "REPORT_DATA_BYTES",
            "EvidenceClaims",
            "TcbStatus",
            "TeeType",
            "TokenClaims",
            "report_data_for",
        ),
        "ppml.attestation.evidence": (
            "EvidenceVerification",
            "verify_evidence",
        ),
        "ppml.attestation.hardware_verifier": (
            "SgxVerifier",
            "SnpVerifier",
            "TdxVerifier",
        ),
        "ppml.attestation.service": (
            "Appraiser",
            "AttestationResult",
            "AttestationService",
            "no_policies",
        ),
        "ppml.attestation.sim": (
            "SimEvidence",
            "SimPlatform",
            "SimVerifier",
            "sim_platform_key_id",
        ),
        "ppml.attestation.token": (
            "IssuedToken",
            "TokenIssuer",
            "TokenVerifier",
            "key_thumbprint",
        ),
        "ppml.attestation.verifier": (
            "Verifier",
            "check_report_data",
        ),
    },
)
