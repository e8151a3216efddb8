"""Verify Intel collateral once: the CRLs, the signed TCB info and QE identity up to the pinned
root, each one's freshness, and that no issuer of them is revoked.

The result (`VerifiedCollateral`) does not depend on the quote, so `verify_collateral` keeps it in
a `VerifiedCache` keyed by the collateral's exact bytes, the root and `allow_outdated`, valid in
the window where every certificate, CRL and document it checked is current: a quote verified at a
time outside that window (a document past its nextUpdate, say) is verified afresh and refused as
it would be without the cache.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from ppml.attestation.cache import VerifiedCache, cache_key, validity_window
from ppml.attestation.collateral.models import INTEL_FILES, Collateral
from ppml.attestation.intel.collateral import (
    RevocationChecker,
    SignedEnclaveIdentity,
    SignedTcbInfo,
    check_freshness,
    parse_crl,
    verify_chain,
    verify_signed_body,
)
from ppml.attestation.steps import Step, StepRunner, StepStatus, VerificationReport
from ppml.attestation.x509_checks import crl_problem
from ppml.errors import EvidenceError

__all__ = ["CollateralCache", "VerifiedCollateral", "verify_collateral", "verify_crls"]


@dataclass(frozen=True, slots=True)
class VerifiedCollateral:
    """The collateral's own steps (CRLs, signatures, freshness, issuer revocation), the signed
    documents that verified, and the notes on outdated parts that were allowed."""

    steps: tuple[Step, ...]
    tcb_info: SignedTcbInfo | None
    qe_identity: SignedEnclaveIdentity | None
    has_tcb_info: bool
    has_qe_identity: bool
    notes: tuple[str, ...]


class CollateralCache(VerifiedCache[bytes, VerifiedCollateral]):
    """Verified collateral by (collateral bytes, root, allow_outdated), see the module
    docstring."""


def _fresh_step(name: str, problem: str | None, allow_outdated: bool, notes: list[str]) -> Step:
    if problem is None:
        return Step.passed(name)
    if allow_outdated:
        notes.append(problem)
        return Step.passed(name, f"outdated, allowed: {problem}")
    return Step.failed(name, problem)


def _crl_check(
    crl_bytes: bytes,
    source: str,
    issuer_of: Callable[[], x509.Certificate],
    issuer_name: str,
    found: list[x509.CertificateRevocationList],
) -> Callable[[], str | None]:
    def check() -> str | None:
        crl = parse_crl(crl_bytes, source=source)
        problem = crl_problem(crl, issuer_of(), issuer_name, None)
        if problem is not None:
            return f"{source}: {problem}"
        found.append(crl)
        return None

    return check


def _crl_freshness(
    name: str,
    source: str,
    found: list[x509.CertificateRevocationList],
    at: _dt.datetime,
    allow_outdated: bool,
    notes: list[str],
) -> Callable[[], Step]:
    def check() -> Step:
        crl = found[0]
        problem = check_freshness(source, crl.last_update_utc, crl.next_update_utc, at)
        return _fresh_step(name, problem, allow_outdated, notes)

    return check


def verify_crls(
    collateral: Collateral,
    *,
    root: x509.Certificate,
    at: _dt.datetime,
    allow_outdated: bool = False,
    notes: list[str] | None = None,
) -> tuple[VerificationReport, RevocationChecker]:
    """Verify the root CA CRL (by `root`) and the PCK CRL (by the PCK CA in its issuer chain,
    itself verified up to `root`), each one's freshness at `at`, and return the checker the
    certificate chain verifier asks. A CRL that fails is not in the checker."""
    notes = [] if notes is None else notes
    run = StepRunner()
    verified: list[x509.CertificateRevocationList] = []
    for name, data, source, issuer_of, issuer_name in (
        ("root_ca_crl", collateral.root_ca_crl, "root_ca_crl", lambda: root, "root CA"),
        (
            "pck_crl",
            collateral.pck_crl,
            "pck_crl",
            lambda: verify_chain(
                collateral.pck_crl_chain() or (),
                root=root,
                at=at,
                source="pck_crl_issuer_chain.pem",
                leaf_signs="crl",
            ),
            "PCK CA",
        ),
    ):
        sig, fresh = f"{name}_signature", f"{name}_fresh"
        if data is None:
            run.add(Step.not_checked(sig, f"no {source} given"))
            run.add(Step.not_checked(fresh, f"no {source} given"))
            continue
        found: list[x509.CertificateRevocationList] = []
        run.run(sig, _crl_check(data, source, issuer_of, issuer_name, found))
        step = run.run(
            fresh, _crl_freshness(fresh, source, found, at, allow_outdated, notes), needs=(sig,)
        )
        if step.status is StepStatus.PASSED:
            verified.extend(found)
    return run.report(), RevocationChecker(verified)


def _signed_steps(
    run: StepRunner,
    prefix: str,
    what: str,
    load: Callable[[], tuple[SignedTcbInfo | SignedEnclaveIdentity | None, object, str]],
    *,
    root: x509.Certificate,
    at: _dt.datetime,
    allow_outdated: bool,
    notes: list[str],
    signers: list[x509.Certificate],
) -> SignedTcbInfo | SignedEnclaveIdentity | None:
    sig, fresh = f"{prefix}_signature", f"{prefix}_fresh"
    found: list[SignedTcbInfo | SignedEnclaveIdentity] = []

    def signature() -> None:
        signed, chain, source = load()
        if signed is None or not isinstance(chain, tuple):
            raise EvidenceError(f"no {what} or no issuer chain")
        verify_signed_body(signed, chain, root=root, at=at, source=source)
        signers.extend(c for c in chain if c != root)
        found.append(signed)

    def freshness() -> Step:
        body = found[0].body
        problem = check_freshness(what, body.issue_date, body.next_update, at)
        return _fresh_step(fresh, problem, allow_outdated, notes)

    run.run(sig, signature)
    run.run(fresh, freshness, needs=(sig,))
    return found[0] if found else None


def _issuer_revocation(
    signers: list[x509.Certificate], checker: RevocationChecker, root: x509.Certificate
) -> Step:
    name = "issuer_revocation"
    if not signers:
        return Step.not_checked(name, "no issuer chain verified")
    if not checker.covers(root.subject):
        return Step.not_checked(name, "no verified root CA CRL")
    seen: set[bytes] = set()
    for cert in signers:
        key = cert.fingerprint(hashes.SHA256())
        if key in seen or not checker.covers(cert.issuer):
            continue
        seen.add(key)
        if checker.is_certificate_revoked(cert):
            return Step.failed(name, f"{cert.subject.rfc4514_string()[:80]!r} is revoked")
    return Step.passed(name)


def _verify(
    collateral: Collateral, root: x509.Certificate, at: _dt.datetime, allow_outdated: bool
) -> VerifiedCollateral:
    notes: list[str] = []
    crl_report, checker = verify_crls(
        collateral, root=root, at=at, allow_outdated=allow_outdated, notes=notes
    )
    run = StepRunner()
    run.extend(crl_report.steps)
    signers: list[x509.Certificate] = []
    found: list[SignedTcbInfo | SignedEnclaveIdentity | None] = []
    for prefix, what, present, load in (
        (
            "tcb_info",
            "TCB info",
            collateral.tcb_info_json is not None,
            lambda: (collateral.tcb_info(), collateral.tcb_info_chain(), "tcb_info.json"),
        ),
        (
            "qe_identity",
            "QE identity",
            collateral.qe_identity_json is not None,
            lambda: (collateral.qe_identity(), collateral.qe_identity_chain(), "qe_identity.json"),
        ),
    ):
        if not present:
            run.add(Step.not_checked(f"{prefix}_signature", f"no {what} given"))
            run.add(Step.not_checked(f"{prefix}_fresh", f"no {what} given"))
            found.append(None)
            continue
        found.append(
            _signed_steps(
                run,
                prefix,
                what,
                load,
                root=root,
                at=at,
                allow_outdated=allow_outdated,
                notes=notes,
                signers=signers,
            )
        )
    try:
        pck_chain = collateral.pck_crl_chain() or ()
    except EvidenceError:
        pck_chain = ()
    signers.extend(c for c in pck_chain if c != root)
    run.add(_issuer_revocation(signers, checker, root))
    tcb_info, qe_identity = found
    assert tcb_info is None or isinstance(tcb_info, SignedTcbInfo)
    assert qe_identity is None or isinstance(qe_identity, SignedEnclaveIdentity)
    return VerifiedCollateral(
        steps=tuple(run.steps),
        tcb_info=tcb_info,
        qe_identity=qe_identity,
        has_tcb_info=collateral.tcb_info_json is not None,
        has_qe_identity=collateral.qe_identity_json is not None,
        notes=tuple(notes),
    )


def _cache_key(collateral: Collateral, root: x509.Certificate, allow_outdated: bool) -> bytes:
    return cache_key(
        b"ppml-intel-collateral/1",
        root.public_bytes(Encoding.DER),
        b"\x01" if allow_outdated else b"\x00",
        *(getattr(collateral, name) for name in INTEL_FILES),
    )


def _window(
    collateral: Collateral, verified: VerifiedCollateral, root: x509.Certificate
) -> tuple[_dt.datetime, _dt.datetime]:
    """Where every time check of a verification that passed holds."""
    certs = [root]
    for chain in (
        collateral.tcb_info_chain(),
        collateral.qe_identity_chain(),
        collateral.pck_crl_chain(),
    ):
        certs.extend(chain or ())
    return validity_window(
        certs,
        (collateral.pck_crl_parsed(), collateral.root_ca_crl_parsed()),
        [
            (doc.body.issue_date, doc.body.next_update)
            for doc in (verified.tcb_info, verified.qe_identity)
            if doc is not None
        ],
    )


def verify_collateral(
    collateral: Collateral,
    *,
    root: x509.Certificate,
    at: _dt.datetime,
    allow_outdated: bool = False,
    cache: CollateralCache | None = None,
) -> VerifiedCollateral:
    """Verify `collateral` up to `root` at time `at` (see the module docstring); only a
    verification that passed without outdated parts is kept in `cache`."""
    key = _cache_key(collateral, root, allow_outdated) if cache is not None else b""
    if cache is not None:
        hit = cache.get(key, at)
        if hit is not None:
            return hit
    verified = _verify(collateral, root, at, allow_outdated)
    passed = (StepStatus.PASSED, StepStatus.NOT_CHECKED)
    if cache is not None and not verified.notes and all(s.status in passed for s in verified.steps):
        cache.put(key, verified, _window(collateral, verified, root))
    return verified
