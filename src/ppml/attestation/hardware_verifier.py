"""The attestation service's verifiers for hardware evidence: `SgxVerifier`, `TdxVerifier` and
`SnpVerifier`, each meeting the `Verifier` contract on top of `verify_evidence`.

Build them by name: ``SgxVerifier.default()`` trusts the pinned Intel SGX root (and AMD's pinned
ARKs for `SnpVerifier`), optionally with a collateral directory; ``.for_testing(root=...)`` pins
a test root instead. A verifier refuses (``AttestationFailed``, the message naming the failed
step) evidence whose signatures or chains do not verify, a platform with no matching TCB level
or collateral that does not verify, a revoked TCB, non-zero bytes after the signed structure,
and report data other than the expected 64 bytes. Whether a TCB status or a debug TEE is good
enough is for the key's release policy to say (`ppml.kms.policy`).

A collateral directory is read when the verifier is built and again only when one of its files
changes (`DirectorySource`); the collateral's verification is cached while it is current
(`ppml.attestation.intel.verified`), so a second quote neither re-reads nor re-verifies it.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Self, TypedDict, Unpack

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ppml._internal.clock import Clock, utc_now
from ppml.attestation.claims import EvidenceClaims, TcbStatus, TeeType
from ppml.attestation.collateral.models import Collateral, SnpCollateral
from ppml.attestation.collateral.sources import CollateralSource, DirectorySource
from ppml.attestation.evidence import EvidenceVerification, verify_evidence
from ppml.attestation.verifier import check_report_data
from ppml.errors import AttestationFailed, ConfigurationError, EvidenceError

__all__ = ["SgxVerifier", "SnpVerifier", "TdxVerifier", "evidence_claims", "hardware_verifiers"]

_MEASUREMENTS: Mapping[TeeType, tuple[str, ...]] = {
    TeeType.SGX: ("mr_enclave", "mr_signer"),
    TeeType.TDX: (
        "mr_td",
        "mr_seam",
        "mr_signer_seam",
        "rtmr0",
        "rtmr1",
        "rtmr2",
        "rtmr3",
        "mr_config_id",
        "mr_owner",
        "mr_owner_config",
    ),
    TeeType.SNP: ("measurement", "host_data", "id_key_digest"),
}


class _Options(TypedDict, total=False):
    collateral: str | Path | None
    allow_outdated: bool
    vcek: bytes | None
    ask_ark: bytes | None
    clock: Clock
    source: CollateralSource | None


class _HardwareVerifier:
    """What the three verifiers share; subclasses name their TEE type."""

    _TEE: ClassVar[TeeType]

    def __init__(
        self,
        *,
        root_pem: bytes | None = None,
        collateral: str | Path | None = None,
        allow_outdated: bool = False,
        vcek: bytes | None = None,
        ask_ark: bytes | None = None,
        clock: Clock = utc_now,
        source: CollateralSource | None = None,
    ) -> None:
        if not isinstance(allow_outdated, bool):
            raise ConfigurationError("allow_outdated must be true or false")
        self._root_pem = root_pem
        self._allow_outdated = allow_outdated
        self._clock = clock
        self._vcek = vcek
        self._ask_ark = ask_ark
        self._directory: DirectorySource | None = None
        self._source = source
        try:
            if root_pem is not None:
                x509.load_pem_x509_certificates(root_pem)
            if collateral is not None:
                path = Path(collateral)
                if not path.is_dir():
                    raise ConfigurationError(
                        f"the collateral directory {str(path)[:200]!r} does not exist"
                    )
                self._directory = DirectorySource(path)
                self._collateral_from(self._directory, b"", clock())
        except (EvidenceError, ValueError) as exc:
            raise ConfigurationError(f"{self._TEE.value} verifier: {exc}") from None

    def _collateral_from(
        self, source: CollateralSource, evidence: bytes, at: _dt.datetime
    ) -> Collateral | SnpCollateral | None:
        if self._TEE is TeeType.SNP:
            return source.snp(evidence, at)
        return source.intel(evidence, at)

    @classmethod
    def default(
        cls,
        *,
        collateral: str | Path | None = None,
        allow_outdated: bool = False,
        source: CollateralSource | None = None,
    ) -> Self:
        """Trust the vendor's pinned root; evaluate the TCB against `collateral` when given,
        else against what `source` fetches for each piece of evidence (a PCCS / Intel PCS,
        AMD KDS); with neither, Intel TCB status is Unknown."""
        return cls(collateral=collateral, allow_outdated=allow_outdated, source=source)

    @classmethod
    def for_testing(cls, *, root: x509.Certificate | bytes, **options: Unpack[_Options]) -> Self:
        """Trust a test root (an Intel root CA, or an AMD ARK for SEV-SNP) instead of the
        vendor's; `clock` pins the verification time, `vcek` / `ask_ark` give an SEV-SNP
        report's certificates."""
        pem = root.public_bytes(Encoding.PEM) if isinstance(root, x509.Certificate) else root
        return cls(root_pem=pem, **options)

    @property
    def tee(self) -> TeeType:
        return self._TEE

    def check(self, evidence: bytes, *, at: _dt.datetime | None = None) -> EvidenceVerification:
        """The full verification result, without the report data check or any refusal."""
        when = at if at is not None else self._clock()
        collateral = None
        if self._directory is not None:
            collateral = self._collateral_from(self._directory, evidence, when)
        if collateral is None and self._source is not None and self._vcek is None:
            try:
                collateral = self._collateral_from(self._source, evidence, when)
            except ConfigurationError as exc:  # the server unreachable: refuse, say why
                raise EvidenceError(f"collateral unavailable: {exc}") from None
        return verify_evidence(
            evidence,
            self._TEE,
            root_pem=self._root_pem,
            collateral=collateral,
            at=when,
            allow_outdated=self._allow_outdated,
            vcek=self._vcek,
            ask_ark=self._ask_ark,
        )

    def verify(self, evidence: bytes, *, expected_report_data: bytes) -> EvidenceClaims:
        if not isinstance(evidence, bytes):
            raise AttestationFailed("evidence must be bytes")
        result = self.check(evidence)
        refusal = result.refusal()
        if refusal is not None:
            raise EvidenceError(f"{self._TEE.value} evidence did not verify: {refusal}")
        assert result.tcb_status is not None
        claims = evidence_claims(result, tcb_status=result.tcb_status)
        check_report_data(claims.report_data, expected_report_data)
        return claims


def evidence_claims(result: EvidenceVerification, *, tcb_status: TcbStatus) -> EvidenceClaims:
    """The `EvidenceClaims` (what policies appraise) of a verification result: measurements
    by name as lowercase hex, debug, `tcb_status`, and the extra facts (advisory ids; SGX
    ISVPRODID and ISVSVN; SEV-SNP guest policy and reported TCB)."""
    claims = result.claims
    return EvidenceClaims(
        tee=result.type,
        measurements=MappingProxyType({n: claims[n] for n in _MEASUREMENTS[result.type]}),
        debug=bool(claims["debug"]),
        tcb_status=tcb_status,
        report_data=bytes.fromhex(claims["report_data"]),
        extra=MappingProxyType(_extra(result)),
    )


def _extra(result: EvidenceVerification) -> dict[str, Any]:
    claims = result.claims
    extra: dict[str, Any] = {"advisory_ids": list(result.advisory_ids)}
    if result.type is TeeType.SGX:
        extra["isv_prod_id"] = claims["isv_prod_id"]
        extra["isv_svn"] = claims["isv_svn"]
    elif result.type is TeeType.SNP:
        policy = claims["guest_policy"]
        extra["guest_policy"] = policy["value"]
        extra["smt_allowed"] = policy["smt_allowed"]
        extra["migrate_ma_allowed"] = policy["migrate_ma_allowed"]
        extra["reported_tcb"] = dict(claims["reported_tcb"])
    return extra


class SgxVerifier(_HardwareVerifier):
    """Intel SGX ECDSA quotes (v3)."""

    _TEE = TeeType.SGX


class TdxVerifier(_HardwareVerifier):
    """Intel TDX ECDSA quotes (v4, v5)."""

    _TEE = TeeType.TDX


class SnpVerifier(_HardwareVerifier):
    """AMD SEV-SNP reports. The VCEK (and optionally the ASK/ARK chain) comes from the
    collateral directory (``vcek.der`` or ``vcek.pem``, ``ask_ark.pem``) or is given."""

    _TEE = TeeType.SNP


_CLASSES: Mapping[TeeType, Callable[..., _HardwareVerifier]] = {
    TeeType.SGX: SgxVerifier.default,
    TeeType.TDX: TdxVerifier.default,
    TeeType.SNP: SnpVerifier.default,
}


def hardware_verifiers(
    tee_types: tuple[TeeType, ...] | frozenset[TeeType],
    *,
    collateral: str | Path | None = None,
    allow_outdated: bool = False,
    source: CollateralSource | None = None,
) -> dict[TeeType, _HardwareVerifier]:
    """Default verifiers for the enabled hardware TEE types (what a workspace configures):
    collateral from the directory `collateral` first, then from `source`. SEV-SNP needs a VCEK
    in `collateral` or a KDS in `source`; without either it is left out (and refused)."""
    out: dict[TeeType, _HardwareVerifier] = {}
    for tee in tee_types:
        if tee not in _CLASSES:
            raise ConfigurationError(f"no hardware verifier for TEE type {tee!s}")
        if (
            tee is TeeType.SNP
            and (
                collateral is None
                or not any((Path(collateral) / n).exists() for n in ("vcek.der", "vcek.pem"))
            )
            and not (source is not None and getattr(source, "has_amd", True))
        ):
            continue
        out[tee] = _CLASSES[tee](
            collateral=collateral, allow_outdated=allow_outdated, source=source
        )
    return out
