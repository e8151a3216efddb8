"""`ppml attest ...`: verify hardware evidence (an SGX or TDX quote, an SEV-SNP report) offline,
optionally against a release policy file."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ppml.cli._common import FormatOption, check_format, print_json
from ppml.errors import AttestationFailed, InputNotFound, UsageError

if TYPE_CHECKING:
    from ppml.attestation.collateral.models import Collateral, SnpCollateral
    from ppml.attestation.evidence import EvidenceVerification
    from ppml.kms.policy import Policy

attest_app = typer.Typer(
    help="Verify TEE evidence: SGX and TDX quotes, SEV-SNP reports.",
    no_args_is_help=True,
    add_completion=False,
)

_MAX_INPUT = 64 * 1024


def register(app: typer.Typer) -> None:
    app.add_typer(attest_app, name="attest")


def _read(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as fh:
            data = fh.read(_MAX_INPUT + 1)
    except FileNotFoundError:
        raise InputNotFound(f"{what} not found", path=path) from None
    except OSError as exc:
        raise UsageError(f"cannot read the {what}: {exc.strerror}", path=path) from None
    if len(data) > _MAX_INPUT:
        raise UsageError(f"the {what} is larger than {_MAX_INPUT} bytes", path=path)
    return data


def _parse_at(text: str | None) -> dt.datetime | None:
    if text is None:
        return None
    try:
        value = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"--at {text[:40]!r} is not an ISO-8601 date-time (e.g. 2026-01-01T00:00:00Z)"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ppml" / "collateral"


def _fetched(
    data: bytes,
    kind: str,
    pccs: str | None,
    kds: str | None,
    product: str | None,
    fetch_ca: Path | None,
    cache_dir: Path | None,
    when: dt.datetime | None,
) -> Collateral | SnpCollateral | None:
    """Fetch (or take from the cache) the collateral --pccs / --kds name for `data`."""
    from ppml.attestation.collateral.sources import collateral_source
    from ppml.attestation.evidence import detect_type

    if fetch_ca is not None and not fetch_ca.is_file():
        raise InputNotFound("--fetch-ca file not found", path=fetch_ca)
    tee = detect_type(data) if kind == "auto" else kind
    if tee in ("sgx", "tdx") and kds is not None:
        raise UsageError("--kds is for SEV-SNP reports; this is an Intel quote")
    if tee == "snp" and pccs is not None:
        raise UsageError("--pccs is for Intel quotes; this is an SEV-SNP report")
    source = collateral_source(
        pccs_url=pccs,
        kds_url=kds,
        fetch_ca=fetch_ca,
        cache_dir=cache_dir if cache_dir is not None else _default_cache_dir(),
        product=product,
    )
    assert source is not None
    at = when if when is not None else dt.datetime.now(dt.UTC)
    return source.snp(data, at) if tee == "snp" else source.intel(data, at)


def _policy_result(result: EvidenceVerification, policy: Policy) -> dict[str, Any]:
    from ppml.attestation.claims import TcbStatus
    from ppml.attestation.hardware_verifier import evidence_claims

    # No TCB status (no matching level) satisfies no minimum: appraise as Revoked.
    facts = evidence_claims(result, tcb_status=result.tcb_status or TcbStatus.REVOKED)
    decision = policy.evaluate(facts, allow_sim=False)
    return {
        "allowed": decision.allowed,
        "reason": decision.reason,
        "rules": [
            {"rule": i + 1, "tee": r.tee.value, "result": r.check(facts)}
            for i, r in enumerate(policy.rules)
        ],
    }


def _failure(result: EvidenceVerification, policy: dict[str, Any] | None) -> str | None:
    """Why the command fails, naming the step, or None when everything asked for holds."""
    refusal = result.refusal()
    if refusal is None and policy is not None and not policy["allowed"]:
        return f"policy: denied ({policy['reason']})"
    return refusal


def _show_text(
    result: EvidenceVerification, policy: dict[str, Any] | None, failure: str | None
) -> None:
    tcb = result.tcb_status.value if result.tcb_status is not None else "none"
    typer.echo(f"type:           {result.type.value}")
    typer.echo(f"verified:       {'yes' if result.verified else 'NO'}")
    typer.echo(f"tcb status:     {tcb}" + (f" ({result.tcb_detail})" if result.tcb_detail else ""))
    typer.echo(f"advisory ids:   {', '.join(result.advisory_ids) or '-'}")
    typer.echo(f"trailing bytes: {len(result.trailing_bytes)}")
    typer.echo(f"at:             {result.at.isoformat()}")
    typer.echo("steps:")
    for step in result.steps.steps:
        detail = f"  {step.detail}" if step.detail else ""
        typer.echo(f"  {step.status.value:<12} {step.name}{detail}")
    typer.echo("claims:")
    for name, value in result.claims.items():
        if isinstance(value, dict) or hasattr(value, "items"):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        typer.echo(f"  {name}: {value}")
    for note in result.notes:
        typer.echo(f"note: {note}")
    if policy is not None:
        verdict = "allowed" if policy["allowed"] else "DENIED"
        typer.echo(f"policy:         {verdict} ({policy['reason']})")
        for rule in policy["rules"]:
            typer.echo(f"  rule {rule['rule']} ({rule['tee']}): {rule['result']}")
    typer.echo(f"result:         {'ok' if failure is None else 'FAILED at ' + failure}")


@attest_app.command("verify")
def attest_verify(
    evidence: Annotated[
        Path,
        typer.Argument(help="File holding the raw evidence: a quote or an SEV-SNP report."),
    ],
    tee: Annotated[
        str,
        typer.Option(
            "--type",
            help="Evidence type: sgx, tdx, snp, or auto (detected from the header: quote "
            "version and TEE type, or SEV-SNP report size, version and signature algorithm).",
        ),
    ] = "auto",
    root: Annotated[
        Path | None,
        typer.Option(
            "--root",
            help="PEM trust anchor instead of the pinned one: an Intel SGX root CA for quotes, "
            "an AMD ARK for SEV-SNP reports.",
            show_default=False,
        ),
    ] = None,
    collateral: Annotated[
        Path | None,
        typer.Option(
            "--collateral",
            help="Directory of Intel PCS collateral (tcb_info.json, qe_identity.json, their "
            "issuer chains, pck_crl.der, root_ca_crl.der) to evaluate the TCB status; for "
            "SEV-SNP, vcek.der and ask_ark.pem. Without it Intel TCB status is Unknown.",
            show_default=False,
        ),
    ] = None,
    at: Annotated[
        str | None,
        typer.Option(
            "--at",
            help="Verify as of this ISO-8601 time (default: now; without a zone: UTC).",
            show_default=False,
        ),
    ] = None,
    policy_file: Annotated[
        Path | None,
        typer.Option(
            "--policy",
            help="Also appraise the evidence against this release policy file (the JSON "
            "`ppml policy show --format json` prints).",
            show_default=False,
        ),
    ] = None,
    allow_outdated: Annotated[
        bool,
        typer.Option(
            "--allow-outdated",
            help="Accept collateral and CRLs past their nextUpdate (reported as notes).",
        ),
    ] = False,
    vcek: Annotated[
        Path | None,
        typer.Option(
            "--vcek",
            help="The VCEK (or VLEK) certificate, PEM or DER, that signed an SEV-SNP report.",
            show_default=False,
        ),
    ] = None,
    pccs: Annotated[
        str | None,
        typer.Option(
            "--pccs",
            help="Without --collateral: fetch the Intel collateral for this quote from this "
            "PCCS or Intel PCS base URL (Intel's: https://api.trustedservices.intel.com) and "
            "cache it until its nextUpdate.",
            show_default=False,
        ),
    ] = None,
    kds: Annotated[
        str | None,
        typer.Option(
            "--kds",
            help="Without --vcek: fetch this SEV-SNP report's VCEK and the ASK/ARK from this "
            "AMD KDS base URL (AMD's: https://kdsintf.amd.com) and cache them.",
            show_default=False,
        ),
    ] = None,
    product: Annotated[
        str | None,
        typer.Option(
            "--product",
            help="SEV-SNP with --kds: Milan, Genoa or Turin (default: from the report's CPUID, "
            "reports of version 3 and later).",
            show_default=False,
        ),
    ] = None,
    fetch_ca: Annotated[
        Path | None,
        typer.Option(
            "--fetch-ca",
            help="PEM CA bundle to check the PCCS / KDS server certificate with (default: the "
            "system's).",
            show_default=False,
        ),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir",
            help="Where fetched collateral is cached (default: $XDG_CACHE_HOME/ppml/collateral "
            "or ~/.cache/ppml/collateral).",
            show_default=False,
        ),
    ] = None,
    fmt: FormatOption = "text",
) -> None:
    """Verify EVIDENCE: signatures, certificate chains to the pinned (or given) root, and the
    TCB status against collateral.

    Exit 0 only when everything asked for holds: the evidence verified, its TCB status is
    not failing (a platform no TCB level matches, or Revoked, fails) and, with --policy, the
    policy allows it. Otherwise exit 4, naming the failed step; bad arguments exit 2.
    """
    check_format(fmt)
    kind = tee.strip().lower()
    if kind not in ("auto", "sgx", "tdx", "snp"):
        raise UsageError(f"--type {tee[:16]!r}: use sgx, tdx, snp or auto")
    when = _parse_at(at)
    if collateral is not None and not collateral.is_dir():
        raise InputNotFound("collateral directory not found", path=collateral)
    _verify_and_show(
        evidence,
        kind,
        when,
        root=root,
        collateral=collateral,
        policy_file=policy_file,
        allow_outdated=allow_outdated,
        vcek=vcek,
        fetch=(pccs, kds, product, fetch_ca, cache_dir),
        fmt=fmt,
    )


def _verify_and_show(
    evidence: Path,
    kind: str,
    when: dt.datetime | None,
    *,
    root: Path | None,
    collateral: Path | None,
    policy_file: Path | None,
    allow_outdated: bool,
    vcek: Path | None,
    fetch: tuple[str | None, str | None, str | None, Path | None, Path | None],
    fmt: str,
) -> None:
    from ppml.attestation.evidence import verify_evidence
    from ppml.kms.policy import load_policy_file

    policy = load_policy_file(policy_file) if policy_file is not None else None
    data = _read(evidence, "evidence file")
    pccs, kds, product, fetch_ca, cache_dir = fetch
    fetching = pccs is not None or kds is not None
    if not fetching and (product, fetch_ca, cache_dir) != (None, None, None):
        raise UsageError("--product, --fetch-ca and --cache-dir go with --pccs or --kds")
    if pccs is not None and collateral is not None:
        raise UsageError("give either --collateral or --pccs, not both")
    if kds is not None and vcek is not None:
        raise UsageError("give either --vcek or --kds, not both")
    vcek_bytes = _read(vcek, "VCEK certificate") if vcek is not None else None
    chosen: Collateral | SnpCollateral | Path | None = collateral
    if fetching:
        chosen = _fetched(data, kind, *fetch, when)
    result = verify_evidence(
        data,
        kind,
        root_pem=_read(root, "root certificate") if root is not None else None,
        collateral=chosen,
        at=when,
        allow_outdated=allow_outdated,
        vcek=vcek_bytes,
    )
    appraisal = _policy_result(result, policy) if policy is not None else None
    failure = _failure(result, appraisal)
    if fmt == "json":
        out = result.to_dict()
        if appraisal is not None:
            out["policy"] = appraisal
        out["ok"] = failure is None
        print_json(out)
    else:
        _show_text(result, appraisal, failure)
    if failure is not None:
        raise AttestationFailed(f"evidence not accepted: {failure}")
