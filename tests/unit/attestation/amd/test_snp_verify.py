"""Verifying SEV-SNP reports: each chain link, each signature, each binding, the cache."""

from __future__ import annotations

import threading
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.utils import CryptographyDeprecationWarning
from tests.support.evidence.snp import (
    PKI_NOT_AFTER,
    PKI_NOT_BEFORE,
    SnpEvidence,
    default_tcb,
    der_ia5,
    der_uint,
    make_endorsement_key,
    make_evidence,
    make_pki,
)

from ppml.attestation.amd import verify as verify_module
from ppml.attestation.amd.report import SigningKey, TcbLayout, TcbVersion, parse_report
from ppml.attestation.amd.verify import (
    OID_BL_SPL,
    OID_FMC_SPL,
    OID_HW_ID,
    OID_PRODUCT_NAME,
    OID_SNP_SPL,
    OID_TEE_SPL,
    OID_UCODE_SPL,
    ChainCache,
    amd_roots,
    amd_signing_keys,
    verify_report,
)
from ppml.attestation.steps import StepStatus, VerificationReport
from ppml.errors import EvidenceError

DATA = Path(__file__).parents[3] / "data" / "snp"
STEPS = ["ark", "ask", "vcek", "report_signature", "vcek_binding"]


def _verify(ev: SnpEvidence, **changes: Any) -> VerificationReport:
    kwargs: dict[str, Any] = ev.verify_kwargs()
    kwargs.update(changes)
    return verify_report(parse_report(ev.raw), **kwargs)


def _failed_at(result: VerificationReport, name: str, match: str) -> None:
    assert not result.verified
    step = result.step(name)
    assert step.status is StepStatus.FAILED, result.to_list()
    assert match in step.detail, step.detail
    index = STEPS.index(name)
    for earlier in STEPS[:index]:
        assert result.step(earlier).status is StepStatus.PASSED, result.to_list()


def _statuses(result: VerificationReport) -> list[str]:
    return [str(s.status) for s in result.steps]


def _ca(
    cn: str,
    key: rsa.RSAPrivateKey,
    issuer_cn: str,
    issuer_key: rsa.RSAPrivateKey,
    *,
    pss: padding.AsymmetricPadding | None = None,
    serial: int = 7,
    ca: bool = True,
    not_after: datetime = PKI_NOT_AFTER,
) -> x509.Certificate:
    pki = make_pki("Milan")

    def name(common_name: str) -> x509.Name:
        attributes = [a for a in pki.ark.subject if a.oid != x509.NameOID.COMMON_NAME]
        return x509.Name([*attributes, x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name)])

    builder = (
        x509.CertificateBuilder()
        .subject_name(name(cn))
        .issuer_name(name(issuer_cn))
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(PKI_NOT_BEFORE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    default = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
    return builder.sign(issuer_key, hashes.SHA384(), rsa_padding=pss or default)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# -- passing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("product", ["Milan", "Genoa", "Turin"])
@pytest.mark.parametrize("version", [2, 3, 5])
def test_a_consistent_report_verifies(product: str, version: int) -> None:
    ev = make_evidence(product=product, version=version)
    result = _verify(ev, product=product if version == 2 else None)
    assert result.verified, result.to_list()
    assert [s.name for s in result.steps] == STEPS
    result.raise_for_failure()


@pytest.mark.parametrize("product", ["Genoa", "Turin"])
def test_a_vlek_signed_report_verifies(product: str) -> None:
    ev = make_evidence(product=product, vlek=True)
    result = _verify(ev)
    assert result.verified, result.to_list()
    assert result.step("vcek").detail == "VLEK"


def test_the_product_comes_from_the_certificate_without_ask_ark() -> None:
    ev = make_evidence(product="Genoa")
    pki = ev.pki
    result = verify_report(
        parse_report(ev.raw),
        vcek=ev.vcek,
        at=ev.at,
        roots=pki.roots,
        signing_keys=pki.signing_keys,
    )
    assert result.verified, result.to_list()


def test_the_product_comes_from_the_cpuid_when_the_certificate_has_none() -> None:
    pki = make_pki("Turin")
    vcek = make_endorsement_key(pki, chip_id=bytes(range(1, 9)), omit=frozenset({OID_PRODUCT_NAME}))
    ev = make_evidence(product="Turin", endorsement=vcek)
    result = _verify(ev)
    assert result.step("ark").status is StepStatus.PASSED
    _failed_at(result, "vcek_binding", "no productName")


# -- the public vector, against AMD's pinned roots ---------------------------------------------


def _real_vcek() -> x509.Certificate:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        return x509.load_pem_x509_certificate((DATA / "milan_vcek.pem").read_bytes())


REAL_AT = datetime(2025, 6, 1, tzinfo=UTC)


def test_the_public_milan_report_verifies_to_the_pinned_ark() -> None:
    report = parse_report((DATA / "milan_report_v3.bin").read_bytes())
    result = verify_report(report, vcek=_real_vcek(), at=REAL_AT)
    assert result.verified, result.to_list()
    assert result.step("ark").detail == "pinned ARK-Milan"
    assert result.step("vcek_binding").detail == "VCEK Milan-B0"
    chain = (amd_signing_keys()["Milan"], amd_roots()["Milan"])
    again = verify_report(report, vcek=_real_vcek(), ask_ark=chain, at=REAL_AT, product="Milan")
    assert again.verified


def test_the_public_milan_report_fails_as_another_product_or_time() -> None:
    report = parse_report((DATA / "milan_report_v3.bin").read_bytes())
    genoa = verify_report(report, vcek=_real_vcek(), at=REAL_AT, product="Genoa")
    _failed_at(genoa, "vcek", "issuer is not the ASK")
    late = verify_report(report, vcek=_real_vcek(), at=datetime(2032, 6, 1, tzinfo=UTC))
    _failed_at(late, "vcek", "expired")
    early = verify_report(report, vcek=_real_vcek(), at=datetime(2024, 6, 1, tzinfo=UTC))
    _failed_at(early, "vcek", "not yet valid")
    chain = (amd_signing_keys()["Milan"], amd_roots()["Milan"])
    test_roots = make_pki().roots
    other = verify_report(report, vcek=_real_vcek(), ask_ark=chain, at=REAL_AT, roots=test_roots)
    _failed_at(other, "ark", "not the pinned ARK-Milan")
    mixed = verify_report(report, vcek=_real_vcek(), at=REAL_AT, roots=test_roots)
    _failed_at(mixed, "ask", "ASK signature does not verify")


def test_the_test_hierarchy_is_not_trusted_by_default() -> None:
    ev = make_evidence()
    result = verify_report(parse_report(ev.raw), vcek=ev.vcek, ask_ark=ev.ask_ark, at=ev.at)
    _failed_at(result, "ark", "not the pinned ARK-Milan")
    assert _statuses(result) == ["failed", "skipped", "skipped", "skipped", "skipped"]
    assert all(s.detail == "not run: ark failed" for s in result.steps[1:])
    with pytest.raises(EvidenceError, match="ark: ARK is not the pinned"):
        result.raise_for_failure()


# -- ark ---------------------------------------------------------------------------------------


def test_ark_pinned_by_public_key_and_subject(other_rsa_key: rsa.RSAPrivateKey) -> None:
    ev = make_evidence()
    key = ev.pki.ark_key
    reissued = _ca("ARK-Milan", key, "ARK-Milan", key, serial=99)
    result = _verify(ev, ask_ark=(ev.pki.ask, reissued))
    assert result.verified, result.to_list()
    impostor = _ca("ARK-Milan", other_rsa_key, "ARK-Milan", other_rsa_key)
    _failed_at(_verify(ev, ask_ark=(ev.pki.ask, impostor)), "ark", "not the pinned ARK-Milan")


def test_ark_of_another_product_is_refused() -> None:
    ev = make_evidence()
    genoa = make_pki("Genoa")
    result = _verify(ev, ask_ark=(ev.pki.ask, genoa.ark))
    _failed_at(result, "ark", "not the pinned ARK-Milan")
    # pinned as Milan but named Genoa
    result = _verify(ev, ask_ark=(ev.pki.ask, genoa.ark), roots={"Milan": genoa.ark})
    _failed_at(result, "ark", "does not name ARK-Milan")


def test_ark_must_be_self_signed_with_pss() -> None:
    ev = make_evidence()
    key = ev.pki.ark_key
    pkcs1 = _ca("ARK-Milan", key, "ARK-Milan", key, pss=padding.PKCS1v15())
    result = _verify(ev, ask_ark=(ev.pki.ask, pkcs1), roots={"Milan": pkcs1})
    _failed_at(result, "ark", "not RSASSA-PSS")
    salt32 = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=32)
    short_salt = _ca("ARK-Milan", key, "ARK-Milan", key, pss=salt32)
    result = _verify(ev, ask_ark=(ev.pki.ask, short_salt), roots={"Milan": short_salt})
    _failed_at(result, "ark", "ARK self signature does not verify")


def test_ark_must_be_a_ca_and_valid_at_the_time() -> None:
    ev = make_evidence()
    key = ev.pki.ark_key
    leaf = _ca("ARK-Milan", key, "ARK-Milan", key, ca=False)
    _failed_at(_verify(ev, ask_ark=(ev.pki.ask, leaf), roots={"Milan": leaf}), "ark", "not a CA")
    _failed_at(_verify(ev, at=PKI_NOT_AFTER + timedelta(days=1)), "ark", "ARK expired")
    _failed_at(_verify(ev, at=PKI_NOT_BEFORE - timedelta(days=1)), "ark", "not yet valid")


def test_unknown_product_fails_the_ark_step() -> None:
    pki = make_pki("Milan")
    vcek = make_endorsement_key(pki, omit=frozenset({OID_PRODUCT_NAME}))
    ev = make_evidence(version=2, endorsement=vcek)
    _failed_at(_verify(ev), "ark", "product unknown")
    odd = make_endorsement_key(pki, product_name="Venice-A0")
    _failed_at(_verify(make_evidence(endorsement=odd)), "ark", "unknown productName")
    turin = make_evidence(product="Turin")
    _failed_at(_verify(turin, roots=make_pki("Milan").roots), "ark", "no pinned ARK for Turin")


# -- ask ---------------------------------------------------------------------------------------


def test_ask_must_be_signed_by_the_ark(other_rsa_key: rsa.RSAPrivateKey) -> None:
    ev = make_evidence()
    forged = _ca("SEV-Milan", ev.pki.ask_key, "ARK-Milan", other_rsa_key)
    _failed_at(_verify(ev, ask_ark=(forged, ev.pki.ark)), "ask", "ASK signature does not verify")


def test_ask_names_issuer_ca_and_validity() -> None:
    ev = make_evidence()
    ark_key, ask_key = ev.pki.ark_key, ev.pki.ask_key
    wrong_cn = _ca("SEV-Genoa", ask_key, "ARK-Milan", ark_key)
    _failed_at(_verify(ev, ask_ark=(wrong_cn, ev.pki.ark)), "ask", "does not name SEV-Milan")
    wrong_issuer = _ca("SEV-Milan", ask_key, "ARK-Genoa", ark_key)
    _failed_at(_verify(ev, ask_ark=(wrong_issuer, ev.pki.ark)), "ask", "issuer is not the ARK")
    leaf = _ca("SEV-Milan", ask_key, "ARK-Milan", ark_key, ca=False)
    _failed_at(_verify(ev, ask_ark=(leaf, ev.pki.ark)), "ask", "not a CA")
    old = _ca(
        "SEV-Milan", ask_key, "ARK-Milan", ark_key, not_after=datetime(2025, 1, 1, tzinfo=UTC)
    )
    _failed_at(_verify(ev, ask_ark=(old, ev.pki.ark)), "ask", "ASK expired")
    pkcs1 = _ca("SEV-Milan", ask_key, "ARK-Milan", ark_key, pss=padding.PKCS1v15())
    _failed_at(_verify(ev, ask_ark=(pkcs1, ev.pki.ark)), "ask", "not RSASSA-PSS")


def test_a_vlek_needs_the_asvk() -> None:
    ev = make_evidence(vlek=True)
    _failed_at(_verify(ev, ask_ark=ev.pki.vcek_chain), "ask", "does not name SEV-VLEK-Milan")
    result = _verify(ev, ask_ark=None)
    _failed_at(result, "ask", "no ASVK given")
    assert _statuses(result)[2:] == ["skipped"] * 3


# -- vcek --------------------------------------------------------------------------------------


def test_vcek_must_be_signed_by_the_ask(other_rsa_key: rsa.RSAPrivateKey) -> None:
    pki = make_pki()
    forged = make_endorsement_key(pki, signer=other_rsa_key)
    _failed_at(_verify(make_evidence(endorsement=forged)), "vcek", "VCEK signature does not verify")
    by_asvk = make_endorsement_key(pki, signer=pki.asvk_key)
    _failed_at(_verify(make_evidence(endorsement=by_asvk)), "vcek", "does not verify")
    renamed = make_endorsement_key(pki, issuer_cn="SEV-Genoa")
    _failed_at(_verify(make_evidence(endorsement=renamed)), "vcek", "issuer is not the ASK")


def test_vcek_validity_window() -> None:
    pki = make_pki()
    expired = make_endorsement_key(pki, not_after=datetime(2025, 1, 1, tzinfo=UTC))
    _failed_at(_verify(make_evidence(endorsement=expired)), "vcek", "VCEK expired")
    future = make_endorsement_key(pki, not_before=datetime(2026, 1, 1, tzinfo=UTC))
    _failed_at(_verify(make_evidence(endorsement=future)), "vcek", "not yet valid")


def test_vcek_key_must_be_p384() -> None:
    pki = make_pki()
    p256 = make_endorsement_key(pki, key=ec.generate_private_key(ec.SECP256R1()))
    ev = make_evidence(endorsement=p256)
    _failed_at(_verify(ev), "vcek", "not ECDSA P-384")


def test_the_signing_key_kind_must_match_the_certificate() -> None:
    ev = make_evidence(vlek=True, signing_key=SigningKey.VCEK)
    _failed_at(_verify(ev), "vcek", "the report says VCEK signed it, the certificate is a VLEK")
    ev = make_evidence(signing_key=SigningKey.VLEK)
    _failed_at(_verify(ev), "vcek", "the report says VLEK signed it, the certificate is a VCEK")
    ev = make_evidence(signing_key=SigningKey.NONE)
    _failed_at(_verify(ev), "vcek", "not signed")


# -- report_signature --------------------------------------------------------------------------


def test_a_changed_signed_byte_breaks_the_signature() -> None:
    ev = make_evidence()
    raw = bytearray(ev.raw)
    raw[0x50] ^= 1  # report_data
    result = verify_report(parse_report(bytes(raw)), **ev.verify_kwargs())
    _failed_at(result, "report_signature", "does not verify")
    assert result.step("vcek_binding").status is StepStatus.PASSED


def test_a_signature_by_another_key_or_a_zero_signature_fails() -> None:
    ev = make_evidence()
    stranger = make_endorsement_key(make_pki(), key=ec.generate_private_key(ec.SECP384R1()))
    result = verify_report(parse_report(ev.raw), **{**ev.verify_kwargs(), "vcek": stranger.cert})
    _failed_at(result, "report_signature", "does not verify")
    raw = bytearray(ev.raw)
    raw[0x2A0 : 0x2A0 + 48] = bytes(48)
    _failed_at(
        verify_report(parse_report(bytes(raw)), **ev.verify_kwargs()),
        "report_signature",
        "zero",
    )


# -- vcek_binding ------------------------------------------------------------------------------


def test_hw_id_must_equal_chip_id() -> None:
    pki = make_pki()
    other = make_endorsement_key(pki, chip_id=b"\x55" * 64)
    _failed_at(_verify(make_evidence(endorsement=other)), "vcek_binding", "hwID does not match")
    missing = make_endorsement_key(pki, omit=frozenset({OID_HW_ID}))
    _failed_at(_verify(make_evidence(endorsement=missing)), "vcek_binding", "no hwID")
    short = make_endorsement_key(pki, override={OID_HW_ID: b"\x01" * 63})
    _failed_at(_verify(make_evidence(endorsement=short)), "vcek_binding", "hwID")
    eight = make_endorsement_key(pki, override={OID_HW_ID: bytes(range(8))})
    _failed_at(_verify(make_evidence(endorsement=eight)), "vcek_binding", "hwID is 8 bytes")


def test_hw_id_wrapped_in_an_octet_string_is_accepted() -> None:
    pki = make_pki()
    wrapped = make_endorsement_key(pki, override={OID_HW_ID: b"\x04\x40" + bytes(range(64))})
    assert _verify(make_evidence(endorsement=wrapped)).verified


def test_a_masked_chip_id_cannot_bind_a_vcek_but_a_vlek_needs_none() -> None:
    masked = make_evidence(chip_id=bytes(64), mask_chip_key=True)
    _failed_at(_verify(masked), "vcek_binding", "chip_id is masked")
    vlek = make_evidence(vlek=True, chip_id=bytes(64), mask_chip_key=True)
    assert _verify(vlek).verified


def test_turin_binds_the_first_eight_bytes_of_chip_id() -> None:
    ev = make_evidence(product="Turin", chip_id=bytes(range(1, 9)) + b"\x01" + bytes(55))
    _failed_at(_verify(ev), "vcek_binding", "hwID does not match")


@pytest.mark.parametrize(
    ("component", "oid"),
    [
        ("bootloader", OID_BL_SPL),
        ("tee", OID_TEE_SPL),
        ("snp", OID_SNP_SPL),
        ("microcode", OID_UCODE_SPL),
    ],
)
def test_each_spl_must_equal_the_reported_tcb(component: str, oid: x509.ObjectIdentifier) -> None:
    pki = make_pki()
    wrong = make_endorsement_key(pki, override={oid: der_uint(200)})
    result = _verify(make_evidence(endorsement=wrong))
    _failed_at(result, "vcek_binding", f"reported_tcb.{component}")
    missing = make_endorsement_key(pki, omit=frozenset({oid}))
    _failed_at(_verify(make_evidence(endorsement=missing)), "vcek_binding", f"no {component} SPL")


def test_turin_fmc_spl_must_equal_the_reported_tcb() -> None:
    pki = make_pki("Turin")
    chip = bytes(range(1, 9))
    wrong = make_endorsement_key(pki, chip_id=chip, override={OID_FMC_SPL: der_uint(9)})
    result = _verify(make_evidence(product="Turin", endorsement=wrong))
    _failed_at(result, "vcek_binding", "reported_tcb.fmc 1 != VCEK SPL 9")
    missing = make_endorsement_key(pki, chip_id=chip, omit=frozenset({OID_FMC_SPL}))
    _failed_at(
        _verify(make_evidence(product="Turin", endorsement=missing)), "vcek_binding", "no fmc"
    )


def test_version_2_turin_report_uses_the_products_tcb_layout() -> None:
    ev = make_evidence(product="Turin", version=2)
    assert parse_report(ev.raw).reported_tcb.bootloader == 1  # the FMC, read as Milan/Genoa
    assert _verify(ev).verified  # the product from the certificate gives the Turin layout
    assert _verify(ev, product="Turin").verified


def test_reported_tcb_reserved_bytes_must_be_zero() -> None:
    tcb = bytearray(default_tcb("Milan").raw)
    tcb[3] = 1
    ev = make_evidence(reported_tcb=bytes(tcb))
    _failed_at(_verify(ev), "vcek_binding", "reserved bytes")


@pytest.mark.parametrize(
    "bad",
    [b"\x04\x01\x01", b"\x02\x01\x80", b"\x02\x02\x00\x01", b"\x02\x00", b"\x02", b"\x02\x01"],
)
def test_malformed_spl_values_fail_the_step_without_raising(bad: bytes) -> None:
    wrong = make_endorsement_key(make_pki(), override={OID_SNP_SPL: bad})
    result = _verify(make_evidence(endorsement=wrong))
    _failed_at(result, "vcek_binding", "snp SPL")


def test_large_spl_values_are_out_of_range() -> None:
    wrong = make_endorsement_key(make_pki(), override={OID_TEE_SPL: der_uint(300)})
    _failed_at(_verify(make_evidence(endorsement=wrong)), "vcek_binding", "tee SPL out of range")


def test_product_name_must_match() -> None:
    pki = make_pki()
    genoa = make_endorsement_key(pki, product_name="Genoa-B1")
    result = _verify(make_evidence(endorsement=genoa), product="Milan")
    _failed_at(result, "vcek_binding", "productName 'Genoa-B1' is not Milan")
    bad = make_endorsement_key(pki, override={OID_PRODUCT_NAME: der_ia5("Milan\x01")})
    _failed_at(_verify(make_evidence(endorsement=bad), product="Milan"), "vcek_binding", "ASCII")
    utf8 = make_endorsement_key(pki, override={OID_PRODUCT_NAME: b"\x0c\x05Milan"})
    _failed_at(_verify(make_evidence(endorsement=utf8), product="Milan"), "vcek_binding", "type")


def test_cpuid_must_be_the_products() -> None:
    ev = make_evidence(cpuid_family=0x19, cpuid_model=0x11)  # a Genoa part
    _failed_at(_verify(ev), "vcek_binding", "is not Milan")
    ev = make_evidence(product="Genoa", cpuid_family=0x19, cpuid_model=0x01)
    _failed_at(_verify(ev), "vcek_binding", "is not Genoa")


# -- malformed input ---------------------------------------------------------------------------


def test_malformed_arguments_raise_evidence_error() -> None:
    ev = make_evidence()
    report = parse_report(ev.raw)
    kwargs = ev.verify_kwargs()
    with pytest.raises(EvidenceError, match="timezone-aware"):
        verify_report(report, **{**kwargs, "at": datetime(2025, 1, 1)})
    with pytest.raises(EvidenceError, match="unknown product"):
        verify_report(report, **{**kwargs, "product": "Naples"})
    with pytest.raises(EvidenceError, match="two certificates"):
        verify_report(report, **{**kwargs, "ask_ark": (ev.pki.ark,)})
    with pytest.raises(EvidenceError, match="x509"):
        verify_report(report, **{**kwargs, "vcek": b"pem"})
    with pytest.raises(EvidenceError, match="SnpReport"):
        verify_report(ev.raw, **kwargs)  # type: ignore[arg-type]


def test_an_rsa_vcek_fails_without_raising() -> None:
    pki = make_pki()
    rsa_vcek = make_endorsement_key(pki, key=None)
    builder = (
        x509.CertificateBuilder()
        .subject_name(rsa_vcek.cert.subject)
        .issuer_name(rsa_vcek.cert.issuer)
        .public_key(pki.asvk_key.public_key())
        .serial_number(5)
        .not_valid_before(rsa_vcek.cert.not_valid_before_utc)
        .not_valid_after(rsa_vcek.cert.not_valid_after_utc)
    )
    for ext in rsa_vcek.cert.extensions:
        builder = builder.add_extension(ext.value, critical=ext.critical)
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
    cert = builder.sign(pki.ask_key, hashes.SHA384(), rsa_padding=pss)
    result = _verify(make_evidence(), vcek=cert)
    _failed_at(result, "vcek", "not ECDSA P-384")


# -- the cache ---------------------------------------------------------------------------------


def test_cache_hit_skips_rsa_but_still_checks_time(monkeypatch: pytest.MonkeyPatch) -> None:
    ev = make_evidence()
    cache = ChainCache(max_entries=4)
    assert _verify(ev, cache=cache).verified
    assert len(cache) == 1
    calls: list[str] = []
    original = verify_module._check_pss_signed

    def counting(*args: Any) -> str | None:
        calls.append(args[2])
        return original(*args)

    monkeypatch.setattr(verify_module, "_check_pss_signed", counting)
    hit = _verify(ev, cache=cache)
    assert hit.verified and calls == []
    assert hit.step("vcek").detail == "VCEK (cached)"
    late = _verify(ev, cache=cache, at=datetime(2031, 6, 1, tzinfo=UTC))
    _failed_at(late, "vcek", "expired")
    other_root = _verify(ev, cache=cache, roots=make_pki("Genoa").roots, product="Genoa")
    assert not other_root.verified


def test_cache_keeps_only_verified_chains_and_is_bounded() -> None:
    cache = ChainCache(max_entries=2)
    bad = make_evidence(signing_key=SigningKey.VLEK)
    assert not _verify(bad, cache=cache).verified
    assert len(cache) == 0
    for chip in (b"\x01", b"\x02", b"\x03"):
        key = make_endorsement_key(make_pki(), chip_id=chip * 64)
        assert _verify(make_evidence(endorsement=key, chip_id=chip * 64), cache=cache).verified
    assert len(cache) == 2
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(ValueError):
        ChainCache(max_entries=0)


def test_cache_is_safe_across_threads() -> None:
    ev = make_evidence()
    cache = ChainCache(max_entries=1)
    results: list[bool] = []

    def work() -> None:
        for _ in range(5):
            results.append(_verify(ev, cache=cache).verified)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 20 and len(cache) == 1


def test_turin_tcb_build_matches_the_generator() -> None:
    tcb = default_tcb("Turin")
    assert tcb == TcbVersion.build(
        bootloader=4, tee=0, snp=24, microcode=219, fmc=1, layout=TcbLayout.TURIN
    )
