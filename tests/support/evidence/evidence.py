"""Synthetic Intel PCS collateral that matches a synthetic quote: the TCB info, QE identity and
CRLs of `tests.support.evidence.intel_collateral`, signed under the same test root as an
`IntelTestPki`, with TCB levels that the PKI's PCK certificate and QE report reach. Nothing here
is trusted by any verifier by default.

Typical use::

    pki = IntelTestPki.create(seed=1)
    files = matching_collateral(pki, status="OutOfDate", advisory_ids=["INTEL-SA-00001"])
    write_files(tmp_path / "collateral", files)
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence

from cryptography.hazmat.primitives import serialization
from tests.support.evidence.intel import IntelTestPki, derived_key, qe_report_body
from tests.support.evidence.intel_collateral import (
    TestPki,
    build_files,
    isv_level,
    make_cert,
    make_crl,
    qe_identity_body,
    tcb_info_body,
    tcb_level,
)

__all__ = ["COLLATERAL_ISSUED", "COLLATERAL_NEXT_UPDATE", "matching_collateral", "root_pem"]

COLLATERAL_ISSUED = _dt.datetime(2025, 1, 1, tzinfo=_dt.UTC)
COLLATERAL_NEXT_UPDATE = _dt.datetime(2026, 6, 1, tzinfo=_dt.UTC)


def matching_collateral(
    pki: IntelTestPki,
    *,
    tee: str = "sgx",
    status: str = "UpToDate",
    advisory_ids: Sequence[str] | None = None,
    qe_status: str = "UpToDate",
    issue_date: _dt.datetime = COLLATERAL_ISSUED,
    next_update: _dt.datetime = COLLATERAL_NEXT_UPDATE,
    match: bool = True,
) -> dict[str, bytes]:
    """The files of a collateral directory for quotes made with `pki` (and the default QE
    report): one TCB level with `status` (one the platform does not reach when `match` is
    False), a QE identity level with `qe_status`, and CRLs, all current from `issue_date` to
    `next_update`."""
    signing_key = derived_key(0, "tcb-signing")
    signing = make_cert(
        "Test SGX TCB Signing",
        signing_key,
        issuer=pki.root_cert,
        issuer_key=pki.root_key,
        ca=False,
    )
    test_pki = TestPki(pki.root_key, pki.root_cert, signing_key, signing, pki.ca_key, pki.ca_cert)
    ext = pki.pck_extensions
    sgx = tuple(ext.sgx_tcb_components)
    if not match:
        sgx = tuple(c + 1 for c in sgx[:1]) + sgx[1:]
    tdx = (3, 0, 5) + (0,) * 13 if tee == "tdx" else None
    level = tcb_level(
        sgx=sgx,
        pcesvn=ext.pce_svn,
        tdx=tdx,
        status=status,
        advisory_ids=advisory_ids,
    )
    tcb = tcb_info_body(
        tee=tee,
        fmspc=ext.fmspc.hex(),
        pce_id=ext.pce_id.hex(),
        levels=[level],
        issue_date=issue_date,
        next_update=next_update,
    )
    qe = qe_report_body()
    qe_identity = qe_identity_body(
        ident="TD_QE" if tee == "tdx" else "QE",
        mrsigner=qe.mr_signer.hex().upper(),
        isvprodid=qe.isv_prod_id,
        levels=[isv_level(qe.isv_svn, qe_status)],
        issue_date=issue_date,
        next_update=next_update,
    )
    return build_files(
        test_pki,
        tcb_info=tcb,
        qe_identity=qe_identity,
        pck_crl=make_crl(pki.ca_cert, pki.ca_key, last_update=issue_date, next_update=next_update),
        root_ca_crl=make_crl(
            pki.root_cert, pki.root_key, last_update=issue_date, next_update=next_update
        ),
    )


def root_pem(pki: IntelTestPki) -> bytes:
    """The PKI's root certificate, PEM."""
    return pki.root_cert.public_bytes(serialization.Encoding.PEM)
