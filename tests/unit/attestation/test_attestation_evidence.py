"""`verify_evidence`: type detection, Intel quotes with and without collateral, SEV-SNP reports,
the real vectors, malformed input, and the process-wide chain caches."""

from __future__ import annotations

import datetime as dt
import json
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from tests.support.evidence.evidence import matching_collateral, root_pem
from tests.support.evidence.intel import (
    Corrupt,
    IntelTestPki,
    sgx_body,
    sgx_quote,
    td_body,
    tdx_quote,
)
from tests.support.evidence.intel_collateral import collateral_from_files, write_files
from tests.support.evidence.snp import make_evidence
from tests.support.vectors import VECTORS

from ppml.attestation import EvidenceVerification, TcbStatus, TeeType, verify_evidence
from ppml.attestation import evidence as evidence_module
from ppml.attestation.collateral import Collateral
from ppml.attestation.evidence import detect_type
from ppml.errors import EvidenceError

AT = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)
LATE = dt.datetime(2026, 7, 1, tzinfo=dt.UTC)  # after the collateral's nextUpdate
SNP_DATA = Path(__file__).resolve().parents[2] / "data" / "snp"
PKI = IntelTestPki.create(seed=11)
ROOT = root_pem(PKI)


def verify(data: bytes, **kw: object) -> EvidenceVerification:
    kw.setdefault("root_pem", ROOT)
    kw.setdefault("at", AT)
    return verify_evidence(data, **kw)  # type: ignore[arg-type]


# -- detection ----------------------------------------------------------------------------------


def test_detect_type_by_header() -> None:
    assert detect_type(sgx_quote(PKI)) is TeeType.SGX
    assert detect_type(tdx_quote(PKI)) is TeeType.TDX
    assert detect_type(tdx_quote(PKI, td_body(td15=True), version=5)) is TeeType.TDX
    assert detect_type(make_evidence().raw) is TeeType.SNP


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x03\x00\x02\x00",
        struct.pack("<HHI", 3, 2, 0x81) + bytes(100),  # v3 with the TDX TEE type
        struct.pack("<HHI", 4, 2, 0) + bytes(100),  # v4 with the SGX TEE type
        struct.pack("<HHI", 3, 3, 0) + bytes(2000),  # another attestation key type
        struct.pack("<I", 6) + bytes(0x4A0),  # SNP version 6
        struct.pack("<I", 3) + bytes(0x100),  # SNP too short
    ],
)
def test_unknown_evidence_is_refused(data: bytes) -> None:
    with pytest.raises(EvidenceError):
        detect_type(data)
    with pytest.raises(EvidenceError):
        verify_evidence(data)


def test_an_explicit_type_that_does_not_fit_is_refused() -> None:
    with pytest.raises(EvidenceError):
        verify(sgx_quote(PKI), tee="tdx")
    with pytest.raises(EvidenceError):
        verify(sgx_quote(PKI), tee="snp")
    with pytest.raises(EvidenceError, match="sim"):
        verify(sgx_quote(PKI), tee="sim")
    with pytest.raises(EvidenceError, match="unknown type"):
        verify(sgx_quote(PKI), tee="tpm")


@pytest.mark.parametrize(
    "kw",
    [
        {"at": dt.datetime(2025, 1, 1)},  # naive
        {"root_pem": b"not a certificate"},
        {"collateral": "/nonexistent/collateral"},
        {"vcek": b"x"},  # a VCEK for a quote
        {"allow_outdated": "yes"},
    ],
)
def test_malformed_arguments_raise_evidence_error(kw: dict[str, object]) -> None:
    with pytest.raises(EvidenceError):
        verify(sgx_quote(PKI), **kw)


def test_not_bytes_and_oversized() -> None:
    with pytest.raises(EvidenceError):
        verify_evidence("quote")  # type: ignore[arg-type]
    with pytest.raises(EvidenceError):
        verify_evidence(bytes(70 * 1024))


# -- Intel without collateral ---------------------------------------------------------------------


def test_sgx_claims_without_collateral_are_unknown_and_reported() -> None:
    rd = bytes(range(64))
    body = sgx_body(report_data=rd, isv_prod_id=7, isv_svn=3, debug=True)
    result = verify(sgx_quote(PKI, body))
    assert result.type is TeeType.SGX and result.verified
    assert result.tcb_status is TcbStatus.UNKNOWN
    assert result.steps.step("tcb_level").detail.startswith("no collateral given")
    c = result.claims
    assert c["mr_enclave"] == body.mr_enclave.hex() and c["mr_signer"] == body.mr_signer.hex()
    assert (c["isv_prod_id"], c["isv_svn"], c["debug"]) == (7, 3, True)
    assert c["report_data"] == rd.hex()
    doc = json.loads(json.dumps(result.to_dict()))
    assert doc["tcb_status"] == "Unknown" and doc["trailing_bytes"] == {"length": 0, "hex": ""}
    assert doc["failed_step"] is None


def test_tdx_claims() -> None:
    body = td_body(report_data=b"\x07" * 64)
    result = verify(tdx_quote(PKI, body))
    assert result.verified and result.type is TeeType.TDX
    c = result.claims
    assert c["mr_td"] == body.mr_td.hex() and c["mr_seam"] == body.mr_seam.hex()
    assert [c[f"rtmr{i}"] for i in range(4)] == [r.hex() for r in body.rtmrs]
    assert c["debug"] is False and c["report_data"] == "07" * 64
    assert all(v == v.lower() for v in c.values() if isinstance(v, str))


def test_trailing_bytes_are_reported() -> None:
    result = verify(sgx_quote(PKI, trailing=b"\xab\xcd"))
    assert result.verified and result.trailing_bytes == b"\xab\xcd"
    assert result.to_dict()["trailing_bytes"] == {"length": 2, "hex": "abcd"}


@pytest.mark.parametrize(
    ("corrupt", "step"),
    [
        (Corrupt.QUOTE_SIGNATURE, "quote_signature"),
        (Corrupt.QE_REPORT_SIGNATURE, "qe_report_signature"),
        (Corrupt.BINDING_HASH, "qe_report_data_binding"),
    ],
)
def test_a_broken_quote_is_reported_not_raised(corrupt: Corrupt, step: str) -> None:
    result = verify(sgx_quote(PKI, corrupt=[corrupt]))
    assert not result.verified
    assert result.failed_step is not None and result.failed_step.name == step
    assert result.to_dict()["failed_step"] == step


def test_the_pinned_intel_root_refuses_a_test_chain() -> None:
    result = verify_evidence(sgx_quote(PKI), at=AT)
    assert not result.verified and result.failed_step is not None
    assert result.failed_step.name == "pck_chain"
    other = IntelTestPki.create(seed=12)
    assert not verify(sgx_quote(other)).verified


# -- Intel with collateral ----------------------------------------------------------------------


@pytest.mark.parametrize("tee", ["sgx", "tdx"])
def test_collateral_gives_the_tcb_status(tmp_path: Path, tee: str) -> None:
    quote = sgx_quote(PKI) if tee == "sgx" else tdx_quote(PKI)
    directory = write_files(tmp_path / "c", matching_collateral(PKI, tee=tee))
    result = verify(quote, collateral=directory)
    assert result.verified and result.tcb_status is TcbStatus.UP_TO_DATE
    assert result.steps.step("pck_crl").status == "passed"
    as_object = verify(quote, collateral=Collateral.from_dir(directory))
    assert as_object.tcb_status is TcbStatus.UP_TO_DATE


def test_out_of_date_with_advisories() -> None:
    files = matching_collateral(PKI, status="OutOfDate", advisory_ids=["INTEL-SA-00615"])
    result = verify(sgx_quote(PKI), collateral=collateral_from_files(files))
    assert result.verified and result.tcb_status is TcbStatus.OUT_OF_DATE
    assert result.advisory_ids == ("INTEL-SA-00615",)
    assert result.to_dict()["advisory_ids"] == ["INTEL-SA-00615"]


def test_no_matching_level_has_no_status() -> None:
    files = matching_collateral(PKI, match=False)
    result = verify(sgx_quote(PKI), collateral=collateral_from_files(files))
    assert result.verified  # the signatures and chains are fine
    assert result.tcb_status is None
    assert "no matching TCB level" in result.tcb_detail
    assert result.to_dict()["tcb_status"] is None


def test_outdated_collateral_fails_unless_allowed() -> None:
    coll = collateral_from_files(matching_collateral(PKI))
    late = verify(sgx_quote(PKI), collateral=coll, at=LATE)
    assert not late.verified and late.tcb_status is None
    allowed = verify(sgx_quote(PKI), collateral=coll, at=LATE, allow_outdated=True)
    assert allowed.verified and allowed.tcb_status is TcbStatus.UP_TO_DATE
    assert allowed.notes and "outdated" in allowed.steps.step("pck_crl").detail


def test_an_outdated_crl_still_revokes() -> None:
    files = matching_collateral(PKI)
    revoked = PKI.pck_crl(
        revoked=[PKI.pck_cert.serial_number],
        last_update=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
        next_update=dt.datetime(2025, 2, 1, tzinfo=dt.UTC),
    )
    files["pck_crl.der"] = revoked.public_bytes(Encoding.DER)
    fresh = verify(sgx_quote(PKI), collateral=collateral_from_files(files), at=AT)
    assert not fresh.verified
    late = verify(
        sgx_quote(PKI), collateral=collateral_from_files(files), at=AT, allow_outdated=True
    )
    assert not late.verified and late.failed_step is not None
    assert late.failed_step.name == "pck_crl" and "revoked" in late.failed_step.detail


def test_a_broken_quote_skips_the_tcb_evaluation() -> None:
    coll = collateral_from_files(matching_collateral(PKI))
    result = verify(sgx_quote(PKI, corrupt=[Corrupt.QUOTE_SIGNATURE]), collateral=coll)
    assert not result.verified and result.tcb_status is None
    assert result.steps.step("tcb_level").status == "skipped"


def test_the_chain_cache_spares_repeated_work() -> None:
    cache = evidence_module.INTEL_CHAIN_CACHE
    cache.clear()
    before = cache.hits
    for i in range(5):
        assert verify(sgx_quote(PKI, sgx_body(isv_svn=i))).verified
    assert cache.hits - before == 4


# -- SEV-SNP ------------------------------------------------------------------------------------


def _pem(*certs: object) -> bytes:
    return b"".join(c.public_bytes(Encoding.PEM) for c in certs)  # type: ignore[attr-defined]


def test_snp_synthetic_with_a_test_ark() -> None:
    ev = make_evidence(report_data=b"\x05" * 64)
    result = verify_evidence(
        ev.raw,
        root_pem=_pem(ev.pki.ark),
        vcek=ev.vcek.public_bytes(Encoding.DER),
        ask_ark=_pem(*ev.ask_ark),
        at=ev.at,
    )
    assert result.type is TeeType.SNP and result.verified
    assert result.tcb_status is TcbStatus.UP_TO_DATE
    c = result.claims
    assert c["report_data"] == "05" * 64 and c["measurement"] == ev.fields.measurement.hex()
    assert set(c["reported_tcb"]) == {"bootloader", "tee", "snp", "microcode"}
    assert c["guest_policy"]["value"] == ev.fields.policy
    json.dumps(result.to_dict())


def test_snp_from_a_collateral_directory(tmp_path: Path) -> None:
    ev = make_evidence()
    (tmp_path / "vcek.der").write_bytes(ev.vcek.public_bytes(Encoding.DER))
    (tmp_path / "ask_ark.pem").write_bytes(_pem(*ev.ask_ark))
    result = verify_evidence(ev.raw, root_pem=_pem(ev.pki.ark), collateral=tmp_path, at=ev.at)
    assert result.verified


def test_snp_failures() -> None:
    ev = make_evidence()
    tampered = bytearray(ev.raw)
    tampered[0x90] ^= 1  # the measurement
    result = verify_evidence(
        bytes(tampered), root_pem=_pem(ev.pki.ark), vcek=ev.vcek, ask_ark=ev.ask_ark, at=ev.at
    )
    assert not result.verified and result.tcb_status is None
    assert result.failed_step is not None and result.failed_step.name == "report_signature"
    pinned = verify_evidence(ev.raw, vcek=ev.vcek, ask_ark=ev.ask_ark, at=ev.at)
    assert not pinned.verified and pinned.failed_step is not None
    assert pinned.failed_step.name == "ark"
    with pytest.raises(EvidenceError, match="VCEK"):
        verify_evidence(ev.raw, at=ev.at)
    with pytest.raises(EvidenceError, match="ARK"):
        verify_evidence(ev.raw, root_pem=_pem(ev.pki.ask), vcek=ev.vcek, at=ev.at)


def test_snp_real_report() -> None:
    report = (SNP_DATA / "milan_report_v3.bin").read_bytes()
    vcek = (SNP_DATA / "milan_vcek.pem").read_bytes()
    at = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    result = verify_evidence(report, vcek=vcek, at=at)
    assert result.verified and result.tcb_status is TcbStatus.UP_TO_DATE
    assert result.claims["reported_tcb"] == {
        "bootloader": 4,
        "tee": 0,
        "snp": 24,
        "microcode": 219,
    }
    assert result.claims["chip_id"] == result.claims["chip_id"].lower()


# -- the real Intel vectors ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sgx-v3-occlum", "tdx-v4"])
def test_real_quotes(name: str) -> None:
    folder = VECTORS / name
    expected = json.loads((folder / "expected.json").read_text())
    result = verify_evidence((folder / "quote.dat").read_bytes(), at=AT)
    assert result.verified and result.tcb_status is TcbStatus.UNKNOWN
    assert result.claims["debug"] is True
    body = expected["body"]
    if name.startswith("sgx"):
        assert result.type is TeeType.SGX
        for field in ("mr_enclave", "mr_signer", "report_data"):
            assert result.claims[field] == body[field]
        assert result.claims["isv_prod_id"] == body["isv_prod_id"]
    else:
        assert result.type is TeeType.TDX
        for field in ("mr_td", "mr_seam", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "report_data"):
            assert result.claims[field] == body[field]
    pinned = (VECTORS / "IntelSGXRootCA.pem").read_bytes()
    assert verify_evidence((folder / "quote.dat").read_bytes(), root_pem=pinned, at=AT).verified
