"""The service's hardware verifiers: full verification, report data binding, refusals that name
the reason, claims as policies see them, and the workspace's verifier configuration."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from tests.support.evidence.evidence import matching_collateral
from tests.support.evidence.intel import (
    Corrupt,
    IntelTestPki,
    sgx_body,
    sgx_quote,
    td_body,
    tdx_quote,
)
from tests.support.evidence.intel_collateral import write_files
from tests.support.evidence.snp import make_evidence

from ppml.attestation import (
    SgxVerifier,
    SnpVerifier,
    TcbStatus,
    TdxVerifier,
    TeeType,
    Verifier,
)
from ppml.attestation.hardware_verifier import hardware_verifiers
from ppml.errors import AttestationFailed, ConfigurationError

AT = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)
PKI = IntelTestPki.create(seed=21)
RD = bytes(range(64))


def sgx(**kw: object) -> SgxVerifier:
    return SgxVerifier.for_testing(root=PKI.root_cert, clock=lambda: AT, **kw)  # type: ignore[arg-type]


def refusal(verifier: Verifier, evidence: bytes, rd: bytes = RD) -> str:
    with pytest.raises(AttestationFailed) as info:
        verifier.verify(evidence, expected_report_data=rd)
    return info.value.message


def test_protocol_and_names() -> None:
    for v, tee in ((sgx(), TeeType.SGX), (TdxVerifier.default(), TeeType.TDX)):
        assert isinstance(v, Verifier) and v.tee is tee
    assert SnpVerifier.default().tee is TeeType.SNP


def test_sgx_claims() -> None:
    body = sgx_body(report_data=RD, isv_prod_id=3, isv_svn=9)
    claims = sgx().verify(sgx_quote(PKI, body), expected_report_data=RD)
    assert claims.tee is TeeType.SGX and claims.debug is False
    assert claims.tcb_status is TcbStatus.UNKNOWN
    assert dict(claims.measurements) == {
        "mr_enclave": body.mr_enclave.hex(),
        "mr_signer": body.mr_signer.hex(),
    }
    assert claims.extra["isv_prod_id"] == 3 and claims.extra["isv_svn"] == 9
    assert claims.report_data == RD


def test_tdx_claims() -> None:
    body = td_body(report_data=RD, debug=True)
    v = TdxVerifier.for_testing(root=PKI.root_cert, clock=lambda: AT)
    claims = v.verify(tdx_quote(PKI, body), expected_report_data=RD)
    assert claims.debug is True and claims.measurements["mr_td"] == body.mr_td.hex()
    assert claims.measurements["rtmr3"] == body.rtmr3.hex()


def test_refusals_name_the_reason(tmp_path: Path) -> None:
    good = sgx_body(report_data=RD)
    assert "does not match" in refusal(sgx(), sgx_quote(PKI, good), rd=bytes(64))
    assert "quote_signature" in refusal(
        sgx(), sgx_quote(PKI, good, corrupt=[Corrupt.QUOTE_SIGNATURE])
    )
    assert "pck_chain" in refusal(SgxVerifier.default(), sgx_quote(PKI, good))
    assert "unsigned bytes" in refusal(sgx(), sgx_quote(PKI, good, trailing=b"\x01"))
    sgx().verify(sgx_quote(PKI, good, trailing=bytes(4)), expected_report_data=RD)
    assert "quote" in refusal(sgx(), b"garbage" * 20)
    nomatch = write_files(tmp_path / "nomatch", matching_collateral(PKI, match=False))
    assert "no matching TCB level" in refusal(sgx(collateral=nomatch), sgx_quote(PKI, good))
    revoked = write_files(tmp_path / "revoked", matching_collateral(PKI, status="Revoked"))
    assert "Revoked" in refusal(sgx(collateral=revoked), sgx_quote(PKI, good))


def test_collateral_and_outdated(tmp_path: Path) -> None:
    good = sgx_quote(PKI, sgx_body(report_data=RD))
    directory = write_files(tmp_path / "c", matching_collateral(PKI, status="OutOfDate"))
    claims = sgx(collateral=directory).verify(good, expected_report_data=RD)
    assert claims.tcb_status is TcbStatus.OUT_OF_DATE
    late = dt.datetime(2026, 7, 1, tzinfo=dt.UTC)
    stale = SgxVerifier.for_testing(root=PKI.root_cert, collateral=directory, clock=lambda: late)
    assert "expired" in refusal(stale, good)
    lenient = SgxVerifier.for_testing(
        root=PKI.root_cert, collateral=directory, allow_outdated=True, clock=lambda: late
    )
    assert lenient.verify(good, expected_report_data=RD).tcb_status is TcbStatus.OUT_OF_DATE


def test_snp_verifier(tmp_path: Path) -> None:
    ev = make_evidence(report_data=RD)
    (tmp_path / "vcek.der").write_bytes(ev.vcek.public_bytes(Encoding.DER))
    (tmp_path / "ask_ark.pem").write_bytes(
        b"".join(c.public_bytes(Encoding.PEM) for c in ev.ask_ark)
    )
    v = SnpVerifier.for_testing(root=ev.pki.ark, collateral=tmp_path, clock=lambda: ev.at)
    claims = v.verify(ev.raw, expected_report_data=RD)
    assert claims.tee is TeeType.SNP and claims.tcb_status is TcbStatus.UP_TO_DATE
    assert claims.measurements["measurement"] == ev.fields.measurement.hex()
    assert claims.extra["guest_policy"] == ev.fields.policy
    assert set(claims.extra["reported_tcb"]) >= {"bootloader", "tee", "snp", "microcode"}
    assert "does not match" in refusal(v, ev.raw, rd=bytes(64))
    pinned = SnpVerifier.default(collateral=tmp_path)
    assert "ark" in refusal(pinned, ev.raw)


def test_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        SgxVerifier.default(collateral=tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tcb_info.json").write_text("{}")
    with pytest.raises(ConfigurationError):
        SgxVerifier.default(collateral=tmp_path / "bad")


def test_hardware_verifiers_from_settings(tmp_path: Path) -> None:
    all3 = (TeeType.SGX, TeeType.TDX, TeeType.SNP)
    table = hardware_verifiers(all3)
    assert set(table) == {TeeType.SGX, TeeType.TDX}  # no VCEK: SEV-SNP left out
    (tmp_path / "vcek.der").write_bytes(make_evidence().vcek.public_bytes(Encoding.DER))
    assert set(hardware_verifiers(all3, collateral=tmp_path)) == set(all3)
    assert set(hardware_verifiers((TeeType.TDX,))) == {TeeType.TDX}
    with pytest.raises(ConfigurationError):
        hardware_verifiers((TeeType.SIM,))
