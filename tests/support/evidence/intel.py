"""Synthetic Intel SGX and TDX evidence for tests: a test PKI (root "Test SGX Root CA", a PCK
Platform CA, a PCK leaf with real SGX extensions), byte-exact SGX v3 and TDX v4/v5 quotes, and
CRLs. Nothing here is trusted by any verifier by default.

Everything is deterministic for a given ``seed``: keys come from ``derive_private_key`` and
ECDSA signatures are deterministic (RFC 6979). Typical use::

    pki = IntelTestPki.create(seed=1)
    raw = tdx_quote(pki, td_body(report_data=rd, debug=False), version=5)
    report = verify_quote(parse_quote(raw), root=pki.root_cert, at=DEFAULT_AT)

Each check can be broken on purpose: ``corrupt={Corrupt.QUOTE_SIGNATURE}`` and friends for the
quote, ``IntelTestPki.create(bad_signature="ca")`` or validity windows for the chain, header and
certification data fields for the format, and CRLs with chosen serials, dates and signers.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from ppml.attestation.intel.pck import SGX_EXTENSIONS_OID, PckExtensions, PlatformConfiguration
from ppml.attestation.intel.quote import (
    ATT_KEY_TYPE_ECDSA_P256,
    BODY_TYPE_TD10,
    BODY_TYPE_TD15,
    CERT_DATA_PCK_CHAIN,
    CERT_DATA_QE_REPORT,
    TEE_TYPE_SGX,
    TEE_TYPE_TDX,
    SgxReportBody,
    TdReportBody,
)

__all__ = [
    "DEFAULT_AT",
    "DEFAULT_NOT_AFTER",
    "DEFAULT_NOT_BEFORE",
    "INTEL_QE_VENDOR_ID",
    "TEST_ROOT_CN",
    "Corrupt",
    "IntelTestPki",
    "Validity",
    "default_pck_extensions",
    "der_int",
    "der_oid",
    "der_tlv",
    "derived_key",
    "encode_pck_extensions",
    "make_crl",
    "qe_report_body",
    "raw_public_key",
    "raw_signature",
    "sgx_body",
    "sgx_quote",
    "td_body",
    "tdx_quote",
]

TEST_ROOT_CN: Final = "Test SGX Root CA"
DEFAULT_NOT_BEFORE: Final = datetime(2024, 1, 1, tzinfo=UTC)
DEFAULT_NOT_AFTER: Final = datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC)
#: A time inside every default validity window (certificates and CRLs).
DEFAULT_AT: Final = datetime(2026, 1, 1, tzinfo=UTC)
INTEL_QE_VENDOR_ID: Final = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
_PCK_CA_SERIAL: Final = 0x2001
_PCK_SERIAL: Final = 0x1001
_ROOT_SERIAL: Final = 0x0001
_SGX_ARC: Final = "1.2.840.113741.1.13.1"


def derived_key(seed: int, role: str) -> ec.EllipticCurvePrivateKey:
    """A fixed P-256 key for (seed, role)."""
    digest = hashlib.sha256(f"ppml-intel-test-key/{seed}/{role}".encode()).digest()
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    return ec.derive_private_key(int.from_bytes(digest, "big") % (order - 1) + 1, ec.SECP256R1())


def _sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    return key.sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))


def raw_signature(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA P-256 / SHA-256 over `data` as the 64 raw bytes r || s that quotes carry."""
    r, s = decode_dss_signature(_sign(key, data))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def raw_public_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The 64 raw bytes x || y of a P-256 public key."""
    return key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)[1:]


# --- DER encoding of the SGX extensions ------------------------------------------------------


def der_tlv(tag: int, value: bytes) -> bytes:
    """A DER TLV (definite length, up to 64 KiB)."""
    n = len(value)
    if n < 0x80:
        head = bytes([n])
    elif n < 0x100:
        head = bytes([0x81, n])
    else:
        head = bytes([0x82, n >> 8, n & 0xFF])
    return bytes([tag]) + head + value


def der_oid(dotted: str) -> bytes:
    """The DER OBJECT IDENTIFIER for a dotted string."""
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    return der_tlv(0x06, bytes(body))


def der_int(tag: int, n: int) -> bytes:
    """A non-negative DER INTEGER (tag 0x02) or ENUMERATED (0x0A), minimally encoded."""
    return der_tlv(tag, n.to_bytes(n.bit_length() // 8 + 1, "big"))


def _entry(oid: str, value: bytes) -> bytes:
    return der_tlv(0x30, der_oid(oid) + value)


def encode_pck_extensions(ext: PckExtensions) -> bytes:
    """The DER value of the SGX extension (OID 1.2.840.113741.1.13.1) for `ext`."""
    tcb = [
        _entry(f"{_SGX_ARC}.2.{i + 1}", der_int(0x02, c))
        for i, c in enumerate(ext.sgx_tcb_components)
    ]
    tcb.append(_entry(f"{_SGX_ARC}.2.17", der_int(0x02, ext.pce_svn)))
    tcb.append(_entry(f"{_SGX_ARC}.2.18", der_tlv(0x04, ext.cpu_svn)))
    items = [
        _entry(f"{_SGX_ARC}.1", der_tlv(0x04, ext.ppid)),
        _entry(f"{_SGX_ARC}.2", der_tlv(0x30, b"".join(tcb))),
        _entry(f"{_SGX_ARC}.3", der_tlv(0x04, ext.pce_id)),
        _entry(f"{_SGX_ARC}.4", der_tlv(0x04, ext.fmspc)),
        _entry(f"{_SGX_ARC}.5", der_int(0x0A, ext.sgx_type)),
    ]
    if ext.platform_instance_id is not None:
        items.append(_entry(f"{_SGX_ARC}.6", der_tlv(0x04, ext.platform_instance_id)))
    if ext.configuration is not None:
        conf = ext.configuration
        flags = (conf.dynamic_platform, conf.cached_keys, conf.smt_enabled)
        inner = b"".join(
            _entry(f"{_SGX_ARC}.7.{i}", der_tlv(0x01, b"\xff" if flag else b"\x00"))
            for i, flag in enumerate(flags, start=1)
            if flag is not None
        )
        items.append(_entry(f"{_SGX_ARC}.7", der_tlv(0x30, inner)))
    return der_tlv(0x30, b"".join(items))


def default_pck_extensions(**changes: object) -> PckExtensions:
    """SGX extensions of a Platform CA issued PCK certificate; any field can be changed."""
    base = PckExtensions(
        ppid=bytes(range(16)),
        sgx_tcb_components=(7, 7, 2, 2, 255, 255, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        pce_svn=13,
        cpu_svn=bytes([7, 7, 2, 2, 255, 255, 1, 0]) + bytes(8),
        pce_id=b"\x00\x00",
        fmspc=bytes.fromhex("00906ed50000"),
        sgx_type=1,
        platform_instance_id=bytes(range(100, 116)),
        configuration=PlatformConfiguration(True, True, False),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


# --- the PKI ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Validity:
    """A certificate's validity window."""

    not_before: datetime = DEFAULT_NOT_BEFORE
    not_after: datetime = DEFAULT_NOT_AFTER


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ppml test"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def certificate(
    *,
    subject: x509.Name,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    signer: ec.EllipticCurvePrivateKey,
    serial: int,
    validity: Validity,
    ca: bool,
    path_length: int | None,
    extra: Iterable[x509.ExtensionType] = (),
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(validity.not_before)
        .not_valid_after(validity.not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=not ca,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    for ext in extra:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(signer, hashes.SHA256(), ecdsa_deterministic=True)


@dataclass(frozen=True, slots=True)
class IntelTestPki:
    """A test PCK PKI: root, PCK CA, PCK leaf, and the QE's attestation key. The PCK key signs
    QE reports; the attestation key signs quotes."""

    root_key: ec.EllipticCurvePrivateKey
    root_cert: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    pck_key: ec.EllipticCurvePrivateKey
    pck_cert: x509.Certificate
    attestation_key: ec.EllipticCurvePrivateKey
    pck_extensions: PckExtensions

    @classmethod
    def create(
        cls,
        seed: int = 0,
        *,
        pck_extensions: PckExtensions | None = None,
        pck_extension_der: bytes | None = None,
        root_validity: Validity | None = None,
        ca_validity: Validity | None = None,
        pck_validity: Validity | None = None,
        ca_cn: str = "Intel SGX PCK Platform CA",
        pck_cn: str = "Intel SGX PCK Certificate",
        root_cn: str = TEST_ROOT_CN,
        bad_signature: Literal["root", "ca", "pck"] | None = None,
    ) -> IntelTestPki:
        """Build the PKI for `seed`. `bad_signature` signs that certificate with a stranger's
        key (names intact); `pck_extension_der` replaces the leaf's SGX extension value."""
        root_key = derived_key(seed, "root")
        ca_key = derived_key(seed, "pck-ca")
        pck_key = derived_key(seed, "pck")
        stranger = derived_key(seed, "stranger")
        ext = pck_extensions or default_pck_extensions()
        der = encode_pck_extensions(ext) if pck_extension_der is None else pck_extension_der
        root_name, ca_name = _name(root_cn), _name(ca_cn)
        root = certificate(
            subject=root_name,
            issuer=root_name,
            key=root_key,
            signer=stranger if bad_signature == "root" else root_key,
            serial=_ROOT_SERIAL,
            validity=root_validity or Validity(),
            ca=True,
            path_length=1,
        )
        ca = certificate(
            subject=ca_name,
            issuer=root_name,
            key=ca_key,
            signer=stranger if bad_signature == "ca" else root_key,
            serial=_PCK_CA_SERIAL,
            validity=ca_validity or Validity(),
            ca=True,
            path_length=0,
        )
        pck = certificate(
            subject=_name(pck_cn),
            issuer=ca_name,
            key=pck_key,
            signer=stranger if bad_signature == "pck" else ca_key,
            serial=_PCK_SERIAL,
            validity=pck_validity or Validity(),
            ca=False,
            path_length=None,
            extra=[x509.UnrecognizedExtension(SGX_EXTENSIONS_OID, der)],
        )
        return cls(
            root_key=root_key,
            root_cert=root,
            ca_key=ca_key,
            ca_cert=ca,
            pck_key=pck_key,
            pck_cert=pck,
            attestation_key=derived_key(seed, "attestation"),
            pck_extensions=ext,
        )

    def chain_pem(self) -> bytes:
        """Certification data type 5: PCK, CA and root certificates in PEM, leaf first."""
        return b"".join(
            c.public_bytes(Encoding.PEM) for c in (self.pck_cert, self.ca_cert, self.root_cert)
        )

    def pck_crl(
        self,
        *,
        revoked: Collection[int] = (),
        last_update: datetime = DEFAULT_NOT_BEFORE,
        next_update: datetime = DEFAULT_NOT_AFTER,
        signer: ec.EllipticCurvePrivateKey | None = None,
    ) -> x509.CertificateRevocationList:
        """A CRL of the PCK CA (signed by its key unless `signer` is given)."""
        return make_crl(self.ca_cert, signer or self.ca_key, revoked, last_update, next_update)

    def root_crl(
        self,
        *,
        revoked: Collection[int] = (),
        last_update: datetime = DEFAULT_NOT_BEFORE,
        next_update: datetime = DEFAULT_NOT_AFTER,
        signer: ec.EllipticCurvePrivateKey | None = None,
    ) -> x509.CertificateRevocationList:
        """A CRL of the root CA (signed by its key unless `signer` is given)."""
        return make_crl(self.root_cert, signer or self.root_key, revoked, last_update, next_update)


def make_crl(
    issuer: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    revoked: Collection[int] = (),
    last_update: datetime = DEFAULT_NOT_BEFORE,
    next_update: datetime = DEFAULT_NOT_AFTER,
) -> x509.CertificateRevocationList:
    """A CRL named after `issuer`, signed by `key`, revoking the serials in `revoked`."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(last_update)
        .next_update(next_update)
    )
    for serial in sorted(revoked):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(last_update)
            .build()
        )
    return builder.sign(key, hashes.SHA256(), ecdsa_deterministic=True)


# --- report bodies ----------------------------------------------------------------------------


def sgx_body(*, debug: bool = False, **changes: object) -> SgxReportBody:
    """An SGX enclave report body; `debug` sets ATTRIBUTES.FLAGS bit 1 (unless `attributes` is
    given), any other field can be changed by name."""
    flags = 0x05 | (0x02 if debug else 0)  # INIT, MODE64BIT (+ DEBUG)
    base = SgxReportBody(
        cpu_svn=bytes([7, 7, 2, 2, 255, 255, 1, 0]) + bytes(8),
        misc_select=0,
        isv_ext_prod_id=bytes(16),
        attributes=flags.to_bytes(8, "little") + (0xE7).to_bytes(8, "little"),
        mr_enclave=hashlib.sha256(b"test enclave").digest(),
        mr_signer=hashlib.sha256(b"test signer").digest(),
        config_id=bytes(64),
        isv_prod_id=0,
        isv_svn=0,
        config_svn=0,
        isv_family_id=bytes(16),
        report_data=bytes(64),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def qe_report_body(**changes: object) -> SgxReportBody:
    """The Quoting Enclave's report as a quote carries it (report data set when building)."""
    base = sgx_body(
        mr_enclave=hashlib.sha256(b"test quoting enclave").digest(),
        mr_signer=hashlib.sha256(b"test quoting enclave signer").digest(),
        isv_prod_id=1,
        isv_svn=8,
        attributes=(0x15).to_bytes(8, "little") + (0xE7).to_bytes(8, "little"),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def td_body(*, td15: bool = False, debug: bool = False, **changes: object) -> TdReportBody:
    """A TD report body (TDX 1.0, or 1.5 with `td15`); `debug` sets TD_ATTRIBUTES bit 0
    (unless `td_attributes` is given), any other field can be changed by name."""

    def m(label: str) -> bytes:
        return hashlib.sha384(label.encode()).digest()

    base = TdReportBody(
        tee_tcb_svn=bytes([3, 0, 5]) + bytes(13),
        mr_seam=m("mr_seam"),
        mr_signer_seam=bytes(48),
        seam_attributes=bytes(8),
        td_attributes=(0x10000000 | (1 if debug else 0)).to_bytes(8, "little"),
        xfam=bytes.fromhex("e742060000000000"),
        mr_td=m("mr_td"),
        mr_config_id=bytes(48),
        mr_owner=bytes(48),
        mr_owner_config=bytes(48),
        rtmr0=m("rtmr0"),
        rtmr1=m("rtmr1"),
        rtmr2=bytes(48),
        rtmr3=bytes(48),
        report_data=bytes(64),
        tee_tcb_svn2=bytes([3, 0, 5]) + bytes(13) if td15 else None,
        mr_service_td=m("mr_service_td") if td15 else None,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


# --- quotes -----------------------------------------------------------------------------------


class Corrupt(enum.Enum):
    """A deliberate break of one signed or bound part of a quote."""

    QUOTE_SIGNATURE = "quote_signature"  # signature over other bytes
    QE_REPORT_SIGNATURE = "qe_report_signature"  # QE report signature over other bytes
    BINDING_HASH = "binding_hash"  # QE report data[0:32] not SHA-256(key || auth data)
    BINDING_PADDING = "binding_padding"  # QE report data[32:64] not zero


@dataclass(frozen=True, slots=True)
class _Auth:
    """The parts of the signature data, with the cert data type fields exposed for tests."""

    qe_report: SgxReportBody | None = None
    qe_auth_data: bytes = bytes(range(32))
    pck_chain_pem: bytes | None = None
    cert_data_type: int = CERT_DATA_PCK_CHAIN
    corrupt: frozenset[Corrupt] = field(default_factory=frozenset)
    attestation_public_key: bytes | None = None


def _header(
    version: int, tee_type: int, att_key_type: int, qe_svn: int, pce_svn: int, user_data: bytes
) -> bytes:
    return (
        struct.pack("<HHIHH", version, att_key_type, tee_type, qe_svn, pce_svn)
        + INTEL_QE_VENDOR_ID
        + user_data
    )


def _cert_data(cert_type: int, data: bytes) -> bytes:
    return struct.pack("<HI", cert_type, len(data)) + data


def _qe_part(pki: IntelTestPki, auth: _Auth) -> tuple[bytes, bytes]:
    """(attestation key, QE report || signature || auth data || type-5 chain)."""
    att_key = auth.attestation_public_key or raw_public_key(pki.attestation_key)
    binding = hashlib.sha256(att_key + auth.qe_auth_data).digest()
    if Corrupt.BINDING_HASH in auth.corrupt:
        binding = hashlib.sha256(b"not the attestation key").digest()
    padding = b"\x01" * 32 if Corrupt.BINDING_PADDING in auth.corrupt else bytes(32)
    qe_report = replace(auth.qe_report or qe_report_body(), report_data=binding + padding)
    qe_bytes = qe_report.to_bytes()
    signed = qe_bytes + b"!" if Corrupt.QE_REPORT_SIGNATURE in auth.corrupt else qe_bytes
    qe_sig = raw_signature(pki.pck_key, signed)
    pem = pki.chain_pem() if auth.pck_chain_pem is None else auth.pck_chain_pem
    part = (
        qe_bytes
        + qe_sig
        + struct.pack("<H", len(auth.qe_auth_data))
        + auth.qe_auth_data
        + _cert_data(auth.cert_data_type, pem)
    )
    return att_key, part


def _quote_signature(pki: IntelTestPki, signed: bytes, auth: _Auth) -> bytes:
    message = signed + b"!" if Corrupt.QUOTE_SIGNATURE in auth.corrupt else signed
    return raw_signature(pki.attestation_key, message)


def sgx_quote(
    pki: IntelTestPki,
    body: SgxReportBody | None = None,
    *,
    qe_report: SgxReportBody | None = None,
    qe_auth_data: bytes = bytes(range(32)),
    pck_chain_pem: bytes | None = None,
    cert_data_type: int = CERT_DATA_PCK_CHAIN,
    version: int = 3,
    tee_type: int = TEE_TYPE_SGX,
    att_key_type: int = ATT_KEY_TYPE_ECDSA_P256,
    qe_svn: int = 8,
    pce_svn: int = 13,
    user_data: bytes = bytes(20),
    trailing: bytes = b"",
    corrupt: Iterable[Corrupt] = (),
    attestation_public_key: bytes | None = None,
) -> bytes:
    """A byte-exact SGX ECDSA quote v3 for `body` (default `sgx_body()`), signed through `pki`.
    Every header and certification data field can be set to a wrong value on purpose, and
    `attestation_public_key` declares (and binds) other key bytes than the signing key's."""
    auth = _Auth(
        qe_report,
        qe_auth_data,
        pck_chain_pem,
        cert_data_type,
        frozenset(corrupt),
        attestation_public_key,
    )
    signed = (
        _header(version, tee_type, att_key_type, qe_svn, pce_svn, user_data)
        + (body or sgx_body()).to_bytes()
    )
    att_key, part = _qe_part(pki, auth)
    sig_data = _quote_signature(pki, signed, auth) + att_key + part
    return signed + struct.pack("<I", len(sig_data)) + sig_data + trailing


def tdx_quote(
    pki: IntelTestPki,
    body: TdReportBody | None = None,
    *,
    version: int = 4,
    body_type: int | None = None,
    qe_report: SgxReportBody | None = None,
    qe_auth_data: bytes = bytes(range(32)),
    pck_chain_pem: bytes | None = None,
    cert_data_type: int = CERT_DATA_PCK_CHAIN,
    outer_cert_data_type: int = CERT_DATA_QE_REPORT,
    tee_type: int = TEE_TYPE_TDX,
    att_key_type: int = ATT_KEY_TYPE_ECDSA_P256,
    user_data: bytes = bytes(20),
    trailing: bytes = b"",
    corrupt: Iterable[Corrupt] = (),
    attestation_public_key: bytes | None = None,
) -> bytes:
    """A byte-exact TDX ECDSA quote, v4 or v5, for `body` (default `td_body()`; a v4 quote needs
    a TDX 1.0 body). For v5 the body type defaults to 3 for a 1.5 body, else 2."""
    td = body or td_body()
    encoded = td.to_bytes()
    signed = _header(version, tee_type, att_key_type, 0, 0, user_data)
    if version >= 5:
        if body_type is None:
            body_type = BODY_TYPE_TD15 if td.is_td15 else BODY_TYPE_TD10
        signed += struct.pack("<HI", body_type, len(encoded))
    signed += encoded
    auth = _Auth(
        qe_report,
        qe_auth_data,
        pck_chain_pem,
        cert_data_type,
        frozenset(corrupt),
        attestation_public_key,
    )
    att_key, part = _qe_part(pki, auth)
    sig_data = (
        _quote_signature(pki, signed, auth) + att_key + _cert_data(outer_cert_data_type, part)
    )
    return signed + struct.pack("<I", len(sig_data)) + sig_data + trailing
