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
or a directory, see `ppml.attestation.intel.collateral`) and are ``Unknown`` otherwise, which the
report says. A platform no TCB level matches has no status (None): "no matching TCB level".
SEV-SNP has no signed TCB collateral format here: its status is ``UpToDate`` when the VCEK
chain, the report signature and the VCEK binding (the VCEK's SPLs equal REPORTED_TCB) all
verify, and policies compare REPORTED_TCB against a minimum (`ppml.kms.policy`).

Verified certificate chains are cached per process (Intel and AMD), so verifying many quotes
from one platform does the chain work once.
"""

from __future__ import annotations

import datetime as _dt
import struct
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID

from ppml.attestation.amd import verify as _amd
from ppml.attestation.amd.report import SnpReport, TcbVersion, parse_report
from ppml.attestation.claims import TcbStatus, TeeType
from ppml.attestation.intel import chain as _chain
from ppml.attestation.intel.collateral import Collateral
from ppml.attestation.intel.pck import parse_pck_extensions
from ppml.attestation.intel.quote import SgxQuote, TdxQuote, parse_sgx_quote, parse_tdx_quote
from ppml.attestation.intel.tcb import PlatformTcb, QeReportInfo, TcbOutcome, evaluate
from ppml.attestation.report import Step, StepStatus, VerificationReport
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
_MAX_CERT_FILE: Final = 64 * 1024

# Process-wide caches of verified chains (see the module docstring).
INTEL_CHAIN_CACHE: Final = _chain.ChainCache(max_entries=256)
AMD_CHAIN_CACHE: Final = _amd.ChainCache(max_entries=64)


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


def _certs_from(data: object, what: str) -> list[x509.Certificate]:
    """Certificates from PEM (one or more), DER (one), a certificate or a sequence of them."""
    if isinstance(data, x509.Certificate):
        return [data]
    if isinstance(data, Sequence) and not isinstance(data, str | bytes):
        if not all(isinstance(c, x509.Certificate) for c in data):
            raise EvidenceError(f"{what}: must be certificates")
        return list(data)
    if isinstance(data, str):
        data = data.encode("ascii", "replace")
    if not isinstance(data, bytes):
        raise EvidenceError(f"{what}: must be PEM or DER bytes or a certificate")
    if len(data) > _MAX_CERT_FILE:
        raise EvidenceError(f"{what}: larger than {_MAX_CERT_FILE} bytes")
    try:
        with warnings.catch_warnings():
            # AMD's KDS issues VCEKs with serial number 0, which cryptography warns about;
            # the certificate is still checked step by step by the verifier.
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            if b"-----BEGIN CERTIFICATE-----" in data:
                certs = x509.load_pem_x509_certificates(data)
            else:
                certs = [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise EvidenceError(f"{what}: not a valid PEM or DER certificate") from exc
    return certs


def _load_cert_file(path: Path, what: str) -> list[x509.Certificate]:
    try:
        with path.open("rb") as fh:
            data = fh.read(_MAX_CERT_FILE + 1)
    except OSError as exc:
        raise EvidenceError(f"{what}: cannot read {path.name} ({exc.strerror})") from None
    return _certs_from(data, f"{what} ({path.name})")


def _collateral_dir(collateral: object) -> Path | None:
    if collateral is None or isinstance(collateral, Collateral):
        return None
    if isinstance(collateral, str | Path):
        path = Path(collateral)
        if not path.is_dir():
            raise EvidenceError(f"collateral directory {str(path)[:200]!r} does not exist")
        return path
    raise EvidenceError("collateral: must be a Collateral or a directory path")


def _intel_collateral(collateral: object) -> Collateral | None:
    if collateral is None or isinstance(collateral, Collateral):
        return collateral
    path = _collateral_dir(collateral)
    assert path is not None
    loaded = Collateral.from_dir(path)
    return None if loaded.empty else loaded


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
    collateral: Collateral | str | Path | None = None,
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
    directory); for SEV-SNP, a directory holding ``vcek.der`` (or ``vcek.pem``) and
    ``ask_ark.pem``, used when `vcek` / `ask_ark` are not given. `allow_outdated`: accept
    collateral and CRLs past their nextUpdate (noted in the report).

    Bad evidence is reported (``verified`` False, the failed step named); malformed input raises
    `EvidenceError`, and nothing else.
    """
    if isinstance(data, bytearray | memoryview):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise EvidenceError("evidence: must be bytes")
    if len(data) > _MAX_EVIDENCE:
        raise EvidenceError(f"evidence: {len(data)} bytes is larger than {_MAX_EVIDENCE}")
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
    certs = _certs_from(root_pem, "root")
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
    """The revocation check of an outdated CRL the caller chose to accept."""
    key = issuer.public_key()
    try:
        valid = crl.issuer == issuer.subject and crl.is_signature_valid(key)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        valid = False
    if not valid:
        return Step.failed(name, f"{name}: not signed by the issuer of the {what}")
    if crl.get_revoked_certificate_by_serial_number(subject.serial_number) is not None:
        return Step.failed(name, f"{name}: the {what} is revoked")
    return Step.passed(name, "outdated, allowed: not revoked")


def _fresh(crl: x509.CertificateRevocationList | None, at: _dt.datetime) -> bool:
    return crl is None or (
        crl.next_update_utc is not None and crl.last_update_utc <= at <= crl.next_update_utc
    )


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
    pck_crl = coll.pck_crl_parsed() if coll is not None else None
    root_crl = coll.root_ca_crl_parsed() if coll is not None else None
    # Outdated CRLs the caller accepts are checked here (verify_quote refuses them outright).
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
    chain_ok = VerificationReport.of(steps).verified

    claims = _sgx_claims(quote) if isinstance(quote, SgxQuote) else _tdx_claims(quote)
    status: TcbStatus | None
    advisories: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    if coll is None:
        steps.append(Step.not_checked("tcb_level", "no collateral given: TCB status Unknown"))
        status, detail = TcbStatus.UNKNOWN, "no collateral given"
    elif not chain_ok:
        first = VerificationReport.of(steps).first_failure
        steps.append(Step.skipped("tcb_level", first.name if first else "quote verification"))
        status, detail = None, "not evaluated: the quote did not verify"
    else:
        tcb_report, evaluation = evaluate(
            coll,
            _platform_tcb(quote),
            _qe_info(quote),
            root=root,
            at=at,
            tee=kind,
            allow_outdated=allow_outdated,
        )
        steps.extend(tcb_report.steps)
        status, advisories, notes = evaluation.status, evaluation.advisory_ids, evaluation.notes
        if evaluation.outcome is TcbOutcome.NO_MATCH:
            detail = f"no matching TCB level: {evaluation.detail}"
        elif evaluation.outcome is TcbOutcome.FAILED:
            detail = f"collateral did not verify: {evaluation.detail}".rstrip(": ")
        else:
            detail = evaluation.detail
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
        tcb_status=status,
        advisory_ids=advisories,
        trailing_bytes=quote.trailing_bytes,
        claims=_freeze(claims),
        at=at,
        tcb_detail=detail,
        notes=notes,
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
    for cert in _certs_from(root_pem, "root"):
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = names[0].value if len(names) == 1 else ""
        product = cn[4:] if isinstance(cn, str) and cn.startswith("ARK-") else ""
        if product not in _amd.PRODUCTS:
            raise EvidenceError("root: an SEV-SNP root must be an ARK named ARK-<product>")
        roots[product] = cert
    return roots


def _snp_certs(
    collateral: object, vcek: object, ask_ark: object
) -> tuple[x509.Certificate, tuple[x509.Certificate, x509.Certificate] | None]:
    directory = _collateral_dir(collateral) if not isinstance(collateral, Collateral) else None
    if vcek is None:
        found = [directory / n for n in ("vcek.der", "vcek.pem")] if directory else []
        found = [f for f in found if f.exists()]
        if not found:
            raise EvidenceError("SEV-SNP: no VCEK given (pass one, or vcek.der in the collateral)")
        vcek_certs = _load_cert_file(found[0], "VCEK")
    else:
        vcek_certs = _certs_from(vcek, "VCEK")
    if len(vcek_certs) != 1:
        raise EvidenceError("VCEK: give exactly one certificate")
    if ask_ark is None and directory is not None and (directory / "ask_ark.pem").exists():
        chain = _load_cert_file(directory / "ask_ark.pem", "ASK/ARK")
    elif ask_ark is not None:
        chain = _certs_from(ask_ark, "ASK/ARK")
    else:
        return vcek_certs[0], None
    if len(chain) != 2:
        raise EvidenceError("ASK/ARK: give two certificates, the ASK (or ASVK) then the ARK")
    return vcek_certs[0], (chain[0], chain[1])


def _verify_snp(
    data: bytes,
    root_pem: object,
    collateral: object,
    at: _dt.datetime,
    vcek: object,
    ask_ark: object,
) -> EvidenceVerification:
    report = parse_report(data)
    vcek_cert, chain = _snp_certs(collateral, vcek, ask_ark)
    roots = _ark_roots(root_pem)
    steps = _amd.verify_report(
        report,
        vcek=vcek_cert,
        ask_ark=chain,
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
