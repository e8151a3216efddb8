"""Verify hardware evidence (an SGX or TDX quote, an SEV-SNP report) in one call, and report
every step, the TCB status and the attested claims.

Type detection (``tee="auto"``) reads the first bytes only:

- an Intel quote starts with ``u16 version, u16 attestation key type (2), u32 TEE type``:
  version 3 with TEE type ``0x00`` is SGX, version 4 or 5 with TEE type ``0x81`` is TDX;
- an SEV-SNP report starts with ``u32 version`` (2 to 5, so its attestation-key-type bytes are
  zero and it can never pass for a quote), is at least 1184 bytes long and has
  ``SIGNATURE_ALGO`` (``u32`` at ``0x034``) equal to 1;
- anything else is refused with `EvidenceError`.

TCB status: Intel quotes are evaluated against PCS collateral when it is given (a `Collateral`
or a directory, see `ppml.attestation.collateral`) and are ``Unknown`` otherwise, which the
report says. A platform no TCB level matches has no status (None): "no matching TCB level".
SEV-SNP has no signed TCB collateral format here: its status is ``UpToDate`` when the VCEK
chain, the report signature and the VCEK binding (the VCEK's SPLs equal REPORTED_TCB) all
verify, and policies compare REPORTED_TCB against a minimum (`ppml.kms.policy`).

Verified certificate chains (Intel and AMD) and verified Intel collateral are cached per
process (`VerifiedCache`), so verifying many quotes from one platform does that work once.
"""

from __future__ import annotations

import datetime as _dt
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from cryptography import x509
from cryptography.x509.oid import NameOID

from ppml.attestation.amd import verify as _amd
from ppml.attestation.amd.report import SnpReport, TcbVersion, parse_report
from ppml.attestation.claims import TcbStatus, TeeType
from ppml.attestation.collateral.directory import collateral_dir, read_intel_dir, read_snp_dir
from ppml.attestation.collateral.models import Collateral, SnpCollateral, certificates_from
from ppml.attestation.intel import chain as _chain
from ppml.attestation.intel.pck import parse_pck_extensions
from ppml.attestation.intel.quote import (
    SgxQuote,
    TdxQuote,
    evidence_bytes,
    parse_sgx_quote,
    parse_tdx_quote,
)
from ppml.attestation.intel.tcb import PlatformTcb, QeReportInfo, TcbOutcome, evaluate
from ppml.attestation.intel.verified import CollateralCache
from ppml.attestation.steps import Step, StepStatus, VerificationReport
from ppml.attestation.x509_checks import crl_problem, is_revoked
from ppml.errors import EvidenceError

__all__ = [
    "TCB_STEPS",
    "EvidenceVerification",
    "detect_type",
    "verify_evidence",
]

#: Steps that appraise the TCB rather than verify a signature or a chain: they do not count
#: against `EvidenceVerification.verified` (their outcome is the TCB status).
TCB_STEPS: Final = frozenset(
    {"tcb_info_match", "qe_identity_match", "tdx_module_match", "tcb_level"}
)

_SNP_REPORT_SIZE: Final = 0x4A0
_SNP_SIGNATURE_ALGO_OFFSET: Final = 0x034
_MAX_EVIDENCE: Final = 64 * 1024

# Process-wide caches of verified chains (see the module docstring).
INTEL_CHAIN_CACHE: Final = _chain.ChainCache(max_entries=256)
AMD_CHAIN_CACHE: Final = _amd.ChainCache(max_entries=64)
# Process-wide cache of verified Intel collateral (`ppml.attestation.intel.verified`).
INTEL_COLLATERAL_CACHE: Final = CollateralCache(max_entries=32)


@dataclass(frozen=True, slots=True)
class EvidenceVerification:
    """The outcome of `verify_evidence`. ``verified``: every signature and chain verified
    (evidence and collateral). ``tcb_status``: None when no TCB level matched or the collateral
    failed (``tcb_detail`` says why). ``claims``: what the evidence attests, digests as lowercase
    hex. ``trailing_bytes``: bytes after the signed structure (not authenticated)."""

    type: TeeType
    verified: bool
    steps: VerificationReport
    tcb_status: TcbStatus | None
    advisory_ids: tuple[str, ...]
    trailing_bytes: bytes
    claims: Mapping[str, Any]
    at: _dt.datetime
    tcb_detail: str = ""
    notes: tuple[str, ...] = field(default=())

    @property
    def failed_step(self) -> Step | None:
        """The first step that failed or was skipped, if any."""
        return next(
            (s for s in self.steps.steps if s.status in (StepStatus.FAILED, StepStatus.SKIPPED)),
            None,
        )

    def refusal(self) -> str | None:
        """Why this evidence is not acceptable, naming the step, or None when it is: every
        signature and chain verified, a TCB level matched and is not Revoked, and nothing
        but zero bytes follows the signed structure. (Whether the TCB status and the claims
        are good enough is for a release policy to say.)"""
        if not self.verified:
            bad = self.failed_step
            return f"{bad.name}: {bad.detail}" if bad is not None else "no verification step ran"
        if self.tcb_status is None:
            return f"tcb_level: {self.tcb_detail}"
        if self.tcb_status is TcbStatus.REVOKED:
            return "tcb_level: TCB status Revoked"
        if any(self.trailing_bytes):
            return f"trailing_bytes: {len(self.trailing_bytes)} unsigned bytes after the evidence"
        return None

    def to_dict(self) -> dict[str, Any]:
        failed = self.failed_step
        return {
            "type": self.type.value,
            "verified": self.verified,
            "tcb_status": self.tcb_status.value if self.tcb_status is not None else None,
            "tcb_detail": self.tcb_detail,
            "advisory_ids": list(self.advisory_ids),
            "trailing_bytes": {
                "length": len(self.trailing_bytes),
                "hex": self.trailing_bytes.hex(),
            },
            "claims": _plain(self.claims),
            "steps": self.steps.to_list(),
            "failed_step": failed.name if failed is not None else None,
            "notes": list(self.notes),
            "at": self.at.isoformat(),
        }


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _freeze(value: dict[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType({k: _freeze(v) if isinstance(v, dict) else v for k, v in value.items()})


# --------------------------------------------------------------------------- type detection


def detect_type(data: bytes) -> TeeType:
    """The evidence type by the rule in the module docstring; `EvidenceError` otherwise."""
    if not isinstance(data, bytes):
        raise EvidenceError("evidence: must be bytes")
    if len(data) >= 8:
        version, key_type, tee_type = struct.unpack_from("<HHI", data)
        if key_type == 2:
            if version == 3 and tee_type == 0x00:
                return TeeType.SGX
            if version in (4, 5) and tee_type == 0x81:
                return TeeType.TDX
    if len(data) >= _SNP_REPORT_SIZE:
        (version,) = struct.unpack_from("<I", data)
        (algo,) = struct.unpack_from("<I", data, _SNP_SIGNATURE_ALGO_OFFSET)
        if 2 <= version <= 5 and algo == 1:
            return TeeType.SNP
    raise EvidenceError(
        "evidence: not an SGX v3 quote, a TDX v4/v5 quote or an SEV-SNP report (versions 2-5)"
    )


# --------------------------------------------------------------------------- inputs


def _intel_collateral(collateral: object) -> Collateral | None:
    if collateral is None or isinstance(collateral, Collateral):
        return collateral
    if isinstance(collateral, SnpCollateral):
        raise EvidenceError("collateral: SEV-SNP collateral given for an Intel quote")
    return read_intel_dir(collateral_dir(collateral))


def _snp_collateral(collateral: object, vcek: object, ask_ark: object) -> SnpCollateral:
    """The VCEK and ASK/ARK: `vcek` / `ask_ark` when given, else the collateral's."""
    found: SnpCollateral | None = None
    if isinstance(collateral, SnpCollateral):
        found = collateral
    elif collateral is not None and not isinstance(collateral, Collateral):
        found = read_snp_dir(collateral_dir(collateral))
    if vcek is not None:
        chain = ask_ark if ask_ark is not None else (found.ask_ark if found else None)
        return SnpCollateral.of(vcek, chain)
    if found is None:
        raise EvidenceError("SEV-SNP: no VCEK given (pass one, or vcek.der in the collateral)")
    return found if ask_ark is None else SnpCollateral.of(found.vcek, ask_ark)


def _at(at: object) -> _dt.datetime:
    if at is None:
        return _dt.datetime.now(_dt.UTC)
    if not isinstance(at, _dt.datetime) or at.tzinfo is None or at.utcoffset() is None:
        raise EvidenceError("verify evidence: `at` must be a timezone-aware datetime")
    return at.astimezone(_dt.UTC)


# --------------------------------------------------------------------------- the entry point


def verify_evidence(
    data: bytes,
    tee: str | TeeType = "auto",
    *,
    root_pem: bytes | str | x509.Certificate | None = None,
    collateral: Collateral | SnpCollateral | str | Path | None = None,
    at: _dt.datetime | None = None,
    allow_outdated: bool = False,
    vcek: bytes | x509.Certificate | None = None,
    ask_ark: bytes | Sequence[x509.Certificate] | None = None,
) -> EvidenceVerification:
    """Parse and verify `data` (an SGX or TDX quote or an SEV-SNP report) at time `at` (default
    now, UTC) and return every step, the TCB status and the claims.

    `tee`: ``auto`` (detected, see the module docstring), ``sgx``, ``tdx`` or ``snp``.
    `root_pem`: the trust anchor instead of the pinned one: the Intel root CA for quotes, an AMD
    ARK (``ARK-<product>``) for reports. `collateral`: Intel PCS collateral (a `Collateral` or a
    directory); for SEV-SNP, an `SnpCollateral` or a directory holding ``vcek.der`` (or
    ``vcek.pem``) and ``ask_ark.pem``, used when `vcek` / `ask_ark` are not given.
    `allow_outdated`: accept collateral and CRLs past their nextUpdate (noted in the report).

    Bad evidence is reported (``verified`` False, the failed step named); malformed input raises
    `EvidenceError`, and nothing else.
    """
    data = evidence_bytes(data, "evidence", _MAX_EVIDENCE)
    if not isinstance(allow_outdated, bool):
        raise EvidenceError("verify evidence: allow_outdated must be a boolean")
    when = _at(at)
    kind = _tee_of(data, tee)
    if kind is TeeType.SNP:
        return _verify_snp(data, root_pem, collateral, when, vcek, ask_ark)
    if vcek is not None or ask_ark is not None:
        raise EvidenceError("verify evidence: a VCEK or ASK/ARK is for SEV-SNP reports only")
    return _verify_intel(data, kind, root_pem, collateral, when, allow_outdated)


def _tee_of(data: bytes, tee: object) -> TeeType:
    if tee == "auto":
        return detect_type(data)
    if not isinstance(tee, str):
        raise EvidenceError("evidence: the type must be auto, sgx, tdx or snp")
    try:
        kind = TeeType(tee.lower())
    except ValueError:
        raise EvidenceError(f"evidence: unknown type {str(tee)[:16]!r}") from None
    if kind is TeeType.SIM:
        raise EvidenceError("evidence: sim evidence is verified by SimVerifier, not here")
    return kind


# --------------------------------------------------------------------------- Intel


def _intel_root(root_pem: object) -> x509.Certificate:
    if root_pem is None:
        return _chain.intel_sgx_root()
    certs = certificates_from(root_pem, "root")
    if len(certs) != 1:
        raise EvidenceError("root: give exactly one root CA certificate")
    return certs[0]


def _outdated_crl_step(
    name: str,
    crl: x509.CertificateRevocationList,
    issuer: x509.Certificate,
    subject: x509.Certificate,
    what: str,
) -> Step:
    """The revocation check of an outdated CRL the caller chose to accept: the same rules as
    a current one's but the time."""
    problem = crl_problem(crl, issuer, f"issuer of the {what}", None)
    if problem is not None:
        return Step.failed(name, f"{name}: {problem}")
    if is_revoked(crl, subject):
        return Step.failed(name, f"{name}: the {what} is revoked")
    return Step.passed(name, "outdated, allowed: not revoked")


def _fresh(crl: x509.CertificateRevocationList | None, at: _dt.datetime) -> bool:
    return crl is None or (
        crl.next_update_utc is not None and crl.last_update_utc <= at <= crl.next_update_utc
    )


def _quote_steps(
    quote: SgxQuote | TdxQuote,
    root: x509.Certificate,
    coll: Collateral | None,
    at: _dt.datetime,
    allow_outdated: bool,
) -> list[Step]:
    """The quote's own steps (chain, CRLs, signatures); outdated CRLs the caller accepts are
    checked here (verify_quote refuses them outright)."""
    pck_crl = coll.pck_crl_parsed() if coll is not None else None
    root_crl = coll.root_ca_crl_parsed() if coll is not None else None
    late_pck = pck_crl if allow_outdated and not _fresh(pck_crl, at) else None
    late_root = root_crl if allow_outdated and not _fresh(root_crl, at) else None
    quote_report = _chain.verify_quote(
        quote,
        root=root,
        at=at,
        pck_crl=None if late_pck is not None else pck_crl,
        root_crl=None if late_root is not None else root_crl,
        cache=INTEL_CHAIN_CACHE,
    )
    steps = list(quote_report.steps)
    if quote_report.step("pck_chain").status is StepStatus.PASSED:
        leaf, ca = quote.pck_chain[0], quote.pck_chain[1]
        for i, s in enumerate(steps):
            if s.name == "pck_crl" and late_pck is not None:
                steps[i] = _outdated_crl_step("pck_crl", late_pck, ca, leaf, "PCK certificate")
            if s.name == "root_crl" and late_root is not None:
                steps[i] = _outdated_crl_step("root_crl", late_root, root, ca, "PCK CA")
    return steps


@dataclass(frozen=True, slots=True)
class _Tcb:
    status: TcbStatus | None
    detail: str
    advisories: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def _intel_tcb(
    steps: list[Step],
    quote: SgxQuote | TdxQuote,
    kind: TeeType,
    root: x509.Certificate,
    coll: Collateral | None,
    at: _dt.datetime,
    allow_outdated: bool,
) -> _Tcb:
    """Appends the TCB steps to `steps` and returns the TCB status found."""
    if coll is None:
        steps.append(Step.not_checked("tcb_level", "no collateral given: TCB status Unknown"))
        return _Tcb(TcbStatus.UNKNOWN, "no collateral given")
    first = VerificationReport.of(steps).first_failure
    if not VerificationReport.of(steps).verified:
        steps.append(Step.skipped("tcb_level", first.name if first else "quote verification"))
        return _Tcb(None, "not evaluated: the quote did not verify")
    tcb_report, evaluation = evaluate(
        coll,
        _platform_tcb(quote),
        _qe_info(quote),
        root=root,
        at=at,
        tee=kind,
        allow_outdated=allow_outdated,
        cache=INTEL_COLLATERAL_CACHE,
    )
    steps.extend(tcb_report.steps)
    if evaluation.outcome is TcbOutcome.NO_MATCH:
        detail = f"no matching TCB level: {evaluation.detail}"
    elif evaluation.outcome is TcbOutcome.FAILED:
        detail = f"collateral did not verify: {evaluation.detail}".rstrip(": ")
    else:
        detail = evaluation.detail
    return _Tcb(evaluation.status, detail, evaluation.advisory_ids, evaluation.notes)


def _verify_intel(
    data: bytes,
    kind: TeeType,
    root_pem: object,
    collateral: object,
    at: _dt.datetime,
    allow_outdated: bool,
) -> EvidenceVerification:
    quote: SgxQuote | TdxQuote = (
        parse_sgx_quote(data) if kind is TeeType.SGX else parse_tdx_quote(data)
    )
    root = _intel_root(root_pem)
    coll = _intel_collateral(collateral)
    steps = _quote_steps(quote, root, coll, at, allow_outdated)
    claims = _sgx_claims(quote) if isinstance(quote, SgxQuote) else _tdx_claims(quote)
    tcb = _intel_tcb(steps, quote, kind, root, coll, at, allow_outdated)
    report = VerificationReport.of(steps)
    verified = all(
        s.status in (StepStatus.PASSED, StepStatus.NOT_CHECKED)
        for s in report.steps
        if s.name not in TCB_STEPS
    )
    return EvidenceVerification(
        type=kind,
        verified=verified,
        steps=report,
        tcb_status=tcb.status,
        advisory_ids=tcb.advisories,
        trailing_bytes=quote.trailing_bytes,
        claims=_freeze(claims),
        at=at,
        tcb_detail=tcb.detail,
        notes=tcb.notes,
    )


def _platform_tcb(quote: SgxQuote | TdxQuote) -> PlatformTcb:
    ext = parse_pck_extensions(quote.pck_chain[0])
    if isinstance(quote, TdxQuote):
        return PlatformTcb(
            fmspc=ext.fmspc,
            pce_id=ext.pce_id,
            sgx_tcb_components=tuple(ext.sgx_tcb_components),
            pce_svn=ext.pce_svn,
            tee_tcb_svn=quote.body.tee_tcb_svn,
            mr_signer_seam=quote.body.mr_signer_seam,
            seam_attributes=quote.body.seam_attributes,
        )
    return PlatformTcb(
        fmspc=ext.fmspc,
        pce_id=ext.pce_id,
        sgx_tcb_components=tuple(ext.sgx_tcb_components),
        pce_svn=ext.pce_svn,
    )


def _qe_info(quote: SgxQuote | TdxQuote) -> QeReportInfo:
    qe = quote.qe_report
    return QeReportInfo(
        mr_signer=qe.mr_signer,
        isv_prod_id=qe.isv_prod_id,
        isv_svn=qe.isv_svn,
        misc_select=qe.misc_select,
        attributes=qe.attributes,
    )


def _sgx_claims(quote: SgxQuote) -> dict[str, Any]:
    b = quote.body
    return {
        "mr_enclave": b.mr_enclave.hex(),
        "mr_signer": b.mr_signer.hex(),
        "isv_prod_id": b.isv_prod_id,
        "isv_svn": b.isv_svn,
        "debug": b.debug,
        "report_data": b.report_data.hex(),
        "attributes": b.attributes.hex(),
        "cpu_svn": b.cpu_svn.hex(),
        "config_id": b.config_id.hex(),
        "config_svn": b.config_svn,
        "misc_select": b.misc_select,
        "quote_version": quote.version,
    }


def _tdx_claims(quote: TdxQuote) -> dict[str, Any]:
    b = quote.body
    claims: dict[str, Any] = {
        "mr_td": b.mr_td.hex(),
        "mr_seam": b.mr_seam.hex(),
        "mr_signer_seam": b.mr_signer_seam.hex(),
        "rtmr0": b.rtmr0.hex(),
        "rtmr1": b.rtmr1.hex(),
        "rtmr2": b.rtmr2.hex(),
        "rtmr3": b.rtmr3.hex(),
        "mr_config_id": b.mr_config_id.hex(),
        "mr_owner": b.mr_owner.hex(),
        "mr_owner_config": b.mr_owner_config.hex(),
        "debug": b.debug,
        "report_data": b.report_data.hex(),
        "td_attributes": b.td_attributes.hex(),
        "xfam": b.xfam.hex(),
        "tee_tcb_svn": b.tee_tcb_svn.hex(),
        "quote_version": quote.version,
    }
    if b.mr_service_td is not None:
        claims["mr_service_td"] = b.mr_service_td.hex()
    return claims


# --------------------------------------------------------------------------- AMD SEV-SNP


def _ark_roots(root_pem: object) -> Mapping[str, x509.Certificate] | None:
    if root_pem is None:
        return None
    roots: dict[str, x509.Certificate] = {}
    for cert in certificates_from(root_pem, "root"):
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = names[0].value if len(names) == 1 else ""
        product = cn[4:] if isinstance(cn, str) and cn.startswith("ARK-") else ""
        if product not in _amd.PRODUCTS:
            raise EvidenceError("root: an SEV-SNP root must be an ARK named ARK-<product>")
        roots[product] = cert
    return roots


def _verify_snp(
    data: bytes,
    root_pem: object,
    collateral: object,
    at: _dt.datetime,
    vcek: object,
    ask_ark: object,
) -> EvidenceVerification:
    report = parse_report(data)
    certs = _snp_collateral(collateral, vcek, ask_ark)
    roots = _ark_roots(root_pem)
    steps = _amd.verify_report(
        report,
        vcek=certs.vcek,
        ask_ark=certs.ask_ark,
        at=at,
        cache=AMD_CHAIN_CACHE,
        roots=roots,
        signing_keys={} if roots is not None else None,
    )
    verified = steps.verified
    detail = (
        "SEV-SNP: the VCEK chain and binding verified (no TCB collateral: UpToDate)"
        if verified
        else "not evaluated: the report did not verify"
    )
    return EvidenceVerification(
        type=TeeType.SNP,
        verified=verified,
        steps=steps,
        tcb_status=TcbStatus.UP_TO_DATE if verified else None,
        advisory_ids=(),
        trailing_bytes=report.trailing_bytes,
        claims=_freeze(_snp_claims(report)),
        at=at,
        tcb_detail=detail,
    )


def tcb_dict(tcb: TcbVersion) -> dict[str, int]:
    """A TCB_VERSION's component levels by name (``fmc`` only in the Turin layout)."""
    out = {
        "bootloader": tcb.bootloader,
        "tee": tcb.tee,
        "snp": tcb.snp,
        "microcode": tcb.microcode,
    }
    if tcb.fmc is not None:
        out["fmc"] = tcb.fmc
    return out


def _snp_claims(report: SnpReport) -> dict[str, Any]:
    policy = report.policy
    return {
        "measurement": report.measurement.hex(),
        "report_data": report.report_data.hex(),
        "debug": policy.debug_allowed,
        "chip_id": report.chip_id.hex(),
        "reported_tcb": tcb_dict(report.reported_tcb),
        "tcb_layout": report.tcb_layout.value,
        "guest_policy": {
            "value": policy.value,
            "abi_major": policy.abi_major,
            "abi_minor": policy.abi_minor,
            "smt_allowed": policy.smt_allowed,
            "migrate_ma_allowed": policy.migrate_ma_allowed,
            "debug_allowed": policy.debug_allowed,
            "single_socket": policy.single_socket,
        },
        "host_data": report.host_data.hex(),
        "id_key_digest": report.id_key_digest.hex(),
        "author_key_digest": report.author_key_digest.hex(),
        "family_id": report.family_id.hex(),
        "image_id": report.image_id.hex(),
        "guest_svn": report.guest_svn,
        "vmpl": report.vmpl,
        "report_version": report.version,
        "signing_key": report.signing_key.name.lower(),
    }
