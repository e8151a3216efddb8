"""Synthetic Intel PCS collateral for tests: TCB info, QE identity, issuer chains and CRLs,
byte-exact and signed by a test PKI ("Test SGX Root CA", "Test SGX TCB Signing", "Test SGX PCK
Platform CA"), with every field settable and hooks to break what a verifier must catch.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from tests.support.evidence.intel import Validity, certificate
from tests.support.evidence.intel import make_crl as intel_crl

from ppml.attestation.collateral.models import Collateral

__all__ = [
    "DEFAULT_FMSPC",
    "DEFAULT_QE_MRSIGNER",
    "DEFAULT_SEAM_MRSIGNER",
    "TestPki",
    "build_files",
    "collateral_from_files",
    "isv_level",
    "make_cert",
    "make_crl",
    "module_identity",
    "qe_identity_body",
    "signed_document",
    "tcb_info_body",
    "tcb_level",
    "tdx_module",
    "write_files",
]

DEFAULT_FMSPC = "00906ed50000"
DEFAULT_QE_MRSIGNER = "8c4f5775d796503e96137f77c68a829a0056ac8ded70140b081b094490c57bff"
DEFAULT_SEAM_MRSIGNER = "00" * 48
_EPOCH = _dt.datetime(2020, 1, 1, tzinfo=_dt.UTC)
_FAR = _dt.datetime(2049, 12, 31, tzinfo=_dt.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ppml tests"),
        ]
    )


def make_cert(
    cn: str,
    key: ec.EllipticCurvePrivateKey,
    *,
    issuer: x509.Certificate | None = None,
    issuer_key: ec.EllipticCurvePrivateKey | None = None,
    ca: bool,
    not_before: _dt.datetime = _EPOCH,
    not_after: _dt.datetime = _FAR,
    serial: int | None = None,
) -> x509.Certificate:
    """A P-256 certificate; self-signed when no issuer is given."""
    subject = _name(cn)
    return certificate(
        subject=subject,
        issuer=issuer.subject if issuer is not None else subject,
        key=key,
        signer=issuer_key if issuer_key is not None else key,
        serial=serial if serial is not None else x509.random_serial_number(),
        validity=Validity(not_before, not_after),
        ca=ca,
        path_length=None,
    )


@dataclass(frozen=True)
class TestPki:
    """A test root, a TCB signing certificate and a PCK platform CA under it."""

    __test__ = False  # not a pytest test class

    root_key: ec.EllipticCurvePrivateKey
    root: x509.Certificate
    signing_key: ec.EllipticCurvePrivateKey
    signing: x509.Certificate
    pck_ca_key: ec.EllipticCurvePrivateKey
    pck_ca: x509.Certificate

    @classmethod
    def create(
        cls,
        *,
        root: x509.Certificate | None = None,
        root_key: ec.EllipticCurvePrivateKey | None = None,
        signing: x509.Certificate | None = None,
        signing_key: ec.EllipticCurvePrivateKey | None = None,
        not_before: _dt.datetime = _EPOCH,
        not_after: _dt.datetime = _FAR,
    ) -> TestPki:
        """Make whatever is not given: a root ("Test SGX Root CA"), a TCB signing certificate
        ("Test SGX TCB Signing") and a PCK CA ("Test SGX PCK Platform CA")."""
        if root is None or root_key is None:
            root_key = ec.generate_private_key(ec.SECP256R1())
            root = make_cert(
                "Test SGX Root CA", root_key, ca=True, not_before=not_before, not_after=not_after
            )
        if signing is None or signing_key is None:
            signing_key = ec.generate_private_key(ec.SECP256R1())
            signing = make_cert(
                "Test SGX TCB Signing",
                signing_key,
                issuer=root,
                issuer_key=root_key,
                ca=False,
                not_before=not_before,
                not_after=not_after,
            )
        pck_ca_key = ec.generate_private_key(ec.SECP256R1())
        pck_ca = make_cert(
            "Test SGX PCK Platform CA",
            pck_ca_key,
            issuer=root,
            issuer_key=root_key,
            ca=True,
            not_before=not_before,
            not_after=not_after,
        )
        return cls(root_key, root, signing_key, signing, pck_ca_key, pck_ca)

    def signing_chain_pem(self) -> bytes:
        return _pem(self.signing, self.root)

    def pck_ca_chain_pem(self) -> bytes:
        return _pem(self.pck_ca, self.root)


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _date(value: _dt.datetime | str) -> str:
    if isinstance(value, str):
        return value
    return value.astimezone(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- JSON bodies


def tcb_level(
    *,
    sgx: Sequence[int] = (2,) * 16,
    pcesvn: int = 13,
    tdx: Sequence[int] | None = None,
    status: str = "UpToDate",
    date: _dt.datetime | str = "2024-03-13T00:00:00Z",
    advisory_ids: Sequence[str] | None = None,
    version: int = 3,
) -> dict[str, Any]:
    """One platform TCB level, in the v3 layout (or v2's sgxtcbcompNNsvn when version=2)."""
    if version == 2:
        tcb: dict[str, Any] = {f"sgxtcbcomp{n + 1:02d}svn": svn for n, svn in enumerate(sgx)}
    else:
        tcb = {"sgxtcbcomponents": [{"svn": svn} for svn in sgx]}
    tcb["pcesvn"] = pcesvn
    if tdx is not None:
        tcb["tdxtcbcomponents"] = [{"svn": svn} for svn in tdx]
    level: dict[str, Any] = {"tcb": tcb, "tcbDate": _date(date), "tcbStatus": status}
    if advisory_ids is not None:
        level["advisoryIDs"] = list(advisory_ids)
    return level


def isv_level(
    isvsvn: int,
    status: str = "UpToDate",
    *,
    date: _dt.datetime | str = "2024-03-13T00:00:00Z",
    advisory_ids: Sequence[str] | None = None,
) -> dict[str, Any]:
    """One QE identity or TDX module identity level."""
    level: dict[str, Any] = {"tcb": {"isvsvn": isvsvn}, "tcbDate": _date(date), "tcbStatus": status}
    if advisory_ids is not None:
        level["advisoryIDs"] = list(advisory_ids)
    return level


def tdx_module(
    mrsigner: str = DEFAULT_SEAM_MRSIGNER,
    attributes: str = "0000000000000000",
    attributes_mask: str = "FFFFFFFFFFFFFFFF",
) -> dict[str, Any]:
    return {"mrsigner": mrsigner, "attributes": attributes, "attributesMask": attributes_mask}


def module_identity(
    ident: str = "TDX_01",
    levels: Iterable[Mapping[str, Any]] = (),
    *,
    mrsigner: str = DEFAULT_SEAM_MRSIGNER,
    attributes: str = "0000000000000000",
    attributes_mask: str = "FFFFFFFFFFFFFFFF",
) -> dict[str, Any]:
    body = {"id": ident, **tdx_module(mrsigner, attributes, attributes_mask)}
    body["tcbLevels"] = [dict(lv) for lv in levels] or [isv_level(0)]
    return body


def tcb_info_body(
    *,
    tee: str = "sgx",
    version: int = 3,
    fmspc: str = DEFAULT_FMSPC,
    pce_id: str = "0000",
    levels: Iterable[Mapping[str, Any]] | None = None,
    issue_date: _dt.datetime | str = "2025-01-01T00:00:00Z",
    next_update: _dt.datetime | str = "2025-02-01T00:00:00Z",
    tcb_evaluation_data_number: int = 17,
    tcb_type: int = 0,
    tdx_module_body: Mapping[str, Any] | None = None,
    module_identities: Iterable[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """A TCB info body (the value of "tcbInfo"). For TDX the default levels carry TDX SVNs and a
    tdxModule is added."""
    tdx = tee == "tdx"
    body: dict[str, Any] = {}
    if version >= 3:
        body["id"] = "TDX" if tdx else "SGX"
    body.update(
        {
            "version": version,
            "issueDate": _date(issue_date),
            "nextUpdate": _date(next_update),
            "fmspc": fmspc,
            "pceId": pce_id,
            "tcbType": tcb_type,
            "tcbEvaluationDataNumber": tcb_evaluation_data_number,
        }
    )
    if tdx:
        body["tdxModule"] = dict(tdx_module_body) if tdx_module_body is not None else tdx_module()
        if module_identities is not None:
            body["tdxModuleIdentities"] = [dict(m) for m in module_identities]
    if levels is None:
        # TDX SVN[1] is the TDX module's major version: 0 for a module without an identity.
        levels = [tcb_level(tdx=(3, 0) + (3,) * 14 if tdx else None, version=version)]
    body["tcbLevels"] = [dict(lv) for lv in levels]
    return body


def qe_identity_body(
    *,
    ident: str = "QE",
    mrsigner: str = DEFAULT_QE_MRSIGNER,
    isvprodid: int = 1,
    miscselect: str = "00000000",
    miscselect_mask: str = "FFFFFFFF",
    attributes: str = "11000000000000000000000000000000",
    attributes_mask: str = "FBFFFFFFFFFFFFFF0000000000000000",
    levels: Iterable[Mapping[str, Any]] | None = None,
    issue_date: _dt.datetime | str = "2025-01-01T00:00:00Z",
    next_update: _dt.datetime | str = "2025-02-01T00:00:00Z",
    tcb_evaluation_data_number: int = 17,
) -> dict[str, Any]:
    """A QE identity body (the value of "enclaveIdentity"), version 2."""
    return {
        "id": ident,
        "version": 2,
        "issueDate": _date(issue_date),
        "nextUpdate": _date(next_update),
        "tcbEvaluationDataNumber": tcb_evaluation_data_number,
        "miscselect": miscselect,
        "miscselectMask": miscselect_mask,
        "attributes": attributes,
        "attributesMask": attributes_mask,
        "mrsigner": mrsigner,
        "isvprodid": isvprodid,
        "tcbLevels": [dict(lv) for lv in levels] if levels is not None else [isv_level(8)],
    }


def _raw_sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def signed_document(
    body_key: str,
    body: Mapping[str, Any] | bytes,
    key: ec.EllipticCurvePrivateKey,
    *,
    template: bytes = b'{"<KEY>":<BODY>,"signature":"<SIG>"}',
    sign_over: bytes | None = None,
    corrupt_signature: bool = False,
    signature: bytes | None = None,
) -> bytes:
    """A PCS signed document. `body` is a dict (written compactly, as PCS does) or the exact
    body bytes; the signature (raw r||s, hex) is over `sign_over` (default: the body bytes).
    `template` places ``<KEY>``, ``<BODY>`` and ``<SIG>`` (to add white space, reorder keys or
    write a key twice); `corrupt_signature` flips a bit of the signature."""
    raw = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
    sig = (
        signature
        if signature is not None
        else _raw_sign(key, raw if sign_over is None else sign_over)
    )
    if corrupt_signature:
        sig = bytes([sig[0] ^ 1]) + sig[1:]
    return (
        template.replace(b"<KEY>", body_key.encode())
        .replace(b"<BODY>", raw)
        .replace(b"<SIG>", sig.hex().encode())
    )


def make_crl(
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    revoked_serials: Iterable[int] = (),
    last_update: _dt.datetime = _dt.datetime(2025, 1, 1, tzinfo=_dt.UTC),
    next_update: _dt.datetime = _dt.datetime(2025, 2, 1, tzinfo=_dt.UTC),
    pem: bool = False,
    signer_key: ec.EllipticCurvePrivateKey | None = None,
) -> bytes:
    """A CRL from `issuer` (DER, or PEM), signed by `signer_key` if given (to break it)."""
    crl = intel_crl(
        issuer, signer_key or issuer_key, tuple(revoked_serials), last_update, next_update
    )
    return crl.public_bytes(serialization.Encoding.PEM if pem else serialization.Encoding.DER)


def build_files(
    pki: TestPki,
    *,
    tcb_info: Mapping[str, Any] | bytes | None = None,
    qe_identity: Mapping[str, Any] | bytes | None = None,
    pck_crl: bytes | None = None,
    root_ca_crl: bytes | None = None,
    pem_crls: bool = False,
) -> dict[str, bytes]:
    """The files of a collateral directory. Bodies given as dicts are signed by the PKI's TCB
    signing key; bytes are taken as whole, finished documents. CRLs default to empty,
    valid CRLs of January 2025."""
    files: dict[str, bytes] = {}
    ext = "pem" if pem_crls else "der"
    signed = (("tcb_info", "tcbInfo", tcb_info), ("qe_identity", "enclaveIdentity", qe_identity))
    for name, kind, body in signed:
        if body is not None:
            files[f"{name}.json"] = (
                body if isinstance(body, bytes) else signed_document(kind, body, pki.signing_key)
            )
            files[f"{name}_issuer_chain.pem"] = pki.signing_chain_pem()
    files[f"pck_crl.{ext}"] = (
        pck_crl if pck_crl is not None else make_crl(pki.pck_ca, pki.pck_ca_key, pem=pem_crls)
    )
    files["pck_crl_issuer_chain.pem"] = pki.pck_ca_chain_pem()
    files[f"root_ca_crl.{ext}"] = (
        root_ca_crl if root_ca_crl is not None else make_crl(pki.root, pki.root_key, pem=pem_crls)
    )
    return files


def write_files(directory: str | Path, files: Mapping[str, bytes]) -> Path:
    """Write `files` (name -> bytes) into `directory` (created if needed)."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


def collateral_from_files(files: Mapping[str, bytes]) -> Collateral:
    """The `Collateral` the files would load as (without touching the disk)."""

    def pick(*names: str) -> bytes | None:
        return next((files[n] for n in names if n in files), None)

    return Collateral(
        tcb_info_json=pick("tcb_info.json"),
        tcb_info_issuer_chain=pick("tcb_info_issuer_chain.pem"),
        qe_identity_json=pick("qe_identity.json"),
        qe_identity_issuer_chain=pick("qe_identity_issuer_chain.pem"),
        pck_crl=pick("pck_crl.der", "pck_crl.pem"),
        pck_crl_issuer_chain=pick("pck_crl_issuer_chain.pem"),
        root_ca_crl=pick("root_ca_crl.der", "root_ca_crl.pem"),
    )
