"""Verify an Intel SGX or TDX ECDSA quote: its PCK certificate chain to a pinned root, the CRLs
when given, the QE report signed by the PCK key, the binding of the attestation key into the QE
report, and the quote signed by the attestation key.

Steps, in order, each depending on the one before it (a step after a failure is ``skipped``)::

    pck_chain -> qe_report_signature -> qe_report_data_binding -> quote_signature
    pck_chain -> pck_crl, root_crl      (``not_checked`` when no CRL is given)

Root pinning: the chain in the quote must end in a certificate byte for byte equal (DER) to the
pinned root. Matching by public key alone would also accept a root copy whose other bytes were
altered; every byte of the evidence is either authenticated or refused. A root re-issued by
Intel (even with the same key) is therefore a new pin, shipped with a new release.

TCB appraisal (TCB info, QE identity) is not done here: that is collateral for the caller.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache, partial
from importlib import resources
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import SignatureAlgorithmOID

from ppml.attestation.cache import VerifiedCache, cache_key, validity_window
from ppml.attestation.intel.pck import parse_pck_extensions
from ppml.attestation.intel.quote import SgxQuote, TdxQuote, parse_quote
from ppml.attestation.steps import Step, StepFailed, StepRunner, StepStatus, VerificationReport
from ppml.attestation.x509_checks import (
    ca_problem,
    common_name,
    crl_problem,
    is_revoked,
    p256_key,
    signer_problem,
    validity_problem,
)
from ppml.errors import EvidenceError

__all__ = [
    "INTEL_SGX_ROOT_CA_SHA256",
    "STEP_NAMES",
    "ChainCache",
    "intel_sgx_root",
    "load_crl",
    "verify_quote",
]

#: SHA-256 of the DER of the shipped Intel SGX Root CA certificate.
INTEL_SGX_ROOT_CA_SHA256: Final = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"

STEP_NAMES: Final = (
    "pck_chain",
    "pck_crl",
    "root_crl",
    "qe_report_signature",
    "qe_report_data_binding",
    "quote_signature",
)

_PCK_LEAF_CN: Final = "Intel SGX PCK Certificate"
_PCK_CA_CNS: Final = frozenset({"Intel SGX PCK Platform CA", "Intel SGX PCK Processor CA"})
_ECDSA_SHA256: Final = ec.ECDSA(hashes.SHA256())

# What cryptography raises on malformed certificates, CRLs or keys; a step reports it as failed.
_CRYPTO_ERRORS: Final = (
    ValueError,
    TypeError,
    InvalidSignature,
    UnsupportedAlgorithm,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    CryptographyDeprecationWarning,
)


@lru_cache(maxsize=1)
def intel_sgx_root() -> x509.Certificate:
    """The Intel SGX Root CA shipped with ppml, the trust anchor of SGX and TDX quotes. Its
    fingerprint is checked against `INTEL_SGX_ROOT_CA_SHA256` on load."""
    pem = resources.files("ppml.attestation").joinpath("roots/intel_sgx_root_ca.pem").read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    if cert.fingerprint(hashes.SHA256()).hex() != INTEL_SGX_ROOT_CA_SHA256:
        raise EvidenceError("Intel SGX root: the shipped certificate has the wrong fingerprint")
    return cert


def load_crl(data: bytes) -> x509.CertificateRevocationList:
    """Load a CRL given as DER or PEM; `EvidenceError` if it is neither."""
    if not isinstance(data, bytes):
        raise EvidenceError("CRL: must be bytes")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except (ValueError, x509.InvalidVersion) as exc:  # a version CRLs do not have
        raise EvidenceError("CRL: not a valid DER or PEM certificate revocation list") from exc


def _p256_key(cert: x509.Certificate, name: str) -> ec.EllipticCurvePublicKey:
    key = p256_key(cert)
    if key is None:
        raise StepFailed(f"{name}: public key is not ECDSA P-256")
    return key


def _verify_signed_by(
    child: x509.Certificate, child_name: str, issuer: x509.Certificate, issuer_name: str
) -> None:
    if child.issuer != issuer.subject:
        raise StepFailed(f"{child_name}: issuer name is not the subject of the {issuer_name}")
    if child.signature_algorithm_oid != SignatureAlgorithmOID.ECDSA_WITH_SHA256:
        raise StepFailed(f"{child_name}: signature algorithm is not ECDSA with SHA-256")
    key = _p256_key(issuer, issuer_name)
    try:
        key.verify(child.signature, child.tbs_certificate_bytes, _ECDSA_SHA256)
    except InvalidSignature:
        raise StepFailed(
            f"{child_name}: signature does not verify with the {issuer_name} key"
        ) from None


def _require(name: str, problem: str | None) -> None:
    if problem is not None:
        raise StepFailed(f"{name}: {problem}")


def _check_chain(chain: tuple[x509.Certificate, ...], root: x509.Certificate, at: datetime) -> str:
    if len(chain) != 3:
        raise StepFailed(f"chain has {len(chain)} certificates, expected 3 (PCK, CA, root)")
    leaf, ca, given_root = chain
    if given_root.public_bytes(Encoding.DER) != root.public_bytes(Encoding.DER):
        raise StepFailed("chain does not end in the pinned root certificate")
    if common_name(leaf) != _PCK_LEAF_CN:
        raise StepFailed(f"PCK certificate: common name is not {_PCK_LEAF_CN!r}")
    ca_cn = common_name(ca)
    if ca_cn not in _PCK_CA_CNS:
        raise StepFailed("PCK CA: common name is not an Intel SGX PCK Platform or Processor CA")
    _verify_signed_by(root, "root CA", root, "root CA")
    _verify_signed_by(ca, "PCK CA", root, "root CA")
    _verify_signed_by(leaf, "PCK certificate", ca, "PCK CA")
    for cert, name in ((leaf, "PCK certificate"), (ca, "PCK CA"), (root, "root CA")):
        _require(name, validity_problem(cert, at))
    _require("root CA", ca_problem(root, cas_below=1))
    _require("PCK CA", ca_problem(ca, cas_below=0))
    _require("PCK certificate", signer_problem(leaf))
    _p256_key(leaf, "PCK certificate")
    parse_pck_extensions(leaf)
    return ca_cn


def _check_crl(
    crl: x509.CertificateRevocationList,
    name: str,
    issuer: x509.Certificate,
    issuer_name: str,
    subject: x509.Certificate,
    subject_name: str,
    at: datetime,
) -> None:
    _require(name, crl_problem(crl, issuer, issuer_name, at))
    if is_revoked(crl, subject):
        raise StepFailed(f"{name}: the {subject_name} is revoked")


def _raw_signature(raw: bytes) -> bytes:
    return encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:64], "big"))


class ChainCache(VerifiedCache[bytes, tuple[Step, Step, Step]]):
    """Verified PCK chain results, so that verifying many quotes from one platform does the
    chain and CRL work once.

    The key is SHA-256 over the exact PEM chain bytes, the pinned root's DER and each CRL's DER
    (or its absence); an entry's window is the intersection of all certificates' and CRLs'
    validity, so a hit is exactly what re-running would give (`VerifiedCache`).
    """


@dataclass(frozen=True, slots=True)
class _Chain:
    """What the chain and CRL steps depend on (besides the time)."""

    quote: SgxQuote | TdxQuote
    root: x509.Certificate
    pck_crl: x509.CertificateRevocationList | None
    root_crl: x509.CertificateRevocationList | None

    def cache_key(self) -> bytes:
        return cache_key(
            b"ppml-intel-pck-chain/1",
            self.quote.pck_chain_pem,
            self.root.public_bytes(Encoding.DER),
            self.pck_crl.public_bytes(Encoding.DER) if self.pck_crl is not None else None,
            self.root_crl.public_bytes(Encoding.DER) if self.root_crl is not None else None,
        )

    def window(self) -> tuple[datetime, datetime]:
        certs = (self.quote.pck_chain[0], self.quote.pck_chain[1], self.root)
        return validity_window(certs, (self.pck_crl, self.root_crl))

    def steps(self, at: datetime) -> tuple[Step, Step, Step]:
        chain, root = self.quote.pck_chain, self.root
        run = StepRunner(malformed=_CRYPTO_ERRORS)

        def chain_check() -> Step:
            ca_cn = _check_chain(chain, root, at)
            return Step.passed("pck_chain", f"PCK certificate <- {ca_cn} <- pinned root")

        run.run("pck_chain", chain_check)
        leaf, ca = chain[0], chain[1]
        for name, crl, absent, check in (
            (
                "pck_crl",
                self.pck_crl,
                "no PCK CRL given",
                lambda c: _check_crl(c, "PCK CRL", ca, "PCK CA", leaf, "PCK certificate", at),
            ),
            (
                "root_crl",
                self.root_crl,
                "no root CA CRL given",
                lambda c: _check_crl(c, "root CA CRL", root, "root CA", ca, "PCK CA", at),
            ),
        ):
            if crl is None and run.passed("pck_chain"):
                run.add(Step.not_checked(name, absent))
            else:
                run.run(name, partial(check, crl), needs=("pck_chain",))
        chain_step, pck_step, root_step = run.steps
        return chain_step, pck_step, root_step

    def verified(self, at: datetime, cache: ChainCache | None) -> tuple[Step, Step, Step]:
        """The steps at `at`, from `cache` when it holds them for that time."""
        if cache is None:
            return self.steps(at)
        key = self.cache_key()
        hit = cache.get(key, at)
        if hit is not None:
            return hit
        steps = self.steps(at)
        if all(s.status in (StepStatus.PASSED, StepStatus.NOT_CHECKED) for s in steps):
            cache.put(key, steps, self.window())
        return steps


def _check_inputs(
    quote: object,
    root: object,
    at: object,
    pck_crl: object,
    root_crl: object,
) -> SgxQuote | TdxQuote:
    if isinstance(quote, bytes | bytearray | memoryview):
        quote = parse_quote(bytes(quote))
    if not isinstance(quote, SgxQuote | TdxQuote):
        raise EvidenceError("verify quote: quote must be an SgxQuote, a TdxQuote or bytes")
    if not isinstance(root, x509.Certificate):
        raise EvidenceError("verify quote: root must be an x509 certificate")
    if not isinstance(at, datetime) or at.tzinfo is None or at.utcoffset() is None:
        raise EvidenceError("verify quote: at must be a timezone-aware datetime")
    for name, crl in (("pck_crl", pck_crl), ("root_crl", root_crl)):
        if crl is not None and not isinstance(crl, x509.CertificateRevocationList):
            raise EvidenceError(f"verify quote: {name} must be a certificate revocation list")
    return quote


def verify_quote(
    quote: SgxQuote | TdxQuote | bytes,
    *,
    root: x509.Certificate,
    at: datetime,
    pck_crl: x509.CertificateRevocationList | None = None,
    root_crl: x509.CertificateRevocationList | None = None,
    cache: ChainCache | None = None,
) -> VerificationReport:
    """Verify a parsed quote (or quote bytes, parsed first) at time `at` against the pinned
    `root`, and report every step. Bad evidence is reported, never raised; only malformed input
    (bytes that do not parse, arguments of the wrong type, a naive `at`) raises
    `EvidenceError`. The quote and QE report signatures are verified on every call; `cache`
    only spares the chain and CRL work."""
    q = _check_inputs(quote, root, at, pck_crl, root_crl)
    run = StepRunner(malformed=_CRYPTO_ERRORS)
    run.extend(_Chain(q, root, pck_crl, root_crl).verified(at, cache))

    def qe_signature() -> None:
        key = _p256_key(q.pck_chain[0], "PCK certificate")
        try:
            key.verify(_raw_signature(q.qe_report_signature), q.qe_report_bytes, _ECDSA_SHA256)
        except InvalidSignature:
            raise StepFailed("QE report signature does not verify with the PCK key") from None

    def binding() -> None:
        expected = hashlib.sha256(q.attestation_key + q.qe_auth_data).digest()
        data = q.qe_report.report_data
        if not hmac.compare_digest(data[:32], expected):
            raise StepFailed("QE report data[0:32] is not SHA-256(attestation key || QE auth data)")
        if not hmac.compare_digest(data[32:], bytes(32)):
            raise StepFailed("QE report data[32:64] is not zero")

    def quote_signature() -> None:
        try:
            key = ec.EllipticCurvePublicKey.from_encoded_point(
                ec.SECP256R1(), b"\x04" + q.attestation_key
            )
        except ValueError:
            raise StepFailed("attestation key is not a P-256 point") from None
        try:
            key.verify(_raw_signature(q.signature), q.signed_bytes, _ECDSA_SHA256)
        except InvalidSignature:
            raise StepFailed("quote signature does not verify with the attestation key") from None

    run.run("qe_report_signature", qe_signature, needs=("pck_chain",))
    run.run("qe_report_data_binding", binding, needs=("qe_report_signature",))
    run.run("quote_signature", quote_signature, needs=("qe_report_data_binding",))
    return run.report()
