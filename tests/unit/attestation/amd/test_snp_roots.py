"""AMD's pinned SEV-SNP roots: exactly the certificates AMD publishes, and each one checks out."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from importlib import resources

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from ppml.attestation.amd.verify import PRODUCTS, amd_roots, amd_signing_keys

# SHA-256 of the DER certificates, as served by AMD's KDS at /vcek/v1/<product>/cert_chain.
ARK_SHA256 = {
    "Milan": "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
    "Genoa": "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
    "Turin": "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
}
ASK_SHA256 = {
    "Milan": "67d303bd3905fd38db8b20e0793699870e7fa612eaad5dec358293fd8c0bac1b",
    "Genoa": "5464738c1546aed5f2cecf1dc98c5c960a92e8913238a61711bc90ec6e828521",
    "Turin": "5b77ef5fe7a7a004fd9032668fba9d0fda22f88c4442069a479636a6ae3b3185",
}
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


def _fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _cn(name: x509.Name) -> str:
    (attribute,) = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attribute.value)


def test_one_root_and_one_signing_key_per_product() -> None:
    assert set(amd_roots()) == set(PRODUCTS) == {"Milan", "Genoa", "Turin"}
    assert set(amd_signing_keys()) == set(PRODUCTS)
    with pytest.raises(TypeError):
        amd_roots()["Milan"] = amd_roots()["Genoa"]  # type: ignore[index]


def test_pem_files_ship_inside_the_package() -> None:
    folder = resources.files("ppml.attestation.amd").joinpath("roots")
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".pem"))
    assert names == [f"{kind}_{p.lower()}.pem" for kind in ("ark", "ask") for p in sorted(PRODUCTS)]
    for name in names:
        text = folder.joinpath(name).read_text("ascii")
        assert text.count("-----BEGIN CERTIFICATE-----") == 1


@pytest.mark.parametrize("product", PRODUCTS)
def test_fingerprints_are_the_published_ones(product: str) -> None:
    assert _fingerprint(amd_roots()[product]) == ARK_SHA256[product]
    assert _fingerprint(amd_signing_keys()[product]) == ASK_SHA256[product]


@pytest.mark.parametrize("product", PRODUCTS)
def test_ark_is_self_signed_with_rsa_pss_sha384(product: str) -> None:
    ark = amd_roots()[product]
    assert _cn(ark.subject) == f"ARK-{product}" and ark.issuer == ark.subject
    assert ark.signature_algorithm_oid == SignatureAlgorithmOID.RSASSA_PSS
    assert isinstance(ark.signature_hash_algorithm, hashes.SHA384)
    key = ark.public_key()
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 4096
    key.verify(ark.signature, ark.tbs_certificate_bytes, PSS, hashes.SHA384())
    assert ark.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


@pytest.mark.parametrize("product", PRODUCTS)
def test_ask_is_signed_by_its_ark(product: str) -> None:
    ark, ask = amd_roots()[product], amd_signing_keys()[product]
    assert _cn(ask.subject) == f"SEV-{product}" and ask.issuer == ark.subject
    assert ask.signature_algorithm_oid == SignatureAlgorithmOID.RSASSA_PSS
    key = ark.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    key.verify(ask.signature, ask.tbs_certificate_bytes, PSS, hashes.SHA384())
    akid = ask.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    skid = ark.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert akid.key_identifier == skid.digest
    assert ask.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


@pytest.mark.parametrize("product", PRODUCTS)
def test_roots_are_long_lived(product: str) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    for cert in (amd_roots()[product], amd_signing_keys()[product]):
        assert cert.not_valid_before_utc < now < cert.not_valid_after_utc
        assert cert.not_valid_after_utc.year >= 2045


def test_each_ark_signs_only_its_own_ask() -> None:
    for product in PRODUCTS:
        for other in PRODUCTS:
            if other == product:
                continue
            key = amd_roots()[other].public_key()
            ask = amd_signing_keys()[product]
            assert isinstance(key, rsa.RSAPublicKey)
            with pytest.raises(InvalidSignature):
                key.verify(ask.signature, ask.tbs_certificate_bytes, PSS, hashes.SHA384())
