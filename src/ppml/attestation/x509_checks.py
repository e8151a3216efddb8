"""The certificate and CRL rules every chain in ppml is held to: Intel PCK chains, the TCB-info,
QE-identity and PCK-CRL issuer chains, and AMD ARK/ASK/VCEK chains alike.

- validity: ``notBefore <= at <= notAfter`` at the verification time;
- no critical extension but basic constraints and key usage (anything else fails closed);
- an issuer is a CA (basic constraints ``cA``), its path length allows the CAs below it, and a
  key usage, when present, allows certificate signing;
- a signer (an end-entity that signs evidence or documents) is not a CA, and a key usage,
  when present, allows digital signatures (a CRL issuer's, CRL signing);
- a CRL is issued (name and ECDSA P-256 SHA-256 signature) by its issuer, has a nextUpdate,
  and is current at the verification time.

Each check returns why it fails (a short reason without the certificate's name, which the
caller puts in front) or None.
"""

from __future__ import annotations

import datetime as _dt
from typing import Final, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID, SignatureAlgorithmOID

__all__ = [
    "HANDLED_CRITICAL",
    "ca_problem",
    "common_name",
    "crl_problem",
    "crl_time_problem",
    "is_revoked",
    "p256_key",
    "signer_problem",
    "validity_problem",
]

#: The critical extensions the checks here understand.
HANDLED_CRITICAL: Final = frozenset({ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE})


def common_name(cert: x509.Certificate) -> str:
    """The subject's one common name, or "" when it has none, several, or not a string."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if len(names) == 1 else ""
    return value if isinstance(value, str) else ""


def validity_problem(cert: x509.Certificate, at: _dt.datetime) -> str | None:
    if at < cert.not_valid_before_utc:
        return f"not valid before {cert.not_valid_before_utc.isoformat()} (not yet valid)"
    if at > cert.not_valid_after_utc:
        return f"expired at {cert.not_valid_after_utc.isoformat()}"
    return None


def _critical_problem(cert: x509.Certificate) -> str | None:
    for ext in cert.extensions:
        if ext.critical and ext.oid not in HANDLED_CRITICAL:
            return f"unknown critical extension {ext.oid.dotted_string}"
    return None


def _extension(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> object | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def ca_problem(cert: x509.Certificate, *, cas_below: int = 0) -> str | None:
    """Why `cert` may not issue certificates with `cas_below` intermediate CAs under it."""
    if (problem := _critical_problem(cert)) is not None:
        return problem
    bc = _extension(cert, x509.BasicConstraints)
    if not isinstance(bc, x509.BasicConstraints):
        return "is not a CA (no basicConstraints)"
    if not bc.ca:
        return "is not a CA certificate"
    if bc.path_length is not None and bc.path_length < cas_below:
        return f"path length constraint {bc.path_length} is too small"
    ku = _extension(cert, x509.KeyUsage)
    if isinstance(ku, x509.KeyUsage) and not ku.key_cert_sign:
        return "key usage does not allow certificate signing"
    return None


def signer_problem(cert: x509.Certificate, *, signs: Literal["data", "crl"] = "data") -> str | None:
    """Why `cert` may not sign data (an end-entity) or CRLs (a CA's CRL signing key)."""
    if (problem := _critical_problem(cert)) is not None:
        return problem
    bc = _extension(cert, x509.BasicConstraints)
    ku = _extension(cert, x509.KeyUsage)
    if signs == "crl":
        if not isinstance(bc, x509.BasicConstraints) or not bc.ca:
            return "is not a CA: it cannot issue a CRL"
        if isinstance(ku, x509.KeyUsage) and not ku.crl_sign:
            return "key usage does not allow CRL signing"
        return None
    if isinstance(bc, x509.BasicConstraints) and bc.ca:
        return "is a CA certificate, expected an end-entity"
    if isinstance(ku, x509.KeyUsage) and not ku.digital_signature:
        return "key usage does not allow digital signatures"
    return None


def p256_key(cert: x509.Certificate) -> ec.EllipticCurvePublicKey | None:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        return None
    return key


def crl_problem(
    crl: x509.CertificateRevocationList,
    issuer: x509.Certificate,
    issuer_name: str,
    at: _dt.datetime | None,
) -> str | None:
    """Why `crl` is not a CRL of `issuer` (named `issuer_name` in the reason) current at `at`
    (None: its time is checked by the caller, who may accept an outdated one). The issuer must
    be a CA whose key usage, when given, allows CRL signing."""
    if crl.issuer != issuer.subject:
        dn = issuer.subject.rfc4514_string()[:80]
        return f"issuer is not the {issuer_name}: it is not issued by {dn!r}"
    if (problem := signer_problem(issuer, signs="crl")) is not None:
        return f"the {issuer_name} {problem}"
    if crl.signature_algorithm_oid != SignatureAlgorithmOID.ECDSA_WITH_SHA256:
        return "signature algorithm is not ECDSA with SHA-256"
    key = p256_key(issuer)
    if key is None:
        return f"the {issuer_name} does not hold an ECDSA P-256 key"
    try:
        valid = crl.is_signature_valid(key)
    except (InvalidSignature, TypeError, ValueError):
        valid = False
    if not valid:
        return f"signature does not verify with the {issuer_name} key"
    if at is None:
        return None
    return crl_time_problem(crl, at)


def crl_time_problem(crl: x509.CertificateRevocationList, at: _dt.datetime) -> str | None:
    next_update = crl.next_update_utc
    if next_update is None:
        return "has no nextUpdate"
    if at < crl.last_update_utc:
        return f"not valid before {crl.last_update_utc.isoformat()}"
    if at > next_update:
        return f"expired at {next_update.isoformat()}"
    return None


def is_revoked(crl: x509.CertificateRevocationList, cert: x509.Certificate) -> bool:
    return crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
