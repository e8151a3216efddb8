"""Verifying quotes: real vectors against the Intel root, and every synthetic failure path of
the chain, the CRLs, the QE report, the binding and the quote signature; the chain cache."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from tests.support.evidence.intel import (
    DEFAULT_AT,
    Corrupt,
    IntelTestPki,
    Validity,
    derived_key,
    sgx_quote,
    td_body,
    tdx_quote,
)
from tests.support.vectors import VECTORS

from ppml.attestation.intel.chain import (
    INTEL_SGX_ROOT_CA_SHA256,
    STEP_NAMES,
    ChainCache,
    intel_sgx_root,
    load_crl,
    verify_quote,
)
from ppml.attestation.intel.quote import parse_quote
from ppml.attestation.steps import StepStatus, VerificationReport
from ppml.errors import EvidenceError

VECTOR_AT = datetime(2025, 6, 1, tzinfo=UTC)
_PEM = Encoding.PEM
_DER = Encoding.DER

PASSED, FAILED, SKIPPED, NOT_CHECKED = (
    StepStatus.PASSED,
    StepStatus.FAILED,
    StepStatus.SKIPPED,
    StepStatus.NOT_CHECKED,
)


def statuses(report: VerificationReport) -> dict[str, StepStatus]:
    return {s.name: s.status for s in report.steps}


@pytest.fixture(scope="module")
def pki() -> IntelTestPki:
    return IntelTestPki.create(seed=11)


def _verify(pki: IntelTestPki, raw: bytes, **kw: object) -> VerificationReport:
    kw.setdefault("at", DEFAULT_AT)
    return verify_quote(parse_quote(raw), root=pki.root_cert, **kw)  # type: ignore[arg-type]


# --- real vectors ---------------------------------------------------------------------------------


def test_shipped_intel_root() -> None:
    root = intel_sgx_root()
    assert root.fingerprint(hashes.SHA256()).hex() == INTEL_SGX_ROOT_CA_SHA256
    assert root.subject.rfc4514_string().endswith("CN=Intel SGX Root CA")
    if VECTORS.is_dir():
        assert (VECTORS / "IntelSGXRootCA.pem").read_bytes().strip().startswith(b"-----BEGIN")


@pytest.mark.parametrize("name", ["sgx-v3-occlum", "tdx-v4"])
def test_real_vectors_verify_against_the_intel_root(name: str) -> None:
    raw = (VECTORS / name / "quote.dat").read_bytes()
    report = verify_quote(parse_quote(raw), root=intel_sgx_root(), at=VECTOR_AT)
    assert report.verified
    assert [s.name for s in report.steps] == list(STEP_NAMES)
    expected = dict.fromkeys(STEP_NAMES, PASSED) | {"pck_crl": NOT_CHECKED, "root_crl": NOT_CHECKED}
    assert statuses(report) == expected
    assert "Platform CA" in report.step("pck_chain").detail
    assert verify_quote(raw, root=intel_sgx_root(), at=VECTOR_AT) == report  # bytes accepted


def test_real_vector_against_a_test_root_or_after_expiry(pki: IntelTestPki) -> None:
    raw = (VECTORS / "tdx-v4" / "quote.dat").read_bytes()
    wrong = verify_quote(raw, root=pki.root_cert, at=VECTOR_AT)
    assert statuses(wrong)["pck_chain"] is FAILED and "pinned root" in wrong.steps[0].detail
    assert statuses(wrong)["quote_signature"] is SKIPPED
    late = verify_quote(raw, root=intel_sgx_root(), at=datetime(2031, 1, 1, tzinfo=UTC))
    assert "PCK certificate: expired" in late.step("pck_chain").detail


# --- synthetic: everything correct ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sgx", "tdx4", "tdx5", "tdx5-15"])
def test_synthetic_quotes_verify_with_crls(pki: IntelTestPki, kind: str) -> None:
    raw = {
        "sgx": lambda: sgx_quote(pki),
        "tdx4": lambda: tdx_quote(pki),
        "tdx5": lambda: tdx_quote(pki, version=5),
        "tdx5-15": lambda: tdx_quote(pki, td_body(td15=True), version=5),
    }[kind]()
    report = _verify(pki, raw, pck_crl=pki.pck_crl(), root_crl=pki.root_crl())
    assert report.verified and set(statuses(report).values()) == {PASSED}
    report.raise_for_failure()


# --- quote, QE report and binding -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("corrupt", "failed", "skipped"),
    [
        (
            Corrupt.QE_REPORT_SIGNATURE,
            "qe_report_signature",
            {"qe_report_data_binding", "quote_signature"},
        ),
        (Corrupt.BINDING_HASH, "qe_report_data_binding", {"quote_signature"}),
        (Corrupt.BINDING_PADDING, "qe_report_data_binding", {"quote_signature"}),
        (Corrupt.QUOTE_SIGNATURE, "quote_signature", set()),
    ],
)
@pytest.mark.parametrize("version", [3, 4, 5])
def test_each_quote_level_break(
    pki: IntelTestPki, corrupt: Corrupt, failed: str, skipped: set[str], version: int
) -> None:
    raw = (
        sgx_quote(pki, corrupt={corrupt})
        if version == 3
        else tdx_quote(pki, version=version, corrupt={corrupt})
    )
    report = _verify(pki, raw)
    assert not report.verified
    st = statuses(report)
    assert st[failed] is FAILED and report.first_failure is not None
    assert report.first_failure.name == failed
    assert {n for n, s in st.items() if s is SKIPPED} == skipped
    assert st["pck_chain"] is PASSED
    assert report.step(failed).detail
    with pytest.raises(EvidenceError, match=failed):
        report.raise_for_failure()


def test_binding_halves_have_their_own_reasons(pki: IntelTestPki) -> None:
    first = _verify(pki, tdx_quote(pki, corrupt={Corrupt.BINDING_HASH}))
    second = _verify(pki, tdx_quote(pki, corrupt={Corrupt.BINDING_PADDING}))
    assert "[0:32]" in first.step("qe_report_data_binding").detail
    assert "[32:64]" in second.step("qe_report_data_binding").detail


def test_other_attestation_key_declared(pki: IntelTestPki) -> None:
    other = derived_key(99, "attestation").public_key().public_numbers()
    declared = other.x.to_bytes(32, "big") + other.y.to_bytes(32, "big")
    report = _verify(pki, tdx_quote(pki, attestation_public_key=declared))
    assert statuses(report)["qe_report_data_binding"] is PASSED
    assert statuses(report)["quote_signature"] is FAILED


def test_attestation_key_not_on_the_curve(pki: IntelTestPki) -> None:
    report = _verify(pki, sgx_quote(pki, attestation_public_key=b"\x01" * 64))
    assert "not a P-256 point" in report.step("quote_signature").detail


def test_qe_auth_data_is_bound(pki: IntelTestPki) -> None:
    raw = tdx_quote(pki, qe_auth_data=b"")
    assert _verify(pki, raw).verified
    q = parse_quote(tdx_quote(pki))
    changed = dataclasses.replace(q, qe_auth_data=b"\x00" + q.qe_auth_data[1:] + b"x")
    report = verify_quote(changed, root=pki.root_cert, at=DEFAULT_AT)
    assert statuses(report)["qe_report_data_binding"] is FAILED


# --- chain ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("which", "detail"),
    [
        ("pck", "PCK certificate: signature does not verify"),
        ("ca", "PCK CA: signature does not verify"),
        ("root", "root CA: signature does not verify"),
    ],
)
def test_each_chain_signature(which: str, detail: str) -> None:
    pki = IntelTestPki.create(seed=12, bad_signature=which)  # type: ignore[arg-type]
    report = _verify(pki, sgx_quote(pki))
    assert report.step("pck_chain").status is FAILED
    assert detail in report.step("pck_chain").detail
    assert all(s.status is SKIPPED for s in report.steps[1:])


VALID = Validity(datetime(2025, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))


@pytest.mark.parametrize(
    ("link", "name"), [("pck", "PCK certificate"), ("ca", "PCK CA"), ("root", "root CA")]
)
def test_each_link_validity(link: str, name: str) -> None:
    pki = IntelTestPki.create(seed=13, **{f"{link}_validity": VALID})  # type: ignore[arg-type]
    raw = tdx_quote(pki)
    assert _verify(pki, raw, at=datetime(2026, 6, 1, tzinfo=UTC)).verified
    early = _verify(pki, raw, at=datetime(2024, 12, 31, tzinfo=UTC))
    late = _verify(pki, raw, at=datetime(2027, 1, 1, 0, 0, 1, tzinfo=UTC))
    assert f"{name}: not valid before" in early.step("pck_chain").detail
    assert f"{name}: expired" in late.step("pck_chain").detail
    assert not early.verified and not late.verified


def test_wrong_root(pki: IntelTestPki) -> None:
    raw = sgx_quote(pki)
    same_name_other_key = IntelTestPki.create(seed=14).root_cert
    for root in (same_name_other_key, intel_sgx_root(), pki.ca_cert):
        report = verify_quote(raw, root=root, at=DEFAULT_AT)
        assert "pinned root" in report.step("pck_chain").detail


def test_chain_shape_and_names(pki: IntelTestPki) -> None:
    short = pki.pck_cert.public_bytes(_PEM) + pki.ca_cert.public_bytes(_PEM)
    assert "expected 3" in _verify(pki, tdx_quote(pki, pck_chain_pem=short)).steps[0].detail
    for kw, text in (
        ({"pck_cn": "Not a PCK"}, "PCK certificate: common name"),
        ({"ca_cn": "Some CA"}, "PCK CA: common name"),
    ):
        other = IntelTestPki.create(seed=11, **kw)  # type: ignore[arg-type]
        assert text in _verify(other, sgx_quote(other)).steps[0].detail
    processor = IntelTestPki.create(seed=11, ca_cn="Intel SGX PCK Processor CA")
    assert _verify(processor, sgx_quote(processor)).verified
    bad_ext = IntelTestPki.create(seed=11, pck_extension_der=b"\x30\x00")
    assert "SGX extensions" in _verify(bad_ext, sgx_quote(bad_ext)).steps[0].detail


def test_leaf_and_ca_swapped(pki: IntelTestPki) -> None:
    swapped = b"".join(c.public_bytes(_PEM) for c in (pki.ca_cert, pki.pck_cert, pki.root_cert))
    report = _verify(pki, tdx_quote(pki, pck_chain_pem=swapped))
    assert report.step("pck_chain").status is FAILED


# --- CRLs -----------------------------------------------------------------------------------------


def test_revoked_pck_leaf(pki: IntelTestPki) -> None:
    crl = pki.pck_crl(revoked=[pki.pck_cert.serial_number, 5])
    report = _verify(pki, sgx_quote(pki), pck_crl=crl)
    st = statuses(report)
    assert st["pck_crl"] is FAILED and "PCK certificate is revoked" in report.steps[1].detail
    assert st["qe_report_signature"] is PASSED and not report.verified
    ok = _verify(pki, sgx_quote(pki), pck_crl=pki.pck_crl(revoked=[5, 6]))
    assert ok.verified and statuses(ok)["pck_crl"] is PASSED


def test_revoked_intermediate(pki: IntelTestPki) -> None:
    crl = pki.root_crl(revoked=[pki.ca_cert.serial_number])
    report = _verify(pki, tdx_quote(pki), root_crl=crl)
    assert statuses(report)["root_crl"] is FAILED and "PCK CA is revoked" in report.steps[2].detail
    assert statuses(report)["pck_crl"] is NOT_CHECKED and not report.verified


def test_crls_signed_by_the_wrong_key(pki: IntelTestPki) -> None:
    raw = tdx_quote(pki)
    bad_pck = _verify(pki, raw, pck_crl=pki.pck_crl(signer=pki.root_key))
    bad_root = _verify(pki, raw, root_crl=pki.root_crl(signer=pki.ca_key))
    assert "signature does not verify" in bad_pck.step("pck_crl").detail
    assert "signature does not verify" in bad_root.step("root_crl").detail


def test_crl_from_the_wrong_issuer(pki: IntelTestPki) -> None:
    report = _verify(pki, tdx_quote(pki), pck_crl=pki.root_crl(), root_crl=pki.pck_crl())
    assert "issuer is not the PCK CA" in report.step("pck_crl").detail
    assert "issuer is not the root CA" in report.step("root_crl").detail


def test_expired_and_future_crls(pki: IntelTestPki) -> None:
    raw = sgx_quote(pki)
    expired = pki.pck_crl(next_update=DEFAULT_AT - timedelta(seconds=1))
    future = pki.root_crl(last_update=DEFAULT_AT + timedelta(days=1))
    report = _verify(pki, raw, pck_crl=expired, root_crl=future)
    assert "PCK CRL: expired" in report.step("pck_crl").detail
    assert "root CA CRL: not valid before" in report.step("root_crl").detail


def test_crl_steps_are_skipped_when_the_chain_fails(pki: IntelTestPki) -> None:
    report = verify_quote(
        sgx_quote(pki),
        root=intel_sgx_root(),
        at=DEFAULT_AT,
        pck_crl=pki.pck_crl(),
        root_crl=pki.root_crl(),
    )
    assert statuses(report)["pck_crl"] is SKIPPED and statuses(report)["root_crl"] is SKIPPED


def test_load_crl(pki: IntelTestPki) -> None:
    crl = pki.pck_crl(revoked=[1])
    assert load_crl(crl.public_bytes(_DER)) == crl
    assert load_crl(crl.public_bytes(_PEM)) == crl
    for bad in (b"", b"junk", b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"):
        with pytest.raises(EvidenceError, match="CRL"):
            load_crl(bad)


# --- malformed input raises -----------------------------------------------------------------------


def test_malformed_input_raises_evidence_error(pki: IntelTestPki) -> None:
    raw = sgx_quote(pki)
    with pytest.raises(EvidenceError, match="timezone"):
        verify_quote(raw, root=pki.root_cert, at=datetime(2026, 1, 1))
    with pytest.raises(EvidenceError, match="root"):
        verify_quote(raw, root=b"root", at=DEFAULT_AT)  # type: ignore[arg-type]
    with pytest.raises(EvidenceError, match="pck_crl"):
        verify_quote(raw, root=pki.root_cert, at=DEFAULT_AT, pck_crl=b"crl")  # type: ignore[arg-type]
    with pytest.raises(EvidenceError, match="quote"):
        verify_quote(42, root=pki.root_cert, at=DEFAULT_AT)  # type: ignore[arg-type]
    with pytest.raises(EvidenceError):
        verify_quote(raw[:-1], root=pki.root_cert, at=DEFAULT_AT)


# --- the chain cache ------------------------------------------------------------------------------


def test_cache_reuses_the_chain_and_still_checks_signatures(pki: IntelTestPki) -> None:
    cache = ChainCache()
    first = _verify(pki, tdx_quote(pki), cache=cache)
    assert (cache.hits, cache.misses, len(cache)) == (0, 1, 1)
    second = _verify(pki, tdx_quote(pki, td_body(report_data=b"\x07" * 64)), cache=cache)
    assert (cache.hits, cache.misses) == (1, 1)
    assert first == second  # a cached chain gives the same report
    broken = _verify(pki, tdx_quote(pki, corrupt={Corrupt.QUOTE_SIGNATURE}), cache=cache)
    assert cache.hits == 2 and statuses(broken)["quote_signature"] is FAILED
    qe = _verify(pki, tdx_quote(pki, corrupt={Corrupt.QE_REPORT_SIGNATURE}), cache=cache)
    assert cache.hits == 3 and statuses(qe)["qe_report_signature"] is FAILED


def test_cache_respects_the_validity_window() -> None:
    pki = IntelTestPki.create(seed=15, pck_validity=VALID)
    cache = ChainCache()
    raw = sgx_quote(pki)
    assert _verify(pki, raw, cache=cache, at=datetime(2026, 6, 1, tzinfo=UTC)).verified
    late = _verify(pki, raw, cache=cache, at=datetime(2027, 6, 1, tzinfo=UTC))
    assert cache.hits == 0 and cache.misses == 2
    assert "expired" in late.step("pck_chain").detail
    early = _verify(pki, raw, cache=cache, at=datetime(2024, 6, 1, tzinfo=UTC))
    assert cache.hits == 0 and not early.verified
    assert _verify(pki, raw, cache=cache, at=datetime(2026, 12, 31, tzinfo=UTC)).verified
    assert cache.hits == 1


def test_cache_respects_crl_windows_and_crl_inputs(pki: IntelTestPki) -> None:
    cache = ChainCache()
    raw = sgx_quote(pki)
    crl = pki.pck_crl(next_update=DEFAULT_AT + timedelta(days=1))
    assert _verify(pki, raw, cache=cache, pck_crl=crl).verified
    expired = _verify(pki, raw, cache=cache, pck_crl=crl, at=DEFAULT_AT + timedelta(days=2))
    assert cache.hits == 0 and statuses(expired)["pck_crl"] is FAILED
    revoking = pki.pck_crl(revoked=[pki.pck_cert.serial_number])
    assert not _verify(pki, raw, cache=cache, pck_crl=revoking).verified
    assert _verify(pki, raw, cache=cache).verified  # no CRL is another key
    assert cache.hits == 0
    assert _verify(pki, raw, cache=cache, pck_crl=crl).verified
    assert cache.hits == 1


def test_cache_never_stores_failures_and_is_keyed_by_root(pki: IntelTestPki) -> None:
    cache = ChainCache()
    raw = sgx_quote(pki)
    for _ in range(2):
        verify_quote(raw, root=intel_sgx_root(), at=DEFAULT_AT, cache=cache)
    assert len(cache) == 0 and cache.hits == 0
    assert verify_quote(raw, root=pki.root_cert, at=DEFAULT_AT, cache=cache).verified
    other = IntelTestPki.create(seed=16)
    assert not verify_quote(raw, root=other.root_cert, at=DEFAULT_AT, cache=cache).verified
    assert cache.hits == 0


def test_cache_is_bounded() -> None:
    cache = ChainCache(max_entries=2)
    pkis = [IntelTestPki.create(seed=s) for s in (21, 22, 23)]
    for p in pkis:
        _verify(p, sgx_quote(p), cache=cache)
    assert len(cache) == 2
    _verify(pkis[0], sgx_quote(pkis[0]), cache=cache)  # evicted first: a miss
    assert cache.hits == 0
    _verify(pkis[2], sgx_quote(pkis[2]), cache=cache)
    assert cache.hits == 1
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(ValueError):
        ChainCache(max_entries=0)


def test_cache_is_thread_safe(pki: IntelTestPki) -> None:
    cache = ChainCache()
    raws = [tdx_quote(pki, td_body(report_data=bytes([i]) * 64)) for i in range(8)]
    barrier = threading.Barrier(4)

    def work(i: int) -> bool:
        if i < 4:
            barrier.wait()
        return _verify(pki, raws[i % len(raws)], cache=cache).verified

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert all(pool.map(work, range(32)))
    assert cache.hits + cache.misses == 32 and len(cache) == 1
