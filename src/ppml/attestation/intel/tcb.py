"""TCB evaluation for Intel SGX and TDX quotes, by Intel's algorithm, from verified collateral.

The platform's TCB (the PCK certificate's SVNs and, for TDX, the TD report's TEE TCB SVN) is
matched against the TCB info's levels, the QE against the QE identity, and the TDX module
against its module identity; the statuses found are merged by Intel's convergence rules:

- the platform level gives the base status;
- a component (the QE, the TDX module) that is ``OutOfDate`` turns ``UpToDate`` and
  ``SWHardeningNeeded`` into ``OutOfDate``, and ``ConfigurationNeeded`` and
  ``ConfigurationAndSWHardeningNeeded`` into ``OutOfDateConfigurationNeeded``;
- a component that is ``Revoked`` makes the result ``Revoked``;
- the advisory ids are the platform's, then the QE's, then the module's; the TCB date is the
  earliest of the matched levels' dates.

A platform no level matches gets no status at all: the outcome is ``no_match``, which no policy
can accept. Without TCB info the status is ``Unknown``.
"""

from __future__ import annotations

import datetime as _dt
import enum
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from cryptography import x509

from ppml.attestation.claims import TcbStatus, TeeType
from ppml.attestation.collateral.models import Collateral
from ppml.attestation.intel.collateral import (
    IsvTcbLevel,
    SignedEnclaveIdentity,
    TcbInfo,
    TcbLevel,
    format_pcs_date,
)
from ppml.attestation.intel.verified import CollateralCache, VerifiedCollateral, verify_collateral
from ppml.attestation.steps import Step, StepRunner, StepStatus, VerificationReport
from ppml.errors import EvidenceError

__all__ = [
    "PlatformTcb",
    "QeReportInfo",
    "TcbEvaluation",
    "TcbOutcome",
    "converge",
    "evaluate",
    "select_isv_level",
    "select_tcb_level",
]

_S = TcbStatus
# Statuses Intel accepts in a QE identity level and in a TDX module identity level.
_QE_STATUSES = frozenset(
    {
        _S.UP_TO_DATE,
        _S.OUT_OF_DATE,
        _S.CONFIGURATION_NEEDED,
        _S.REVOKED,
        _S.OUT_OF_DATE_CONFIGURATION_NEEDED,
    }
)
_MODULE_STATUSES = frozenset({_S.UP_TO_DATE, _S.OUT_OF_DATE, _S.REVOKED})
_QE_ID = {TeeType.SGX: "QE", TeeType.TDX: "TD_QE"}


def _fixed(value: object, size: int, name: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        raise EvidenceError(f"platform TCB: {name} must be {size} bytes")
    return value


def _uint(value: object, maximum: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise EvidenceError(f"platform TCB: {name} must be an integer in 0..{maximum}")
    return value


@dataclass(frozen=True, slots=True)
class PlatformTcb:
    """The platform's TCB as the quote and its PCK certificate state it."""

    fmspc: bytes  # 6 bytes
    pce_id: bytes  # 2 bytes
    sgx_tcb_components: tuple[int, ...]  # 16 SVNs
    pce_svn: int
    tee_tcb_svn: bytes | None = None  # TDX: 16 bytes from the TD report
    mr_signer_seam: bytes | None = None  # TDX: 48 bytes
    seam_attributes: bytes | None = None  # TDX: 8 bytes

    def __post_init__(self) -> None:
        _fixed(self.fmspc, 6, "fmspc")
        _fixed(self.pce_id, 2, "pce_id")
        comps = self.sgx_tcb_components
        if not isinstance(comps, tuple) or len(comps) != 16:
            raise EvidenceError("platform TCB: sgx_tcb_components must be a tuple of 16 SVNs")
        for svn in comps:
            _uint(svn, 255, "an SGX TCB component SVN")
        _uint(self.pce_svn, 0xFFFF, "pce_svn")
        tdx = (self.tee_tcb_svn, self.mr_signer_seam, self.seam_attributes)
        if any(v is not None for v in tdx):
            _fixed(self.tee_tcb_svn, 16, "tee_tcb_svn")
            _fixed(self.mr_signer_seam, 48, "mr_signer_seam")
            _fixed(self.seam_attributes, 8, "seam_attributes")

    @property
    def is_tdx(self) -> bool:
        return self.tee_tcb_svn is not None


@dataclass(frozen=True, slots=True)
class QeReportInfo:
    """What the quoting enclave's report says about the QE."""

    mr_signer: bytes  # 32 bytes
    isv_prod_id: int
    isv_svn: int
    misc_select: int  # the report's MISCSELECT as an integer
    attributes: bytes  # 16 bytes

    def __post_init__(self) -> None:
        _fixed(self.mr_signer, 32, "QE mr_signer")
        _fixed(self.attributes, 16, "QE attributes")
        _uint(self.isv_prod_id, 0xFFFF, "QE isv_prod_id")
        _uint(self.isv_svn, 0xFFFF, "QE isv_svn")
        _uint(self.misc_select, 0xFFFFFFFF, "QE misc_select")


class TcbOutcome(enum.StrEnum):
    EVALUATED = "evaluated"  # a status was determined (it may still be Revoked)
    NO_MATCH = "no_match"  # no TCB level matches: no status, never acceptable
    NO_COLLATERAL = "no_collateral"  # no TCB info: status Unknown
    FAILED = "failed"  # collateral did not verify or does not belong to this platform


@dataclass(frozen=True, slots=True)
class TcbEvaluation:
    """The result of a TCB evaluation. `status` is set only when the outcome is ``evaluated``
    (the merged status) or ``no_collateral`` (``Unknown``)."""

    outcome: TcbOutcome
    status: TcbStatus | None
    advisory_ids: tuple[str, ...] = ()
    tcb_date: str | None = None
    platform_status: TcbStatus | None = None
    qe_status: TcbStatus | None = None
    module_status: TcbStatus | None = None
    tcb_evaluation_data_number: int | None = None
    notes: tuple[str, ...] = field(default=())  # outdated collateral that was allowed
    detail: str = ""

    @property
    def matched(self) -> bool:
        return self.outcome is TcbOutcome.EVALUATED


def converge(platform: TcbStatus, components: Iterable[TcbStatus]) -> TcbStatus:
    """Merge the platform level's status with the components' (QE, TDX module) statuses."""
    found = set(components)
    result = platform
    if _S.OUT_OF_DATE in found:
        if platform in (_S.UP_TO_DATE, _S.SW_HARDENING_NEEDED):
            result = _S.OUT_OF_DATE
        elif platform in (_S.CONFIGURATION_NEEDED, _S.CONFIGURATION_AND_SW_HARDENING_NEEDED):
            result = _S.OUT_OF_DATE_CONFIGURATION_NEEDED
    if _S.REVOKED in found:
        result = _S.REVOKED
    return result


def _all_at_least(have: Sequence[int], levels: Sequence[int]) -> bool:
    return all(h >= lv for h, lv in zip(have, levels, strict=True))


def select_tcb_level(tcb_info: TcbInfo, platform: PlatformTcb) -> TcbLevel | None:
    """The first level, newest TCB date first (ties in the order Intel lists them), whose 16
    SGX SVNs and PCE SVN the platform's all reach; for TDX TCB info also the TDX SVNs (from
    index 2 when the TDX module's major version, TEE TCB SVN[1], is not 0)."""
    levels = sorted(tcb_info.tcb_levels, key=lambda lv: lv.tcb_date, reverse=True)
    tee_svn = platform.tee_tcb_svn
    for level in levels:
        if not _all_at_least(platform.sgx_tcb_components, level.sgx_svns):
            continue
        if platform.pce_svn < level.pce_svn:
            continue
        if tcb_info.id == "TDX":
            tdx = level.tdx_svns
            if tee_svn is None or tdx is None:
                continue
            start = 2 if tee_svn[1] > 0 else 0
            if not _all_at_least(tee_svn[start:], tdx[start:]):
                continue
        return level
    return None


def select_isv_level(levels: Sequence[IsvTcbLevel], isv_svn: int) -> IsvTcbLevel | None:
    """The level with the highest ISV SVN not above `isv_svn`."""
    for level in sorted(levels, key=lambda lv: lv.isv_svn, reverse=True):
        if level.isv_svn <= isv_svn:
            return level
    return None


def _masked_equal(value: bytes, mask: bytes, expected: bytes) -> bool:
    if not len(value) == len(mask) == len(expected):
        return False
    return hmac.compare_digest(bytes(a & b for a, b in zip(value, mask, strict=True)), expected)


# --------------------------------------------------------------------------- evaluation


def _tcb_info_match(info: TcbInfo, platform: PlatformTcb, tee: TeeType) -> str | None:
    if tee is TeeType.TDX and not (info.version >= 3 and info.id == "TDX"):
        return f"TCB info is for {info.id} (version {info.version}), the quote is TDX"
    if tee is TeeType.SGX and info.id != "SGX":
        return f"TCB info is for {info.id}, the quote is SGX"
    if not hmac.compare_digest(info.fmspc, platform.fmspc):
        return f"TCB info fmspc {info.fmspc.hex()} is not the platform's {platform.fmspc.hex()}"
    if not hmac.compare_digest(info.pce_id, platform.pce_id):
        return f"TCB info pceId {info.pce_id.hex()} is not the platform's {platform.pce_id.hex()}"
    return None


def _qe_match(signed: SignedEnclaveIdentity, qe: QeReportInfo, tee: TeeType) -> str | None:
    ident = signed.body
    if ident.id != _QE_ID[tee]:
        return f"QE identity is for {ident.id}, a {tee.value} quote needs {_QE_ID[tee]}"
    if not hmac.compare_digest(ident.mr_signer, qe.mr_signer):
        return "QE mrsigner does not match the QE identity"
    if ident.isv_prod_id != qe.isv_prod_id:
        return f"QE isvprodid {qe.isv_prod_id} is not the identity's {ident.isv_prod_id}"
    if qe.misc_select & ident.miscselect_mask != ident.miscselect:
        return "QE miscselect under the identity's mask does not match"
    if not _masked_equal(qe.attributes, ident.attributes_mask, ident.attributes):
        return "QE attributes under the identity's mask do not match"
    return None


def _module_match(info: TcbInfo, platform: PlatformTcb) -> str | None:
    assert platform.tee_tcb_svn is not None
    assert platform.mr_signer_seam is not None and platform.seam_attributes is not None
    major = platform.tee_tcb_svn[1]
    if major > 0:
        wanted = f"TDX_{major:02X}"
        found = [i for i in info.tdx_module_identities if i.id.upper() == wanted]
        if not found:
            return f"TCB info has no TDX module identity {wanted}"
        signer, attrs, mask = found[0].mr_signer, found[0].attributes, found[0].attributes_mask
    else:
        if info.tdx_module is None:
            return "TCB info has no tdxModule"
        m = info.tdx_module
        signer, attrs, mask = m.mr_signer, m.attributes, m.attributes_mask
    if not hmac.compare_digest(signer, platform.mr_signer_seam):
        return "MRSIGNERSEAM does not match the TDX module identity"
    if not _masked_equal(platform.seam_attributes, mask, attrs):
        return "SEAMATTRIBUTES under the module's mask do not match"
    return None


@dataclass
class _Levels:
    platform: TcbLevel | None = None
    module: IsvTcbLevel | None = None
    qe: IsvTcbLevel | None = None
    missing: str = ""


def _select(
    info: TcbInfo,
    qe_ident: SignedEnclaveIdentity | None,
    platform: PlatformTcb,
    qe: QeReportInfo,
    tee: TeeType,
) -> _Levels:
    out = _Levels(platform=select_tcb_level(info, platform))
    if out.platform is None:
        out.missing = "no TCB level of the TCB info matches the platform's TCB"
        return out
    if tee is TeeType.TDX:
        assert platform.tee_tcb_svn is not None
        major, minor = platform.tee_tcb_svn[1], platform.tee_tcb_svn[0]
        if major > 0:
            wanted = f"TDX_{major:02X}"
            ident = next(i for i in info.tdx_module_identities if i.id.upper() == wanted)
            out.module = select_isv_level(ident.tcb_levels, minor)
            if out.module is None:
                out.missing = f"no TCB level of TDX module identity {wanted} matches SVN {minor}"
                return out
    if qe_ident is not None:
        out.qe = select_isv_level(qe_ident.body.tcb_levels, qe.isv_svn)
        if out.qe is None:
            out.missing = f"no TCB level of the QE identity matches QE isvsvn {qe.isv_svn}"
    return out


def _tee_of(tee: str, platform: object, qe: object, at: _dt.datetime) -> TeeType:
    try:
        tee_type = TeeType(tee)
    except ValueError:
        raise EvidenceError(f"TCB evaluation: unsupported TEE {str(tee)[:20]!r}") from None
    if tee_type not in (TeeType.SGX, TeeType.TDX):
        raise EvidenceError(f"TCB evaluation: unsupported TEE {tee_type.value!r}")
    if not isinstance(platform, PlatformTcb) or not isinstance(qe, QeReportInfo):
        raise EvidenceError("TCB evaluation: platform and QE must be PlatformTcb and QeReportInfo")
    if (tee_type is TeeType.TDX) != platform.is_tdx:
        raise EvidenceError(
            "TCB evaluation: TDX needs tee_tcb_svn, mr_signer_seam, seam_attributes"
        )
    if at.tzinfo is None:
        raise EvidenceError("TCB evaluation: the time `at` must be timezone-aware")
    return tee_type


def evaluate(
    collateral: Collateral,
    platform: PlatformTcb,
    qe: QeReportInfo,
    *,
    root: x509.Certificate,
    at: _dt.datetime,
    tee: Literal["sgx", "tdx"] | TeeType,
    allow_outdated: bool = False,
    cache: CollateralCache | None = None,
) -> tuple[VerificationReport, TcbEvaluation]:
    """Verify `collateral` up to `root` at time `at` and evaluate the platform's TCB status.

    Steps: ``root_ca_crl_signature``/``_fresh``, ``pck_crl_signature``/``_fresh``,
    ``tcb_info_signature``/``_fresh``, ``qe_identity_signature``/``_fresh``,
    ``issuer_revocation``, ``tcb_info_match``, ``qe_identity_match``, ``tdx_module_match``
    (TDX), ``tcb_level``. Outdated collateral fails unless `allow_outdated`, in which case it
    is noted in the step's detail and in `TcbEvaluation.notes`. `cache` keeps the collateral's
    own verification (`verify_collateral`)."""
    tee_type = _tee_of(tee, platform, qe, at)
    verified = verify_collateral(
        collateral, root=root, at=at, allow_outdated=allow_outdated, cache=cache
    )
    run = StepRunner()
    run.extend(verified.steps)
    deps = _match_steps(run, verified, platform, qe, tee_type)
    return _finish(run, verified, platform, qe, tee_type, deps)


def _match_steps(
    run: StepRunner,
    verified: VerifiedCollateral,
    platform: PlatformTcb,
    qe: QeReportInfo,
    tee_type: TeeType,
) -> list[str]:
    """The ``*_match`` steps; returns the steps the TCB level depends on. A match whose
    document did not verify is skipped (its signature step failed)."""
    info = verified.tcb_info.body if verified.tcb_info is not None else None
    qe_signed = verified.qe_identity

    def tcb_match() -> str | None:
        assert info is not None
        return _tcb_info_match(info, platform, tee_type)

    def qe_match() -> str | None:
        assert qe_signed is not None
        return _qe_match(qe_signed, qe, tee_type)

    def module_match() -> str | None:
        assert info is not None
        return _module_match(info, platform)

    deps = ["tcb_info_signature", "tcb_info_fresh", "tcb_info_match"]
    no_tcb_info = "no TCB info given"
    matches = [
        ("tcb_info_match", verified.has_tcb_info, no_tcb_info, tcb_match, deps[:1]),
        (
            "qe_identity_match",
            verified.has_qe_identity,
            "no QE identity given",
            qe_match,
            ["qe_identity_signature"],
        ),
    ]
    if tee_type is TeeType.TDX:
        matches.append(("tdx_module_match", verified.has_tcb_info, no_tcb_info, module_match, deps))
    for name, given, absent, check, needs in matches:
        if given:
            run.run(name, check, needs=needs)
        else:
            run.add(Step.not_checked(name, absent))
    return [*deps, "tdx_module_match"] if tee_type is TeeType.TDX else deps


def _finish(
    run: StepRunner,
    verified: VerifiedCollateral,
    platform: PlatformTcb,
    qe: QeReportInfo,
    tee: TeeType,
    deps: list[str],
) -> tuple[VerificationReport, TcbEvaluation]:
    name = "tcb_level"
    note_t = verified.notes
    info = verified.tcb_info.body if verified.tcb_info is not None else None
    qe_signed = verified.qe_identity
    if not verified.has_tcb_info:
        run.add(Step.not_checked(name, "no TCB info given: TCB status Unknown"))
        return _done(run, TcbEvaluation(TcbOutcome.NO_COLLATERAL, _S.UNKNOWN, notes=note_t))
    qe_deps = ["qe_identity_signature", "qe_identity_fresh", "qe_identity_match"]
    blocker = run.blocker(*deps, *qe_deps, "issuer_revocation")
    if blocker is not None or info is None:
        run.add(Step.skipped(name, blocker or "tcb_info_signature"))
        return _done(run, TcbEvaluation(TcbOutcome.FAILED, None, notes=note_t))

    levels = _select(info, qe_signed, platform, qe, tee)
    if levels.missing or levels.platform is None:
        run.add(Step.failed(name, f"no matching TCB level: {levels.missing}"))
        return _done(
            run,
            TcbEvaluation(
                TcbOutcome.NO_MATCH,
                None,
                tcb_evaluation_data_number=info.tcb_evaluation_data_number,
                notes=note_t,
                detail=levels.missing,
            ),
        )
    if levels.qe is not None and levels.qe.status not in _QE_STATUSES:
        run.add(Step.failed(name, f"unsupported QE identity TCB status {levels.qe.status.value}"))
        return _done(run, TcbEvaluation(TcbOutcome.FAILED, None, notes=note_t))
    if levels.module is not None and levels.module.status not in _MODULE_STATUSES:
        run.add(
            Step.failed(name, f"unsupported TDX module TCB status {levels.module.status.value}")
        )
        return _done(run, TcbEvaluation(TcbOutcome.FAILED, None, notes=note_t))

    base = levels.platform
    components = [lv.status for lv in (levels.module, levels.qe) if lv is not None]
    status = converge(base.status, components)
    advisories: list[str] = []
    for lv in (base, levels.qe, levels.module):
        for adv in lv.advisory_ids if lv is not None else ():
            if adv not in advisories:
                advisories.append(adv)
    dates = [lv.tcb_date for lv in (base, levels.qe, levels.module) if lv is not None]
    detail = f"platform {base.status.value}" + "".join(
        f", {what} {lv.status.value}"
        for what, lv in (("QE", levels.qe), ("TDX module", levels.module))
        if lv is not None
    )
    run.add(Step.passed(name, f"{status.value} ({detail})"))
    return _done(
        run,
        TcbEvaluation(
            outcome=TcbOutcome.EVALUATED,
            status=status,
            advisory_ids=tuple(advisories),
            tcb_date=format_pcs_date(min(dates)),
            platform_status=base.status,
            qe_status=levels.qe.status if levels.qe is not None else None,
            module_status=levels.module.status if levels.module is not None else None,
            tcb_evaluation_data_number=info.tcb_evaluation_data_number,
            notes=note_t,
            detail=detail,
        ),
    )


def _done(run: StepRunner, evaluation: TcbEvaluation) -> tuple[VerificationReport, TcbEvaluation]:
    report = run.report()
    if evaluation.outcome in (TcbOutcome.EVALUATED, TcbOutcome.NO_COLLATERAL):
        bad = report.first_failure or next(
            (s for s in report.steps if s.status is StepStatus.SKIPPED), None
        )
        if bad is not None:
            # Any failed step (a CRL, an issuer chain) withholds the status: fail closed.
            evaluation = TcbEvaluation(
                TcbOutcome.FAILED, None, notes=evaluation.notes, detail=f"{bad.name}: {bad.detail}"
            )
    return report, evaluation
