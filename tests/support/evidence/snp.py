"""Synthetic SEV-SNP evidence: a test ARK/ASK/ASVK hierarchy, VCEKs and VLEKs with AMD's
extensions, and byte-exact attestation reports (versions 2 to 5) signed by them.

Everything is signed by keys generated in this process; nothing here is trusted unless a test
passes `SnpTestPki.roots` to the verifier. Keys are generated once per process and reused.
Hooks to break things: any report field, `SnpReportFields.patches` (raw bytes written before
signing), `sign_report`'s ``r_high``/``s_high`` (bytes above the 48-byte scalars), and the
certificate builders' ``omit``/``override``/``signer``/validity arguments.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from ppml.attestation.amd.report import (
    REPORT_SIZE,
    SIGNED_SIZE,
    SigningKey,
    TcbLayout,
    TcbVersion,
    tcb_layout_for_product,
)
from ppml.attestation.amd.verify import (
    OID_BL_SPL,
    OID_CSP_ID,
    OID_FMC_SPL,
    OID_HW_ID,
    OID_PRODUCT_NAME,
    OID_SNP_SPL,
    OID_STRUCT_VERSION,
    OID_TEE_SPL,
    OID_UCODE_SPL,
)

__all__ = [
    "CPUID",
    "PKI_NOT_AFTER",
    "PKI_NOT_BEFORE",
    "VERIFY_AT",
    "EndorsementKey",
    "SnpEvidence",
    "SnpReportFields",
    "SnpTestPki",
    "default_tcb",
    "der_ia5",
    "der_uint",
    "encode_report",
    "make_endorsement_key",
    "make_evidence",
    "make_pki",
    "sign_report",
]

PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
PKI_NOT_BEFORE = datetime(2020, 1, 1, tzinfo=UTC)
PKI_NOT_AFTER = datetime(2045, 1, 1, tzinfo=UTC)
VCEK_NOT_BEFORE = datetime(2024, 1, 1, tzinfo=UTC)
VCEK_NOT_AFTER = datetime(2031, 1, 1, tzinfo=UTC)
VERIFY_AT = datetime(2025, 6, 1, tzinfo=UTC)

# (family, model, stepping) of one part of each product.
CPUID = {"Milan": (0x19, 0x01, 0x01), "Genoa": (0x19, 0x11, 0x01), "Turin": (0x1A, 0x02, 0x00)}
_PRODUCT_NAMES = {"Milan": "Milan-B0", "Genoa": "Genoa-B1", "Turin": "Turin-C0"}


# -- keys and certificates ---------------------------------------------------------------------


@cache
def _rsa_key(role: str) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=4096)


@cache
def _ec_key(role: str) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _amd_name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
            x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Advanced Micro Devices"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca_cert(
    subject: str,
    key: rsa.RSAPrivateKey,
    issuer: str,
    issuer_key: rsa.RSAPrivateKey,
    serial: int,
    path_length: int | None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_amd_name(subject))
        .issuer_name(_amd_name(issuer))
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(PKI_NOT_BEFORE)
        .not_valid_after(PKI_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    return builder.sign(issuer_key, hashes.SHA384(), rsa_padding=PSS)


@dataclass(frozen=True)
class SnpTestPki:
    """A test hierarchy for one product: ARK-<product>, SEV-<product>, SEV-VLEK-<product>."""

    product: str
    ark: x509.Certificate
    ask: x509.Certificate
    asvk: x509.Certificate
    ark_key: rsa.RSAPrivateKey = field(repr=False)
    ask_key: rsa.RSAPrivateKey = field(repr=False)
    asvk_key: rsa.RSAPrivateKey = field(repr=False)

    @property
    def roots(self) -> Mapping[str, x509.Certificate]:
        return {self.product: self.ark}

    @property
    def signing_keys(self) -> Mapping[str, x509.Certificate]:
        return {self.product: self.ask}

    @property
    def vcek_chain(self) -> tuple[x509.Certificate, x509.Certificate]:
        return (self.ask, self.ark)

    @property
    def vlek_chain(self) -> tuple[x509.Certificate, x509.Certificate]:
        return (self.asvk, self.ark)


@cache
def make_pki(product: str = "Milan") -> SnpTestPki:
    """The process's test hierarchy for `product` (RSA-4096 keys shared by all products)."""
    ark_key, ask_key, asvk_key = _rsa_key("ark"), _rsa_key("ask"), _rsa_key("asvk")
    ark_cn = f"ARK-{product}"
    ark = _ca_cert(ark_cn, ark_key, ark_cn, ark_key, 0x10000, None)
    ask = _ca_cert(f"SEV-{product}", ask_key, ark_cn, ark_key, 0x10001, 0)
    asvk = _ca_cert(f"SEV-VLEK-{product}", asvk_key, ark_cn, ark_key, 0x10101, 0)
    return SnpTestPki(product, ark, ask, asvk, ark_key, ask_key, asvk_key)


def der_uint(value: int) -> bytes:
    """DER INTEGER of a small non-negative value, as AMD's SPL extensions hold."""
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return bytes([0x02, len(body)]) + body


def der_ia5(text: str) -> bytes:
    body = text.encode("ascii")
    return bytes([0x16, len(body)]) + body


@dataclass(frozen=True)
class EndorsementKey:
    """A VCEK or VLEK certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)


def make_endorsement_key(
    pki: SnpTestPki,
    *,
    vlek: bool = False,
    chip_id: bytes = bytes(range(64)),
    tcb: TcbVersion | None = None,
    product_name: str | None = None,
    not_before: datetime = VCEK_NOT_BEFORE,
    not_after: datetime = VCEK_NOT_AFTER,
    key: ec.EllipticCurvePrivateKey | None = None,
    omit: frozenset[x509.ObjectIdentifier] = frozenset(),
    override: Mapping[x509.ObjectIdentifier, bytes] | None = None,
    signer: rsa.RSAPrivateKey | None = None,
    issuer_cn: str | None = None,
) -> EndorsementKey:
    """A VCEK (or VLEK) for `pki`'s product with AMD's extensions; every part can be altered.

    `tcb` gives the SPL extensions (default: `default_tcb`); `chip_id` the hwID (VCEK only);
    `omit` drops extensions, `override` replaces their DER values, `signer` signs instead of the
    ASK/ASVK, `key` is the certified key (default: one per process and kind).
    """
    layout = tcb_layout_for_product(pki.product)
    tcb = tcb or default_tcb(pki.product)
    key = key or _ec_key("vlek" if vlek else "vcek")
    extensions: dict[x509.ObjectIdentifier, bytes] = {
        OID_STRUCT_VERSION: der_uint(1 if layout is TcbLayout.TURIN else 0),
        OID_PRODUCT_NAME: der_ia5(product_name or _PRODUCT_NAMES[pki.product]),
        OID_BL_SPL: der_uint(tcb.bootloader),
        OID_TEE_SPL: der_uint(tcb.tee),
        OID_SNP_SPL: der_uint(tcb.snp),
        OID_UCODE_SPL: der_uint(tcb.microcode),
    }
    if tcb.fmc is not None:
        extensions[OID_FMC_SPL] = der_uint(tcb.fmc)
    if vlek:
        extensions[OID_CSP_ID] = der_ia5("cloud.example")
    else:
        extensions[OID_HW_ID] = chip_id[:8] if layout is TcbLayout.TURIN else chip_id
    extensions.update(override or {})
    issuer = issuer_cn or (f"SEV-VLEK-{pki.product}" if vlek else f"SEV-{pki.product}")
    builder = (
        x509.CertificateBuilder()
        .subject_name(_amd_name("SEV-VLEK" if vlek else "SEV-VCEK"))
        .issuer_name(_amd_name(issuer))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    for oid, value in extensions.items():
        if oid not in omit:
            builder = builder.add_extension(x509.UnrecognizedExtension(oid, value), critical=False)
    sign_with = signer or (pki.asvk_key if vlek else pki.ask_key)
    cert = builder.sign(sign_with, hashes.SHA384(), rsa_padding=PSS)
    return EndorsementKey(cert, key)


# -- reports -----------------------------------------------------------------------------------


def default_tcb(product: str) -> TcbVersion:
    layout = tcb_layout_for_product(product)
    fmc = 1 if layout is TcbLayout.TURIN else None
    return TcbVersion.build(bootloader=4, tee=0, snp=24, microcode=219, fmc=fmc, layout=layout)


@dataclass(frozen=True)
class SnpReportFields:
    """Every field of a report, settable. TCB fields are 8 raw bytes."""

    version: int = 3
    guest_svn: int = 2
    policy: int = 0x3001F
    family_id: bytes = bytes(16)
    image_id: bytes = bytes(16)
    vmpl: int = 0
    signature_algo: int = 1
    current_tcb: bytes = b""
    platform_info: int = 0x25
    author_key_en: bool = False
    mask_chip_key: bool = False
    signing_key: int = SigningKey.VCEK
    report_data: bytes = bytes(64)
    measurement: bytes = bytes(range(48))
    host_data: bytes = bytes(32)
    id_key_digest: bytes = bytes(48)
    author_key_digest: bytes = bytes(48)
    report_id: bytes = bytes(range(100, 132))
    report_id_ma: bytes = b"\xff" * 32
    reported_tcb: bytes = b""
    cpuid_family: int = 0x19
    cpuid_model: int = 0x01
    cpuid_stepping: int = 0x01
    chip_id: bytes = bytes(range(64))
    committed_tcb: bytes = b""
    current_build: int = 29
    current_minor: int = 55
    current_major: int = 1
    committed_build: int = 29
    committed_minor: int = 55
    committed_major: int = 1
    launch_tcb: bytes = b""
    launch_mit_vector: int = 0
    current_mit_vector: int = 0
    patches: Mapping[int, bytes] = field(default_factory=dict)

    def replace(self, **changes: object) -> SnpReportFields:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def encode_report(f: SnpReportFields) -> bytearray:
    """The 1184 report bytes with an all-zero signature block. Fields a version does not have
    (CPUID before 3, mitigation vectors before 5) are left zero; `patches` are applied last."""
    out = bytearray(REPORT_SIZE)
    empty_tcb = bytes(8)
    key_info = int(f.author_key_en) | int(f.mask_chip_key) << 1 | (f.signing_key & 0x7) << 2
    struct.pack_into("<IIQ", out, 0x000, f.version, f.guest_svn, f.policy)
    out[0x010:0x020] = f.family_id
    out[0x020:0x030] = f.image_id
    struct.pack_into("<II", out, 0x030, f.vmpl, f.signature_algo)
    out[0x038:0x040] = f.current_tcb or empty_tcb
    struct.pack_into("<QI", out, 0x040, f.platform_info, key_info)
    out[0x050:0x090] = f.report_data
    out[0x090:0x0C0] = f.measurement
    out[0x0C0:0x0E0] = f.host_data
    out[0x0E0:0x110] = f.id_key_digest
    out[0x110:0x140] = f.author_key_digest
    out[0x140:0x160] = f.report_id
    out[0x160:0x180] = f.report_id_ma
    out[0x180:0x188] = f.reported_tcb or empty_tcb
    if f.version >= 3:
        out[0x188:0x18B] = bytes([f.cpuid_family, f.cpuid_model, f.cpuid_stepping])
    out[0x1A0:0x1E0] = f.chip_id
    out[0x1E0:0x1E8] = f.committed_tcb or empty_tcb
    out[0x1E8:0x1EB] = bytes([f.current_build, f.current_minor, f.current_major])
    out[0x1EC:0x1EF] = bytes([f.committed_build, f.committed_minor, f.committed_major])
    out[0x1F0:0x1F8] = f.launch_tcb or empty_tcb
    if f.version >= 5:
        struct.pack_into("<QQ", out, 0x1F8, f.launch_mit_vector, f.current_mit_vector)
    if len(out) != REPORT_SIZE:
        raise ValueError("a report field has the wrong size")
    for offset, patch in f.patches.items():
        out[offset : offset + len(patch)] = patch
    if len(out) != REPORT_SIZE:
        raise ValueError("a patch runs past the end of the report")
    return out


def sign_report(
    raw: bytes | bytearray,
    key: ec.EllipticCurvePrivateKey,
    *,
    r_high: bytes = b"",
    s_high: bytes = b"",
) -> bytes:
    """Sign bytes 0x000..0x29F with `key` and write R and S (72-byte little-endian fields).
    ``r_high``/``s_high`` are written above the 48-byte scalars, to break the format."""
    out = bytearray(raw)
    der = key.sign(bytes(out[:SIGNED_SIZE]), ec.ECDSA(hashes.SHA384()))
    r, s = decode_dss_signature(der)
    out[SIGNED_SIZE : SIGNED_SIZE + 48] = r.to_bytes(48, "little")
    out[SIGNED_SIZE + 72 : SIGNED_SIZE + 120] = s.to_bytes(48, "little")
    out[SIGNED_SIZE + 48 : SIGNED_SIZE + 48 + len(r_high)] = r_high
    out[SIGNED_SIZE + 120 : SIGNED_SIZE + 120 + len(s_high)] = s_high
    return bytes(out[:REPORT_SIZE])


@dataclass(frozen=True)
class SnpEvidence:
    """A signed report with everything needed to verify it against the test roots."""

    raw: bytes
    fields: SnpReportFields
    pki: SnpTestPki
    endorsement: EndorsementKey
    vlek: bool
    at: datetime = VERIFY_AT

    @property
    def vcek(self) -> x509.Certificate:
        return self.endorsement.cert

    @property
    def ask_ark(self) -> tuple[x509.Certificate, x509.Certificate]:
        return self.pki.vlek_chain if self.vlek else self.pki.vcek_chain

    def verify_kwargs(self) -> dict[str, object]:
        """Keyword arguments for `verify_report` against the test roots."""
        return {
            "vcek": self.vcek,
            "ask_ark": self.ask_ark,
            "at": self.at,
            "roots": self.pki.roots,
            "signing_keys": self.pki.signing_keys,
        }


def make_evidence(
    *,
    product: str = "Milan",
    version: int = 3,
    vlek: bool = False,
    endorsement: EndorsementKey | None = None,
    fields: SnpReportFields | None = None,
    **changes: object,
) -> SnpEvidence:
    """A consistent, correctly signed report for `product` and its VCEK (or VLEK); `changes`
    alter report fields (before signing)."""
    pki = make_pki(product)
    tcb = default_tcb(product)
    family, model, stepping = CPUID[product]
    base = fields or SnpReportFields(
        version=version,
        current_tcb=tcb.raw,
        reported_tcb=tcb.raw,
        committed_tcb=tcb.raw,
        launch_tcb=tcb.raw,
        cpuid_family=family,
        cpuid_model=model,
        cpuid_stepping=stepping,
        signing_key=SigningKey.VLEK if vlek else SigningKey.VCEK,
        chip_id=bytes(range(64)) if product != "Turin" else bytes(range(1, 9)) + bytes(56),
        mask_chip_key=False,
    )
    report_fields = base.replace(**changes) if changes else base
    endorsement = endorsement or make_endorsement_key(
        pki, vlek=vlek, chip_id=report_fields.chip_id, tcb=tcb
    )
    raw = sign_report(encode_report(report_fields), endorsement.key)
    return SnpEvidence(raw, report_fields, pki, endorsement, vlek)
