"""The one set of certificate and CRL rules, and that every chain is held to it: the collateral's
issuer chains and AMD's VCEK chain refuse an unknown critical extension as the PCK chain does."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from tests.support.evidence.snp import make_evidence

from ppml.attestation.amd.report import parse_report
from ppml.attestation.amd.verify import verify_report
from ppml.attestation.intel.collateral import verify_chain
from ppml.attestation.steps import StepStatus
from ppml.attestation.x509_checks import (
    ca_problem,
    crl_problem,
    signer_problem,
    validity_problem,
)
from ppml.errors import EvidenceError

AT = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)
START = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
END = dt.datetime(2040, 1, 1, tzinfo=dt.UTC)
UNKNOWN = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00")
ROOT_KEY = ec.generate_private_key(ec.SECP256R1())
LEAF_KEY = ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)])


def cert(
    cn: str,
    *,
    ca: bool | None,
    path_length: int | None = None,
    usage: str | None = None,
    critical_unknown: bool = False,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None = None,
    key: ec.EllipticCurvePrivateKey = LEAF_KEY,
) -> x509.Certificate:
    issuer_cn, issuer_key = issuer if issuer is not None else (cn, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(issuer_cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(START)
        .not_valid_after(END)
    )
    if ca is not None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True
        )
    if usage is not None:
        flags = dict.fromkeys(
            (
                "digital_signature",
                "content_commitment",
                "key_encipherment",
                "data_encipherment",
                "key_agreement",
                "key_cert_sign",
                "crl_sign",
            ),
            False,
        )
        flags[usage] = True
        builder = builder.add_extension(
            x509.KeyUsage(**flags, encipher_only=False, decipher_only=False), critical=True
        )
    if critical_unknown:
        builder = builder.add_extension(UNKNOWN, critical=True)
    return builder.sign(issuer_key, hashes.SHA256())


def test_issuers() -> None:
    assert ca_problem(cert("ca", ca=True, usage="key_cert_sign")) is None
    assert "unknown critical extension" in str(
        ca_problem(cert("ca", ca=True, critical_unknown=True))
    )
    assert "not a CA" in str(ca_problem(cert("leaf", ca=False)))
    assert "not a CA" in str(ca_problem(cert("none", ca=None)))
    assert "path length" in str(ca_problem(cert("ca", ca=True, path_length=0), cas_below=1))
    assert ca_problem(cert("ca", ca=True, path_length=1), cas_below=1) is None
    assert "certificate signing" in str(ca_problem(cert("ca", ca=True, usage="crl_sign")))


def test_signers() -> None:
    assert signer_problem(cert("leaf", ca=False, usage="digital_signature")) is None
    assert signer_problem(cert("leaf", ca=None)) is None
    assert "end-entity" in str(signer_problem(cert("ca", ca=True)))
    assert "digital signatures" in str(signer_problem(cert("leaf", ca=False, usage="crl_sign")))
    assert "unknown critical" in str(signer_problem(cert("leaf", ca=False, critical_unknown=True)))
    assert signer_problem(cert("ca", ca=True, usage="crl_sign"), signs="crl") is None
    assert "CRL signing" in str(
        signer_problem(cert("ca", ca=True, usage="key_cert_sign"), signs="crl")
    )
    assert "not a CA" in str(signer_problem(cert("leaf", ca=False), signs="crl"))


def test_validity() -> None:
    c = cert("leaf", ca=False)
    assert validity_problem(c, AT) is None
    assert validity_problem(c, START) is None and validity_problem(c, END) is None
    assert "not yet valid" in str(validity_problem(c, START - dt.timedelta(seconds=1)))
    assert "expired" in str(validity_problem(c, END + dt.timedelta(seconds=1)))


def test_crls() -> None:
    issuer = cert("ca", ca=True, key=ROOT_KEY)

    def crl(
        key: ec.EllipticCurvePrivateKey = ROOT_KEY, algorithm: hashes.HashAlgorithm | None = None
    ) -> x509.CertificateRevocationList:
        return (
            x509.CertificateRevocationListBuilder()
            .issuer_name(_name("ca"))
            .last_update(START)
            .next_update(AT + dt.timedelta(days=1))
            .sign(key, algorithm or hashes.SHA256())
        )

    assert crl_problem(crl(), issuer, "CA", AT) is None
    assert "expired" in str(crl_problem(crl(), issuer, "CA", END))
    assert crl_problem(crl(), issuer, "CA", None) is None  # time left to the caller
    assert "does not verify" in str(crl_problem(crl(key=LEAF_KEY), issuer, "CA", AT))
    assert "SHA-256" in str(crl_problem(crl(algorithm=hashes.SHA384()), issuer, "CA", AT))
    assert "issuer is not the CA" in str(crl_problem(crl(), cert("x", ca=True), "CA", AT))
    # Every CRL's issuer is held to the CRL-signing rule, on every path that checks a CRL.
    no_crl_usage = cert("ca", ca=True, usage="key_cert_sign", key=ROOT_KEY)
    assert "CRL signing" in str(crl_problem(crl(), no_crl_usage, "CA", AT))
    not_a_ca = cert("ca", ca=False, key=ROOT_KEY)
    assert "not a CA" in str(crl_problem(crl(), not_a_ca, "CA", AT))
    with_crl_usage = cert("ca", ca=True, usage="crl_sign", key=ROOT_KEY)
    assert crl_problem(crl(), with_crl_usage, "CA", AT) is None


def test_collateral_chains_refuse_unknown_critical_extensions() -> None:
    root = cert("root", ca=True, key=ROOT_KEY)
    good = cert("signing", ca=False, issuer=("root", ROOT_KEY))
    assert verify_chain([good, root], root=root, at=AT, source="chain") == good
    bad = cert("signing", ca=False, critical_unknown=True, issuer=("root", ROOT_KEY))
    with pytest.raises(EvidenceError, match="unknown critical extension"):
        verify_chain([bad, root], root=root, at=AT, source="chain")
    crl_ca = cert("crl ca", ca=True, usage="crl_sign", issuer=("root", ROOT_KEY))
    assert verify_chain([crl_ca], root=root, at=AT, source="chain", leaf_signs="crl") == crl_ca
    with pytest.raises(EvidenceError, match="end-entity"):
        verify_chain([crl_ca], root=root, at=AT, source="chain")


def test_a_vcek_with_an_unknown_critical_extension_is_refused() -> None:
    ev = make_evidence()
    builder = (
        x509.CertificateBuilder()
        .subject_name(ev.vcek.subject)
        .issuer_name(ev.vcek.issuer)
        .public_key(ev.vcek.public_key())
        .serial_number(ev.vcek.serial_number)
        .not_valid_before(ev.vcek.not_valid_before_utc)
        .not_valid_after(ev.vcek.not_valid_after_utc)
    )
    for ext in ev.vcek.extensions:
        builder = builder.add_extension(ext.value, critical=ext.critical)
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
    report = parse_report(ev.raw)
    roots = {"Milan": ev.ask_ark[1]}
    same = builder.sign(ev.pki.ask_key, hashes.SHA384(), rsa_padding=pss)
    assert verify_report(report, vcek=same, ask_ark=ev.ask_ark, at=ev.at, roots=roots).verified
    bad = builder.add_extension(UNKNOWN, critical=True).sign(
        ev.pki.ask_key, hashes.SHA384(), rsa_padding=pss
    )
    result = verify_report(report, vcek=bad, ask_ark=ev.ask_ark, at=ev.at, roots=roots)
    step = result.step("vcek")
    assert step.status is StepStatus.FAILED and "unknown critical extension" in step.detail
