"""Verify a SEV-SNP report: the ARK -> ASK -> VCEK (or ARK -> ASVK -> VLEK) chain to AMD's
pinned roots, the report's ECDSA signature, and the binding of the VCEK to the report.

Steps, in order (a step whose prerequisite failed is ``skipped``):

``ark``               the ARK equals the pinned ARK of the product (byte for byte, or the same
                      subject and public key), is self-signed (RSA-PSS, SHA-384) and valid at `at`
``ask``               the ARK signed the ASK (or, for a VLEK, the ASVK), valid at `at`
``vcek``              the ASK signed the VCEK (the ASVK the VLEK), a P-384 key valid at `at`, of
                      the kind (VCEK or VLEK) the report says signed it
``report_signature``  ECDSA P-384 over SHA-384 of the report's signed bytes (needs ``vcek``)
``vcek_binding``      the certificate's AMD extensions match the report: hwID = CHIP_ID (VCEK
                      only), the SPLs = REPORTED_TCB, productName = the product, and the report's
                      CPUID family is that product's (needs ``vcek``)

Every RSA-PSS signature must use SHA-384, MGF1 with SHA-384 and a 48-byte salt, as AMD's
certificates do. Bad evidence is reported as a failed step, never raised; only malformed input
(a naive `at`, an unknown product, a chain of the wrong length) raises `EvidenceError`.

The product (``Milan``, ``Genoa``, ``Turin``) is the `product` argument when given, else the
certificate's productName, else the report's CPUID family and model.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cache
from importlib import resources
from types import MappingProxyType

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import SignatureAlgorithmOID

from ppml.attestation.amd.report import (
    SigningKey,
    SnpReport,
    TcbLayout,
    TcbVersion,
    tcb_layout_for_product,
)
from ppml.attestation.cache import VerifiedCache
from ppml.attestation.steps import Step, StepRunner, VerificationReport
from ppml.attestation.x509_checks import (
    ca_problem,
    common_name,
    signer_problem,
    validity_problem,
)
from ppml.errors import EvidenceError

__all__ = [
    "PRODUCTS",
    "ChainCache",
    "amd_roots",
    "amd_signing_keys",
    "verify_report",
]

PRODUCTS = ("Milan", "Genoa", "Turin")

_AMD_OID = "1.3.6.1.4.1.3704.1"
OID_STRUCT_VERSION = x509.ObjectIdentifier(f"{_AMD_OID}.1")
OID_PRODUCT_NAME = x509.ObjectIdentifier(f"{_AMD_OID}.2")
OID_BL_SPL = x509.ObjectIdentifier(f"{_AMD_OID}.3.1")
OID_TEE_SPL = x509.ObjectIdentifier(f"{_AMD_OID}.3.2")
OID_SNP_SPL = x509.ObjectIdentifier(f"{_AMD_OID}.3.3")
OID_UCODE_SPL = x509.ObjectIdentifier(f"{_AMD_OID}.3.8")
OID_FMC_SPL = x509.ObjectIdentifier(f"{_AMD_OID}.3.9")
OID_HW_ID = x509.ObjectIdentifier(f"{_AMD_OID}.4")
OID_CSP_ID = x509.ObjectIdentifier(f"{_AMD_OID}.5")

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
_CHIP_ID_SIZES = (64, 8)  # Turin's hwID is the first 8 bytes of CHIP_ID
_MAX_EXTENSION_VALUE = 256

# Anything a certificate object can raise when a field is malformed or unsupported.
_CERT_ERRORS = (
    ValueError,
    TypeError,
    UnsupportedAlgorithm,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)


# -- pinned roots ------------------------------------------------------------------------------


def _load_pinned(prefix: str) -> Mapping[str, x509.Certificate]:
    folder = resources.files("ppml.attestation.amd").joinpath("roots")
    certs = {}
    for product in PRODUCTS:
        pem = folder.joinpath(f"{prefix}_{product.lower()}.pem").read_bytes()
        certs[product] = x509.load_pem_x509_certificate(pem)
    return MappingProxyType(certs)


@cache
def amd_roots() -> Mapping[str, x509.Certificate]:
    """AMD's root keys (ARK), one per product, from the certificates shipped with ppml."""
    return _load_pinned("ark")


@cache
def amd_signing_keys() -> Mapping[str, x509.Certificate]:
    """AMD's SEV signing keys (ASK), one per product. Not trust anchors: each is verified
    against its ARK like any other ASK."""
    return _load_pinned("ask")


# -- the chain cache ---------------------------------------------------------------------------


class ChainCache(VerifiedCache[tuple[bytes, bytes, bytes], bool]):
    """ARK/ASK/VCEK triples whose signatures verified, keyed by the exact DER bytes of the
    three certificates. A hit saves the three RSA verifications only: pinning, names, key
    types and validity at the requested time are checked on every call."""

    def __init__(self, max_entries: int = 64) -> None:
        super().__init__(max_entries)


# -- small helpers -----------------------------------------------------------------------------


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _check_validity(cert: x509.Certificate, at: datetime, what: str) -> str | None:
    problem = validity_problem(cert, at)
    return None if problem is None else f"{what} {problem}"


def _check_pss_signed(cert: x509.Certificate, issuer: x509.Certificate, what: str) -> str | None:
    """The issuer's RSA key signed `cert` with RSA-PSS, SHA-384, MGF1-SHA-384, salt 48."""
    if cert.signature_algorithm_oid != SignatureAlgorithmOID.RSASSA_PSS:
        return f"{what} signature algorithm is not RSASSA-PSS"
    if not isinstance(cert.signature_hash_algorithm, hashes.SHA384):
        return f"{what} signature hash is not SHA-384"
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        return f"{what} issuer key is not RSA"
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes, _PSS, hashes.SHA384())
    except InvalidSignature:
        return f"{what} signature does not verify"
    return None


def _check_ca(cert: x509.Certificate, what: str, cas_below: int) -> str | None:
    problem = ca_problem(cert, cas_below=cas_below)
    return None if problem is None else f"{what} {problem}"


def _read_tlv(data: bytes, tag: int, what: str) -> bytes:
    """The content of one DER element of the given tag that fills `data` exactly (short or
    one/two-byte long form lengths; this is all AMD's extensions need)."""
    if len(data) < 2 or data[0] != tag:
        raise EvidenceError(f"vcek_binding: {what} is not the expected DER type")
    length, start = data[1], 2
    if length & 0x80:
        count = length & 0x7F
        if count not in (1, 2) or len(data) < 2 + count:
            raise EvidenceError(f"vcek_binding: {what} has a bad DER length")
        length = int.from_bytes(data[2 : 2 + count], "big")
        start = 2 + count
        if length < 0x80 or (count == 2 and length < 0x100):
            raise EvidenceError(f"vcek_binding: {what} has a non-minimal DER length")
    if start + length != len(data):
        raise EvidenceError(f"vcek_binding: {what} has a bad DER length")
    return data[start:]


def _der_uint(data: bytes, what: str) -> int:
    content = _read_tlv(data, 0x02, what)
    if not content or len(content) > 2:
        raise EvidenceError(f"vcek_binding: {what} is not a small integer")
    if content[0] & 0x80 or (len(content) == 2 and content[0] == 0 and not content[1] & 0x80):
        raise EvidenceError(f"vcek_binding: {what} is negative or not minimally encoded")
    return int.from_bytes(content, "big")


def _extension_bytes(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bytes | None:
    try:
        value = cert.extensions.get_extension_for_oid(oid).value
    except x509.ExtensionNotFound:
        return None
    if not isinstance(value, x509.UnrecognizedExtension):
        raise EvidenceError(f"vcek_binding: extension {oid.dotted_string} has an unexpected type")
    if len(value.value) > _MAX_EXTENSION_VALUE:
        raise EvidenceError(f"vcek_binding: extension {oid.dotted_string} is too long")
    return value.value


def _product_name(cert: x509.Certificate) -> str | None:
    """The productName extension (``Milan-B0``), or None when absent."""
    data = _extension_bytes(cert, OID_PRODUCT_NAME)
    if data is None:
        return None
    content = _read_tlv(data, 0x16, "productName")  # IA5String
    if not content or any(b < 0x20 or b > 0x7E for b in content):
        raise EvidenceError("vcek_binding: productName is not printable ASCII")
    return content.decode("ascii")


def _hw_id(data: bytes) -> bytes:
    if len(data) in _CHIP_ID_SIZES:
        return data
    content = _read_tlv(data, 0x04, "hwID")  # tolerate a DER OCTET STRING wrapper
    if len(content) not in _CHIP_ID_SIZES:
        raise EvidenceError("vcek_binding: hwID has the wrong length")
    return content


def _product_of_cpuid(family: int, model: int) -> str | None:
    if family == 0x1A:
        return "Turin"
    if family == 0x19:
        if model >> 4 == 0:
            return "Milan"
        if model >> 4 in (0x1, 0xA):
            return "Genoa"
    return None


def _select_product(
    report: SnpReport, vcek: x509.Certificate, product: str | None
) -> tuple[str | None, str]:
    """(product, how it was found) or (None, why it could not be)."""
    if product is not None:
        return product, "given"
    try:
        name = _product_name(vcek)
    except (EvidenceError, *_CERT_ERRORS) as exc:
        return None, f"cannot read the certificate's productName: {exc}"
    if name is not None:
        prefix = name.split("-", 1)[0]
        if prefix in PRODUCTS:
            return prefix, "from the certificate's productName"
        return None, f"unknown productName {name!r}"
    if report.cpuid_family is not None and report.cpuid_model is not None:
        guess = _product_of_cpuid(report.cpuid_family, report.cpuid_model)
        if guess is not None:
            return guess, "from the report's CPUID"
    return None, "product unknown: give it, or use a certificate with a productName"


# -- the steps ---------------------------------------------------------------------------------


def _ark_step(
    ark: x509.Certificate,
    product: str,
    pinned: x509.Certificate,
    at: datetime,
    cached: bool,
) -> Step:
    if _der(ark) != _der(pinned):
        same_key = ark.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) == pinned.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if not same_key or ark.subject != pinned.subject:
            return Step.failed("ark", f"ARK is not the pinned ARK-{product}")
    if common_name(ark) != f"ARK-{product}":
        return Step.failed("ark", f"ARK subject does not name ARK-{product}")
    if ark.issuer != ark.subject:
        return Step.failed("ark", "ARK is not self-issued")
    if (problem := _check_ca(ark, "ARK", 1)) is not None:
        return Step.failed("ark", problem)
    if not cached and (problem := _check_pss_signed(ark, ark, "ARK self")) is not None:
        return Step.failed("ark", problem)
    if (problem := _check_validity(ark, at, "ARK")) is not None:
        return Step.failed("ark", problem)
    return Step.passed("ark", f"pinned ARK-{product}" + (" (cached)" if cached else ""))


def _ask_step(
    ask: x509.Certificate,
    ark: x509.Certificate,
    product: str,
    vlek: bool,
    at: datetime,
    cached: bool,
) -> Step:
    what = "ASVK" if vlek else "ASK"
    expected = f"SEV-VLEK-{product}" if vlek else f"SEV-{product}"
    if common_name(ask) != expected:
        return Step.failed("ask", f"{what} subject does not name {expected}")
    if ask.issuer != ark.subject:
        return Step.failed("ask", f"{what} issuer is not the ARK")
    if (problem := _check_ca(ask, what, 0)) is not None:
        return Step.failed("ask", problem)
    if not cached and (problem := _check_pss_signed(ask, ark, what)) is not None:
        return Step.failed("ask", problem)
    if (problem := _check_validity(ask, at, what)) is not None:
        return Step.failed("ask", problem)
    return Step.passed("ask", expected + (" (cached)" if cached else ""))


def _vcek_step(
    report: SnpReport,
    vcek: x509.Certificate,
    ask: x509.Certificate,
    vlek: bool,
    at: datetime,
    cached: bool,
) -> Step:
    what = "VLEK" if vlek else "VCEK"
    if report.signing_key is SigningKey.NONE:
        return Step.failed("vcek", "the report's signing_key says it is not signed")
    if (report.signing_key is SigningKey.VLEK) != vlek:
        return Step.failed(
            "vcek",
            f"the report says {report.signing_key.name} signed it, the certificate is a {what}",
        )
    if vcek.issuer != ask.subject:
        return Step.failed("vcek", f"{what} issuer is not the {'ASVK' if vlek else 'ASK'}")
    key = vcek.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        return Step.failed("vcek", f"{what} key is not ECDSA P-384")
    if (problem := signer_problem(vcek)) is not None:
        return Step.failed("vcek", f"{what} {problem}")
    if not cached and (problem := _check_pss_signed(vcek, ask, what)) is not None:
        return Step.failed("vcek", problem)
    if (problem := _check_validity(vcek, at, what)) is not None:
        return Step.failed("vcek", problem)
    return Step.passed("vcek", what + (" (cached)" if cached else ""))


def _signature_step(report: SnpReport, vcek: x509.Certificate) -> Step:
    key = vcek.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):  # checked by the vcek step already
        return Step.failed("report_signature", "signing key is not ECDSA")
    if report.signature_r == 0 or report.signature_s == 0:
        return Step.failed("report_signature", "signature is zero")
    signature = encode_dss_signature(report.signature_r, report.signature_s)
    try:
        key.verify(signature, report.signed_bytes, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        return Step.failed("report_signature", "report signature does not verify")
    return Step.passed("report_signature")


def _binding_step(report: SnpReport, vcek: x509.Certificate, product: str, vlek: bool) -> Step:
    what = "VLEK" if vlek else "VCEK"
    layout = tcb_layout_for_product(product)

    if report.cpuid_family is not None and report.cpuid_model is not None:
        from_cpuid = _product_of_cpuid(report.cpuid_family, report.cpuid_model)
        if from_cpuid != product:
            return Step.failed(
                "vcek_binding",
                f"report CPUID family 0x{report.cpuid_family:02X} model "
                f"0x{report.cpuid_model:02X} is not {product}",
            )

    name = _product_name(vcek)
    if name is None:
        return Step.failed("vcek_binding", f"{what} has no productName extension")
    if name.split("-", 1)[0] != product:
        return Step.failed("vcek_binding", f"{what} productName {name!r} is not {product}")

    if not vlek:
        data = _extension_bytes(vcek, OID_HW_ID)
        if data is None:
            return Step.failed("vcek_binding", "VCEK has no hwID extension")
        hw_id = _hw_id(data)
        if report.chip_id_masked:
            return Step.failed("vcek_binding", "report chip_id is masked: cannot bind a VCEK")
        if len(hw_id) == 8 and layout is not TcbLayout.TURIN:
            return Step.failed("vcek_binding", "VCEK hwID is 8 bytes, expected 64")
        expected = hw_id + bytes(64 - len(hw_id))
        if not hmac.compare_digest(expected, report.chip_id):
            return Step.failed("vcek_binding", "VCEK hwID does not match report chip_id")

    spl_oids = {
        "bootloader": OID_BL_SPL,
        "tee": OID_TEE_SPL,
        "snp": OID_SNP_SPL,
        "microcode": OID_UCODE_SPL,
    }
    if layout is TcbLayout.TURIN:
        spl_oids["fmc"] = OID_FMC_SPL
    spls: dict[str, int] = {}
    for component, oid in spl_oids.items():
        data = _extension_bytes(vcek, oid)
        if data is None:
            return Step.failed("vcek_binding", f"{what} has no {component} SPL extension")
        value = _der_uint(data, f"{component} SPL")
        if value > 0xFF:
            return Step.failed("vcek_binding", f"{what} {component} SPL out of range")
        spls[component] = value
    expected_tcb = TcbVersion.build(layout=layout, **spls)
    reported = report.decode_tcb(report.reported_tcb, layout)
    if reported.raw != expected_tcb.raw:
        for component, value in spls.items():
            if getattr(reported, component) != value:
                return Step.failed(
                    "vcek_binding",
                    f"report reported_tcb.{component} {getattr(reported, component)} "
                    f"!= {what} SPL {value}",
                )
        return Step.failed("vcek_binding", "report reported_tcb has non-zero reserved bytes")
    return Step.passed("vcek_binding", f"{what} {name}")


# -- the entry point ---------------------------------------------------------------------------


def verify_report(
    report: SnpReport,
    *,
    vcek: x509.Certificate,
    ask_ark: Sequence[x509.Certificate] | None = None,
    at: datetime,
    product: str | None = None,
    cache: ChainCache | None = None,
    roots: Mapping[str, x509.Certificate] | None = None,
    signing_keys: Mapping[str, x509.Certificate] | None = None,
) -> VerificationReport:
    """Verify `report` against `vcek` (a VCEK or a VLEK) and its chain to a pinned ARK.

    `ask_ark` is ``(ASK, ARK)`` — ``(ASVK, ARK)`` for a VLEK — in the order AMD's KDS
    ``cert_chain`` gives them; when absent, the pinned ARK and ASK of the product are used
    (there is no pinned ASVK, so a VLEK needs `ask_ark`). `roots` replaces the pinned ARKs and
    `signing_keys` the pinned ASKs (tests pin their own). `cache` remembers verified chains.
    """
    if not isinstance(report, SnpReport):
        raise EvidenceError("verify: report must be an SnpReport")
    if not isinstance(vcek, x509.Certificate):
        raise EvidenceError("verify: vcek must be an x509.Certificate")
    if not isinstance(at, datetime) or at.tzinfo is None or at.utcoffset() is None:
        raise EvidenceError("verify: at must be a timezone-aware datetime")
    pinned_roots = amd_roots() if roots is None else roots
    if product is not None and product not in pinned_roots:
        raise EvidenceError(f"verify: unknown product {product!r}")
    ask: x509.Certificate | None
    ark: x509.Certificate | None
    if ask_ark is not None:
        if len(ask_ark) != 2 or not all(isinstance(c, x509.Certificate) for c in ask_ark):
            raise EvidenceError("verify: ask_ark must be two certificates, (ASK, ARK)")
        ask, ark = ask_ark[0], ask_ark[1]
    else:
        ask = ark = None

    vlek = common_name(vcek) == "SEV-VLEK"
    chosen, how = _select_product(report, vcek, product)
    if chosen is not None and chosen not in pinned_roots:
        chosen, how = None, f"no pinned ARK for {chosen}"
    if chosen is not None and ark is None:
        ark = pinned_roots[chosen]
        if not vlek:
            ask = (amd_signing_keys() if signing_keys is None else signing_keys).get(chosen)

    cache_key: tuple[bytes, bytes, bytes] | None = None
    cached = False
    if cache is not None and ark is not None and ask is not None:
        cache_key = (_der(ark), _der(ask), _der(vcek))
        cached = cache.get(cache_key) is not None

    steps = StepRunner(malformed=_CERT_ERRORS, what="certificate")

    def ark_step() -> Step:
        if chosen is None or ark is None:
            return Step.failed("ark", how)
        return _ark_step(ark, chosen, pinned_roots[chosen], at, cached)

    def ask_step() -> Step:
        if ask is None or ark is None or chosen is None:
            return Step.failed("ask", "no ASVK given for a VLEK (pass ask_ark)")
        return _ask_step(ask, ark, chosen, vlek, at, cached)

    def vcek_step() -> Step:
        assert ask is not None
        return _vcek_step(report, vcek, ask, vlek, at, cached)

    def binding_step() -> Step:
        assert chosen is not None
        return _binding_step(report, vcek, chosen, vlek)

    steps.run("ark", ark_step)
    steps.run("ask", ask_step, needs=("ark",))
    steps.run("vcek", vcek_step, needs=("ask",))
    if cache is not None and cache_key is not None and not cached and steps.passed("vcek"):
        cache.put(cache_key, True)
    steps.run("report_signature", lambda: _signature_step(report, vcek), needs=("vcek",))
    steps.run("vcek_binding", binding_step, needs=("vcek",))
    return steps.report()
