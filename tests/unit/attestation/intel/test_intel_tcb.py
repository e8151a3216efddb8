"""TCB evaluation by Intel's algorithm: level selection, QE identity, TDX module identity and
the convergence of their statuses."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest
from tests.support.evidence.intel_collateral import (
    DEFAULT_QE_MRSIGNER,
    TestPki,
    build_files,
    collateral_from_files,
    isv_level,
    module_identity,
    qe_identity_body,
    tcb_info_body,
    tcb_level,
    tdx_module,
)

from ppml.attestation.claims import TcbStatus
from ppml.attestation.intel.tcb import (
    PlatformTcb,
    QeReportInfo,
    TcbEvaluation,
    TcbOutcome,
    converge,
    evaluate,
)
from ppml.attestation.steps import StepStatus, VerificationReport
from ppml.errors import EvidenceError

AT = dt.datetime(2025, 1, 15, tzinfo=dt.UTC)
S = TcbStatus
ALL_STATUSES = [s for s in TcbStatus if s is not TcbStatus.UNKNOWN]


@pytest.fixture(scope="module")
def pki() -> TestPki:
    return TestPki.create()


SGX = PlatformTcb(
    fmspc=bytes.fromhex("00906ed50000"),
    pce_id=b"\x00\x00",
    sgx_tcb_components=(2,) * 16,
    pce_svn=13,
)
TDX = dataclasses.replace(
    SGX,
    tee_tcb_svn=bytes([3, 0] + [3] * 14),
    mr_signer_seam=bytes(48),
    seam_attributes=bytes(8),
)
QE = QeReportInfo(
    mr_signer=bytes.fromhex(DEFAULT_QE_MRSIGNER),
    isv_prod_id=1,
    isv_svn=8,
    misc_select=0,
    attributes=bytes.fromhex("11000000000000000000000000000000"),
)


def run(
    pki: TestPki,
    *,
    tcb: dict[str, Any] | None = None,
    qe_body: dict[str, Any] | None = None,
    platform: PlatformTcb = SGX,
    qe: QeReportInfo = QE,
    tee: str = "sgx",
    no_qe: bool = False,
) -> tuple[VerificationReport, TcbEvaluation]:
    if tcb is None:
        tcb = tcb_info_body(tee=tee)
    if qe_body is None:
        qe_body = qe_identity_body(ident="TD_QE" if tee == "tdx" else "QE")
    files = build_files(pki, tcb_info=tcb, qe_identity=None if no_qe else qe_body)
    return evaluate(
        collateral_from_files(files),
        platform,
        qe,
        root=pki.root,
        at=AT,
        tee=tee,  # type: ignore[arg-type]
    )


def status_of(pki: TestPki, **kw: Any) -> TcbStatus | None:
    report, result = run(pki, **kw)
    if result.outcome is TcbOutcome.EVALUATED:
        assert report.verified, report.to_list()
    return result.status


# --------------------------------------------------------------------------- convergence


@pytest.mark.parametrize(
    ("platform", "qe", "expected"),
    [
        (S.UP_TO_DATE, S.UP_TO_DATE, S.UP_TO_DATE),
        (S.UP_TO_DATE, S.OUT_OF_DATE, S.OUT_OF_DATE),
        (S.SW_HARDENING_NEEDED, S.OUT_OF_DATE, S.OUT_OF_DATE),
        (S.CONFIGURATION_NEEDED, S.OUT_OF_DATE, S.OUT_OF_DATE_CONFIGURATION_NEEDED),
        (
            S.CONFIGURATION_AND_SW_HARDENING_NEEDED,
            S.OUT_OF_DATE,
            S.OUT_OF_DATE_CONFIGURATION_NEEDED,
        ),
        (S.OUT_OF_DATE, S.OUT_OF_DATE, S.OUT_OF_DATE),
        (S.OUT_OF_DATE_CONFIGURATION_NEEDED, S.OUT_OF_DATE, S.OUT_OF_DATE_CONFIGURATION_NEEDED),
        (S.REVOKED, S.OUT_OF_DATE, S.REVOKED),
        (S.UP_TO_DATE, S.REVOKED, S.REVOKED),
        (S.CONFIGURATION_NEEDED, S.REVOKED, S.REVOKED),
        (S.SW_HARDENING_NEEDED, S.UP_TO_DATE, S.SW_HARDENING_NEEDED),
        (S.CONFIGURATION_NEEDED, S.CONFIGURATION_NEEDED, S.CONFIGURATION_NEEDED),
        (S.UP_TO_DATE, S.OUT_OF_DATE_CONFIGURATION_NEEDED, S.UP_TO_DATE),
    ],
)
def test_converge_table(platform: TcbStatus, qe: TcbStatus, expected: TcbStatus) -> None:
    assert converge(platform, [qe]) is expected


def test_converge_revoked_wins_over_out_of_date() -> None:
    assert converge(S.UP_TO_DATE, [S.OUT_OF_DATE, S.REVOKED]) is S.REVOKED
    assert converge(S.CONFIGURATION_NEEDED, []) is S.CONFIGURATION_NEEDED


# --------------------------------------------------------------------------- SGX levels


@pytest.mark.parametrize("status", ALL_STATUSES)
def test_every_platform_status_is_reachable(pki: TestPki, status: TcbStatus) -> None:
    tcb = tcb_info_body(levels=[tcb_level(status=status.value)])
    assert status_of(pki, tcb=tcb) is status


@pytest.mark.parametrize(
    ("platform_status", "qe_status", "expected"),
    [
        ("UpToDate", "OutOfDate", S.OUT_OF_DATE),
        ("SWHardeningNeeded", "OutOfDate", S.OUT_OF_DATE),
        ("ConfigurationNeeded", "OutOfDate", S.OUT_OF_DATE_CONFIGURATION_NEEDED),
        ("ConfigurationAndSWHardeningNeeded", "OutOfDate", S.OUT_OF_DATE_CONFIGURATION_NEEDED),
        ("UpToDate", "Revoked", S.REVOKED),
        ("SWHardeningNeeded", "UpToDate", S.SW_HARDENING_NEEDED),
        ("UpToDate", "ConfigurationNeeded", S.UP_TO_DATE),
    ],
)
def test_qe_status_converges(
    pki: TestPki, platform_status: str, qe_status: str, expected: TcbStatus
) -> None:
    tcb = tcb_info_body(levels=[tcb_level(status=platform_status)])
    qe_body = qe_identity_body(levels=[isv_level(8, qe_status)])
    _, result = run(pki, tcb=tcb, qe_body=qe_body)
    assert result.status is expected
    assert result.qe_status is TcbStatus(qe_status)
    assert result.platform_status is TcbStatus(platform_status)


def test_unsupported_qe_status(pki: TestPki) -> None:
    report, result = run(pki, qe_body=qe_identity_body(levels=[isv_level(8, "SWHardeningNeeded")]))
    assert result.outcome is TcbOutcome.FAILED and result.status is None
    assert "unsupported QE" in report.step("tcb_level").detail


def test_advisories_merge_and_earliest_date(pki: TestPki) -> None:
    tcb = tcb_info_body(
        levels=[
            tcb_level(status="SWHardeningNeeded", advisory_ids=["INTEL-SA-00615", "INTEL-SA-00657"])
        ]
    )
    qe_body = qe_identity_body(
        levels=[
            isv_level(
                8,
                "OutOfDate",
                date="2023-02-15T00:00:00Z",
                advisory_ids=["INTEL-SA-00657", "INTEL-SA-00700"],
            )
        ]
    )
    _, result = run(pki, tcb=tcb, qe_body=qe_body)
    assert result.status is S.OUT_OF_DATE
    assert result.advisory_ids == ("INTEL-SA-00615", "INTEL-SA-00657", "INTEL-SA-00700")
    assert result.tcb_date == "2023-02-15T00:00:00Z"
    assert result.matched


def test_first_matching_level_newest_date_first(pki: TestPki) -> None:
    levels = [
        tcb_level(sgx=(1,) * 16, status="OutOfDate", date="2022-01-01T00:00:00Z"),
        tcb_level(sgx=(3,) * 16, status="UpToDate", date="2024-01-01T00:00:00Z"),
        tcb_level(sgx=(2,) * 16, status="SWHardeningNeeded", date="2023-01-01T00:00:00Z"),
    ]
    tcb = tcb_info_body(levels=levels)
    assert status_of(pki, tcb=tcb) is S.SW_HARDENING_NEEDED
    high = dataclasses.replace(SGX, sgx_tcb_components=(3,) * 16)
    assert status_of(pki, tcb=tcb, platform=high) is S.UP_TO_DATE
    low = dataclasses.replace(SGX, sgx_tcb_components=(1,) * 16)
    assert status_of(pki, tcb=tcb, platform=low) is S.OUT_OF_DATE


def test_every_component_must_reach_the_level(pki: TestPki) -> None:
    levels = [
        tcb_level(sgx=(2,) * 15 + (5,), status="UpToDate", date="2024-01-01T00:00:00Z"),
        tcb_level(sgx=(0,) * 16, status="OutOfDate", date="2020-01-01T00:00:00Z"),
    ]
    assert status_of(pki, tcb=tcb_info_body(levels=levels)) is S.OUT_OF_DATE


def test_pce_svn_must_reach_the_level(pki: TestPki) -> None:
    levels = [
        tcb_level(pcesvn=14, status="UpToDate", date="2024-01-01T00:00:00Z"),
        tcb_level(pcesvn=13, status="ConfigurationNeeded", date="2023-01-01T00:00:00Z"),
    ]
    assert status_of(pki, tcb=tcb_info_body(levels=levels)) is S.CONFIGURATION_NEEDED


def test_no_matching_level(pki: TestPki) -> None:
    tcb = tcb_info_body(levels=[tcb_level(sgx=(9,) * 16)])
    report, result = run(pki, tcb=tcb)
    assert result.outcome is TcbOutcome.NO_MATCH
    assert result.status is None and not result.matched
    step = report.step("tcb_level")
    assert step.status is StepStatus.FAILED and "no matching TCB level" in step.detail
    with pytest.raises(EvidenceError, match="no matching TCB level"):
        report.raise_for_failure()


def test_no_matching_qe_level(pki: TestPki) -> None:
    _, result = run(pki, qe_body=qe_identity_body(levels=[isv_level(9)]))
    assert result.outcome is TcbOutcome.NO_MATCH
    assert "QE" in result.detail


def test_qe_level_by_isvsvn(pki: TestPki) -> None:
    levels = [isv_level(6, "OutOfDate"), isv_level(8, "UpToDate"), isv_level(2, "Revoked")]
    assert status_of(pki, qe_body=qe_identity_body(levels=levels)) is S.UP_TO_DATE
    assert (
        status_of(
            pki, qe_body=qe_identity_body(levels=levels), qe=dataclasses.replace(QE, isv_svn=7)
        )
        is S.OUT_OF_DATE
    )
    assert (
        status_of(
            pki, qe_body=qe_identity_body(levels=levels), qe=dataclasses.replace(QE, isv_svn=5)
        )
        is S.REVOKED
    )


def test_v2_tcb_info(pki: TestPki) -> None:
    tcb = tcb_info_body(version=2, levels=[tcb_level(version=2, status="ConfigurationNeeded")])
    assert status_of(pki, tcb=tcb) is S.CONFIGURATION_NEEDED


def test_without_qe_identity(pki: TestPki) -> None:
    report, result = run(pki, no_qe=True)
    assert report.step("qe_identity_match").status is StepStatus.NOT_CHECKED
    assert result.status is S.UP_TO_DATE and result.qe_status is None


# --------------------------------------------------------------------------- what must match


@pytest.mark.parametrize(
    ("kw", "step", "text"),
    [
        ({"tcb": tcb_info_body(fmspc="00906ed50001")}, "tcb_info_match", "fmspc"),
        ({"tcb": tcb_info_body(pce_id="0001")}, "tcb_info_match", "pceId"),
        ({"tcb": tcb_info_body(tee="tdx")}, "tcb_info_match", "TDX"),
        ({"qe_body": qe_identity_body(mrsigner="00" * 32)}, "qe_identity_match", "mrsigner"),
        ({"qe_body": qe_identity_body(isvprodid=2)}, "qe_identity_match", "isvprodid"),
        ({"qe_body": qe_identity_body(miscselect="00000001")}, "qe_identity_match", "miscselect"),
        (
            {"qe_body": qe_identity_body(attributes="13" + "00" * 15)},
            "qe_identity_match",
            "attributes",
        ),
        ({"qe_body": qe_identity_body(ident="TD_QE")}, "qe_identity_match", "TD_QE"),
        ({"qe_body": qe_identity_body(ident="QVE")}, "qe_identity_match", "QVE"),
    ],
)
def test_sgx_mismatches_fail(pki: TestPki, kw: dict[str, Any], step: str, text: str) -> None:
    report, result = run(pki, **kw)
    assert report.step(step).status is StepStatus.FAILED
    assert text in report.step(step).detail
    assert report.step("tcb_level").status is StepStatus.SKIPPED
    assert result.outcome is TcbOutcome.FAILED and result.status is None


def test_qe_fields_are_compared_under_the_mask(pki: TestPki) -> None:
    # Bit 2 of attributes byte 0 is outside the mask (FB); MISCSELECT bits outside a zero mask.
    qe = dataclasses.replace(
        QE, attributes=bytes.fromhex("15" + "00" * 7 + "ff" * 8), misc_select=5
    )
    qe_body = qe_identity_body(miscselect_mask="00000000")
    assert status_of(pki, qe=qe, qe_body=qe_body) is S.UP_TO_DATE


def test_tdx_tcb_info_with_v2_for_tdx_fails(pki: TestPki) -> None:
    report, _ = run(
        pki, tee="tdx", platform=TDX, tcb=tcb_info_body(version=2, levels=[tcb_level(version=2)])
    )
    assert report.step("tcb_info_match").status is StepStatus.FAILED


def test_sgx_tcb_info_for_tdx_fails(pki: TestPki) -> None:
    report, _ = run(pki, tee="tdx", platform=TDX, tcb=tcb_info_body())
    assert "the quote is TDX" in report.step("tcb_info_match").detail


# --------------------------------------------------------------------------- TDX


def tdx_svns(v: int) -> tuple[int, ...]:
    """TDX component SVNs as a TDX 1.0 module reports them: index 1 (the module major) is 0."""
    return (v, 0) + (v,) * 14


def tdx_run(
    pki: TestPki, platform: PlatformTcb = TDX, **kw: Any
) -> tuple[VerificationReport, TcbEvaluation]:
    return run(pki, tee="tdx", platform=platform, **kw)


def with_module(major: int, minor: int, **kw: Any) -> PlatformTcb:
    assert TDX.tee_tcb_svn is not None
    return dataclasses.replace(TDX, tee_tcb_svn=bytes([minor, major]) + TDX.tee_tcb_svn[2:], **kw)


def test_tdx_module_major_zero_uses_tdx_module(pki: TestPki) -> None:
    report, result = tdx_run(pki)
    assert report.verified, report.to_list()
    assert report.step("tdx_module_match").status is StepStatus.PASSED
    assert result.status is S.UP_TO_DATE and result.module_status is None


def test_tdx_module_major_zero_mrsigner_mismatch(pki: TestPki) -> None:
    tcb = tcb_info_body(tee="tdx", tdx_module_body=tdx_module(mrsigner="11" * 48))
    report, _ = tdx_run(pki, tcb=tcb)
    assert "MRSIGNERSEAM" in report.step("tdx_module_match").detail


@pytest.mark.parametrize(
    ("module_status", "platform_status", "expected"),
    [
        ("UpToDate", "UpToDate", S.UP_TO_DATE),
        ("OutOfDate", "UpToDate", S.OUT_OF_DATE),
        ("OutOfDate", "ConfigurationNeeded", S.OUT_OF_DATE_CONFIGURATION_NEEDED),
        ("Revoked", "UpToDate", S.REVOKED),
        ("UpToDate", "SWHardeningNeeded", S.SW_HARDENING_NEEDED),
    ],
)
def test_tdx_module_identity_status(
    pki: TestPki, module_status: str, platform_status: str, expected: TcbStatus
) -> None:
    ident = module_identity(
        "TDX_03",
        [
            isv_level(5, "UpToDate", advisory_ids=["INTEL-SA-01111"]),
            isv_level(
                2, module_status, date="2023-06-01T00:00:00Z", advisory_ids=["INTEL-SA-01000"]
            ),
        ],
    )
    tcb = tcb_info_body(
        tee="tdx",
        levels=[tcb_level(tdx=(3,) * 16, status=platform_status, advisory_ids=["INTEL-SA-00900"])],
        module_identities=[module_identity("TDX_01"), ident],
    )
    report, result = tdx_run(pki, platform=with_module(3, 2), tcb=tcb)
    assert report.verified, report.to_list()
    assert result.status is expected
    assert result.module_status is TcbStatus(module_status)
    assert result.advisory_ids == ("INTEL-SA-00900", "INTEL-SA-01000")
    assert result.tcb_date == "2023-06-01T00:00:00Z"


def test_tdx_module_level_is_the_highest_not_above_the_minor_svn(pki: TestPki) -> None:
    ident = module_identity("TDX_03", [isv_level(5, "UpToDate"), isv_level(2, "OutOfDate")])
    tcb = tcb_info_body(tee="tdx", levels=[tcb_level(tdx=(3,) * 16)], module_identities=[ident])
    assert tdx_run(pki, platform=with_module(3, 6), tcb=tcb)[1].status is S.UP_TO_DATE
    assert tdx_run(pki, platform=with_module(3, 4), tcb=tcb)[1].status is S.OUT_OF_DATE
    _, result = tdx_run(pki, platform=with_module(3, 1), tcb=tcb)
    assert result.outcome is TcbOutcome.NO_MATCH and "TDX_03" in result.detail


def test_tdx_module_identity_missing(pki: TestPki) -> None:
    tcb = tcb_info_body(tee="tdx", module_identities=[module_identity("TDX_01")])
    report, result = tdx_run(pki, platform=with_module(2, 0), tcb=tcb)
    assert "no TDX module identity TDX_02" in report.step("tdx_module_match").detail
    assert result.status is None


def test_tdx_module_identity_mrsigner_and_attributes(pki: TestPki) -> None:
    ident = module_identity(
        "TDX_01",
        mrsigner="22" * 48,
        attributes="0000000000000001",
        attributes_mask="00000000000000FF",
    )
    tcb = tcb_info_body(tee="tdx", module_identities=[ident])
    good = with_module(1, 0, mr_signer_seam=b"\x22" * 48, seam_attributes=bytes(7) + b"\x01")
    assert tdx_run(pki, platform=good, tcb=tcb)[1].status is S.UP_TO_DATE
    # Bits outside the mask do not matter.
    masked = dataclasses.replace(good, seam_attributes=b"\xff" * 7 + b"\x01")
    assert tdx_run(pki, platform=masked, tcb=tcb)[1].status is S.UP_TO_DATE
    bad_attr = dataclasses.replace(good, seam_attributes=bytes(8))
    assert (
        "SEAMATTRIBUTES"
        in tdx_run(pki, platform=bad_attr, tcb=tcb)[0].step("tdx_module_match").detail
    )
    bad_signer = dataclasses.replace(good, mr_signer_seam=bytes(48))
    assert (
        "MRSIGNERSEAM"
        in tdx_run(pki, platform=bad_signer, tcb=tcb)[0].step("tdx_module_match").detail
    )


def test_tdx_components_select_the_level(pki: TestPki) -> None:
    levels = [
        tcb_level(tdx=tdx_svns(4), status="UpToDate", date="2024-06-01T00:00:00Z"),
        tcb_level(tdx=tdx_svns(3), status="OutOfDate", date="2024-01-01T00:00:00Z"),
    ]
    tcb = tcb_info_body(tee="tdx", levels=levels)
    assert tdx_run(pki, tcb=tcb)[1].status is S.OUT_OF_DATE
    up = dataclasses.replace(TDX, tee_tcb_svn=bytes(tdx_svns(4)))
    assert tdx_run(pki, platform=up, tcb=tcb)[1].status is S.UP_TO_DATE
    low = dataclasses.replace(TDX, tee_tcb_svn=bytes(tdx_svns(2)))
    assert tdx_run(pki, platform=low, tcb=tcb)[1].outcome is TcbOutcome.NO_MATCH


def test_tdx_components_skip_the_module_svns_when_a_module_major_is_set(pki: TestPki) -> None:
    # TEE TCB SVN[0..1] (module minor, major) are judged by the module identity, not the level.
    levels = [tcb_level(tdx=[9, 9] + [3] * 14)]
    ident = module_identity("TDX_01", [isv_level(0)])
    tcb = tcb_info_body(tee="tdx", levels=levels, module_identities=[ident])
    assert tdx_run(pki, platform=with_module(1, 0), tcb=tcb)[1].status is S.UP_TO_DATE
    assert tdx_run(pki, platform=with_module(0, 0), tcb=tcb)[1].outcome is TcbOutcome.NO_MATCH


def test_tdx_with_td_qe_identity_required(pki: TestPki) -> None:
    report, _ = tdx_run(pki, qe_body=qe_identity_body(ident="QE"))
    assert "TD_QE" in report.step("qe_identity_match").detail


def test_tdx_qe_out_of_date_and_module_out_of_date(pki: TestPki) -> None:
    ident = module_identity("TDX_01", [isv_level(0, "OutOfDate")])
    tcb = tcb_info_body(
        tee="tdx",
        levels=[tcb_level(tdx=(3,) * 16, status="ConfigurationNeeded")],
        module_identities=[ident],
    )
    qe_body = qe_identity_body(ident="TD_QE", levels=[isv_level(8, "OutOfDate")])
    _, result = tdx_run(pki, platform=with_module(1, 0), tcb=tcb, qe_body=qe_body)
    assert result.status is S.OUT_OF_DATE_CONFIGURATION_NEEDED


# --------------------------------------------------------------------------- inputs


def test_no_collateral_is_unknown(pki: TestPki) -> None:
    from ppml.attestation.collateral import Collateral

    report, result = evaluate(Collateral(), SGX, QE, root=pki.root, at=AT, tee="sgx")
    assert result.status is TcbStatus.UNKNOWN and result.outcome is TcbOutcome.NO_COLLATERAL
    assert not result.matched
    assert report.step("tcb_level").status is StepStatus.NOT_CHECKED


@pytest.mark.parametrize(
    "make",
    [
        lambda: dataclasses.replace(SGX, fmspc=b"\x00" * 5),
        lambda: dataclasses.replace(SGX, sgx_tcb_components=(2,) * 15),
        lambda: dataclasses.replace(SGX, sgx_tcb_components=(256,) + (2,) * 15),
        lambda: dataclasses.replace(SGX, pce_svn=-1),
        lambda: dataclasses.replace(SGX, tee_tcb_svn=bytes(16)),
        lambda: dataclasses.replace(QE, mr_signer=bytes(31)),
        lambda: dataclasses.replace(QE, misc_select=1 << 32),
    ],
)
def test_input_validation(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(EvidenceError):
        make()


def test_tee_and_platform_must_agree(pki: TestPki) -> None:
    from ppml.attestation.collateral import Collateral

    with pytest.raises(EvidenceError, match="TDX needs"):
        evaluate(Collateral(), SGX, QE, root=pki.root, at=AT, tee="tdx")
    with pytest.raises(EvidenceError, match="unsupported TEE"):
        evaluate(Collateral(), SGX, QE, root=pki.root, at=AT, tee="snp")  # type: ignore[arg-type]
    with pytest.raises(EvidenceError, match="timezone"):
        evaluate(Collateral(), SGX, QE, root=pki.root, at=AT.replace(tzinfo=None), tee="sgx")
