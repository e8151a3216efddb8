"""The workspace's public-key material: a small CA, TLS server and client certificates, the
PKCS12 stores Spark's JVM reads, and the SGX enclave signing key."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ppml.workspace.hosts import DEFAULT_HOSTS, normalize_hosts, parse_host

__all__ = [
    "CA_VALIDITY",
    "DEFAULT_HOSTS",
    "FLINK_UNIT",
    "KEYSTORE_ALIAS",
    "LEAF_VALIDITY",
    "SERVING_CLIENT_UNIT",
    "TRUSTSTORE_ALIAS",
    "IssuedCert",
    "certificate_facts",
    "enclave_signing_key",
    "encrypted_key_pem",
    "issue_flink",
    "issue_leaf",
    "issue_serving_client",
    "keystore_p12",
    "mrsigner",
    "new_ca",
    "normalize_hosts",
    "private_key_pem",
    "truststore_p12",
]

CA_VALIDITY = dt.timedelta(days=3652)
LEAF_VALIDITY = dt.timedelta(days=731)
_BACKDATE = dt.timedelta(minutes=5)  # tolerate small clock skew between machines
KEYSTORE_ALIAS = "ppml-server"
TRUSTSTORE_ALIAS = "ppml-ca"


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in (*DEFAULT_HOSTS, *hosts):
        parsed = parse_host(host)
        if isinstance(parsed, str):
            names.append(x509.DNSName(parsed))
        else:
            names.append(x509.IPAddress(parsed))
    return x509.SubjectAlternativeName(names)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ppml workspace"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


@dataclass(frozen=True, slots=True)
class IssuedCert:
    """A private key and its certificate."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def __repr__(self) -> str:
        return f"IssuedCert(subject={self.cert.subject.rfc4514_string()!r}, key=<hidden>)"


def new_ca(now: dt.datetime, common_name: str = "ppml workspace CA") -> IssuedCert:
    """A self-signed ECDSA P-256 CA, CA:true with path length 0, valid for ten years."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)
        .sign(key, hashes.SHA256())
    )
    return IssuedCert(key, cert)


def issue_leaf(
    ca: IssuedCert, kind: Literal["server", "client"], hosts: Sequence[str], now: dt.datetime
) -> IssuedCert:
    """An ECDSA P-256 end-entity certificate for TLS servers or clients, valid for two years."""
    usage = ExtendedKeyUsageOID.SERVER_AUTH if kind == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    return _issue(ca, _name(f"ppml {kind}"), [usage], now, LEAF_VALIDITY, _san(hosts))


SERVING_CLIENT_UNIT = "ppml serving client"
FLINK_UNIT = "ppml flink"


def issue_flink(
    ca: IssuedCert, role: Literal["node", "client"], hosts: Sequence[str], now: dt.datetime
) -> IssuedCert:
    """An ECDSA P-256 certificate for one Flink cluster (organizational unit "ppml flink"): a
    node's (JobManager and TaskManagers, which are TLS servers and clients to each other: both
    usages, `hosts` as names) or a job client's (client authentication only)."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ppml workspace"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, FLINK_UNIT),
            x509.NameAttribute(NameOID.COMMON_NAME, f"flink {role}"),
        ]
    )
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role == "node":
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    san = _san(hosts) if role == "node" else None
    return _issue(ca, subject, usages, now, LEAF_VALIDITY, san)


def issue_serving_client(
    ca: IssuedCert, name: str, now: dt.datetime, validity: dt.timedelta
) -> IssuedCert:
    """An ECDSA P-256 client certificate for one client of the serving front ends: common name
    `name`, organizational unit "ppml serving client", client authentication only."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ppml workspace"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, SERVING_CLIENT_UNIT),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    return _issue(ca, subject, [ExtendedKeyUsageOID.CLIENT_AUTH], now, validity, None)


def _issue(
    ca: IssuedCert,
    subject: x509.Name,
    usages: Sequence[x509.ObjectIdentifier],
    now: dt.datetime,
    validity: dt.timedelta,
    san: x509.SubjectAlternativeName | None,
) -> IssuedCert:
    """An end-entity certificate with a new P-256 key, signed by `ca`, never outliving it."""
    key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + validity, ca.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    cert = (
        builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return IssuedCert(key, cert)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS8 PEM (for services such as Redis that cannot take a password)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def encrypted_key_pem(key: ec.EllipticCurvePrivateKey, password: str) -> bytes:
    """PKCS8 PEM encrypted under `password`."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password.encode()),
    )


def _p12_encryption(password: str) -> serialization.KeySerializationEncryption:
    # PBES2 (PBKDF2-SHA256, AES-256-CBC) with an HMAC-SHA256 MAC: what JDK 12+ writes by default.
    return (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(100_000)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(password.encode())
    )


def keystore_p12(server: IssuedCert, ca_cert: x509.Certificate, password: str) -> bytes:
    """A PKCS12 key store: the server key with its chain, under alias `KEYSTORE_ALIAS`."""
    return pkcs12.serialize_key_and_certificates(
        KEYSTORE_ALIAS.encode(), server.key, server.cert, [ca_cert], _p12_encryption(password)
    )


def truststore_p12(ca_cert: x509.Certificate, password: str) -> bytes:
    """A PKCS12 trust store holding the CA as a trusted certificate entry Java recognizes."""
    entry = pkcs12.PKCS12Certificate(ca_cert, TRUSTSTORE_ALIAS.encode())
    return pkcs12.serialize_java_truststore([entry], _p12_encryption(password))


def enclave_signing_key() -> tuple[rsa.RSAPrivateKey, bytes]:
    """An SGX enclave signing key (RSA-3072, e=3, as SGX requires) and its PEM."""
    key = rsa.generate_private_key(public_exponent=3, key_size=3072)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return key, pem


def mrsigner(public_key: rsa.RSAPublicKey) -> str:
    """SGX MRSIGNER of an enclave signing key: SHA-256 of the modulus, little-endian (hex)."""
    n = public_key.public_numbers().n
    return hashlib.sha256(n.to_bytes(384, "little")).hexdigest()


def certificate_facts(cert: x509.Certificate) -> dict[str, Any]:
    """Public facts about a certificate, for `Workspace.describe`."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = [str(v) for v in san.get_values_for_type(x509.DNSName)] + [
            str(v) for v in san.get_values_for_type(x509.IPAddress)
        ]
    except x509.ExtensionNotFound:
        sans = []
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "sha256": cert.fingerprint(hashes.SHA256()).hex(),
        "sans": sans,
    }
