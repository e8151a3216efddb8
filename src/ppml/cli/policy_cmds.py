"""`ppml policy ...`: the release policies that say which attested workloads may get a key."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ppml.cli._common import FormatOption, PassphraseFileOption, WorkspaceOption, print_json
from ppml.cli._kms import kms_command, with_policies
from ppml.errors import UsageError

if TYPE_CHECKING:
    from ppml.kms.policy import Policy, Rule

policy_app = typer.Typer(
    help="Release policies: which TEE measurements may get which key.",
    no_args_is_help=True,
    add_completion=False,
)

KeyArg = Annotated[str, typer.Argument(help="Key name the policy belongs to.")]
MeasurementOption = Annotated[
    str,
    typer.Option(
        "--measurement",
        help="The TEE's primary measurement, 64 or 96 hex digits (sim: measurement, "
        "sgx: MRENCLAVE, tdx: MRTD, snp: MEASUREMENT); for SGX, '*' allows any enclave of "
        "--mr-signer and --isv-prod-id at --min-isv-svn or later.",
        show_default=False,
    ),
]


def register(app: typer.Typer) -> None:
    app.add_typer(policy_app, name="policy")


def _show_policy(policy: Policy, fmt: str) -> None:
    if fmt == "json":
        print_json(policy.to_dict())
        return
    if not policy.rules:
        typer.echo(f"key {policy.key_name}: no rules, every release is denied")
        return
    typer.echo(f"key {policy.key_name}: released to a workload matching any rule")
    typer.echo(f"{'TEE':<4} {'DEBUG':<6} {'MIN TCB':<34} MEASUREMENT")
    for rule in policy.rules:
        debug = "ok" if rule.debug_ok else "no"
        typer.echo(f"{rule.tee.value:<4} {debug:<6} {rule.min_tcb.value:<34} {rule.measurement}")
        for name, value in rule.constraints().items():
            if isinstance(value, dict):
                value = ",".join(f"{k}={v}" for k, v in value.items())
            typer.echo(f"     {name}: {value}")


def _min_reported_tcb(text: str | None) -> dict[str, int] | None:
    """``bootloader=4,tee=0,snp=24,microcode=219`` -> a dict (validated by `Rule`)."""
    if text is None:
        return None
    out: dict[str, int] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or not value.strip().isdigit():
            raise UsageError("--min-reported-tcb takes NAME=LEVEL pairs, comma-separated")
        out[name.strip().lower()] = int(value)
    return out


def _rtmrs(items: list[str] | None) -> dict[str, str]:
    """``--rtmr N=HEX`` options -> {"rtmrN": HEX} (the digests validated by `Rule`)."""
    out: dict[str, str] = {}
    for item in items or ():
        index, sep, value = item.partition("=")
        if not sep or index.strip() not in ("0", "1", "2", "3"):
            raise UsageError("--rtmr takes N=HEX with N from 0 to 3")
        out[f"rtmr{index.strip()}"] = value
    return out


def _rule(tee: str, measurement: str, debug_ok: bool, min_tcb: str, extra: dict[str, Any]) -> Rule:
    """The rule `ppml policy allow` adds; `extra`: its TEE-specific options (None: not given)."""
    from ppml.kms.policy import Rule, parse_measurement, parse_tcb_status, parse_tee

    return Rule(
        parse_tee(tee),
        parse_measurement(measurement),
        debug_ok,
        parse_tcb_status(min_tcb),
        **{k: v for k, v in extra.items() if v is not None},
    )


@policy_app.command("allow")
def policy_allow(
    key: KeyArg,
    measurement: MeasurementOption,
    tee: Annotated[
        str, typer.Option("--tee", help="TEE type: sim, sgx, tdx or snp.", show_default=False)
    ],
    debug_ok: Annotated[
        bool,
        typer.Option("--debug-ok", help="Also accept a debug TEE (its host can read its memory)."),
    ] = False,
    min_tcb: Annotated[
        str,
        typer.Option("--min-tcb", help="Lowest TCB status accepted, e.g. UpToDate, OutOfDate."),
    ] = "UpToDate",
    mr_signer: Annotated[
        str | None, typer.Option("--mr-signer", help="SGX: required MRSIGNER (64 hex digits).")
    ] = None,
    isv_prod_id: Annotated[
        int | None, typer.Option("--isv-prod-id", help="SGX: required ISVPRODID.")
    ] = None,
    min_isv_svn: Annotated[
        int | None, typer.Option("--min-isv-svn", help="SGX: lowest ISVSVN accepted.")
    ] = None,
    mr_seam: Annotated[
        str | None, typer.Option("--mr-seam", help="TDX: required MRSEAM (96 hex digits).")
    ] = None,
    rtmr: Annotated[
        list[str] | None,
        typer.Option(
            "--rtmr", help="TDX: required RTMR as N=HEX (N from 0 to 3); repeat for several."
        ),
    ] = None,
    no_migration_agent: Annotated[
        bool,
        typer.Option(
            "--no-migration-agent",
            help="SEV-SNP: refuse guests whose policy allows a migration agent.",
        ),
    ] = False,
    no_smt: Annotated[
        bool, typer.Option("--no-smt", help="SEV-SNP: refuse guests whose policy allows SMT.")
    ] = False,
    min_reported_tcb: Annotated[
        str | None,
        typer.Option(
            "--min-reported-tcb",
            help="SEV-SNP: lowest REPORTED_TCB levels, e.g. bootloader=4,tee=0,snp=24,"
            "microcode=219 (and fmc=N on Turin).",
        ),
    ] = None,
    fmt: FormatOption = "text",
    workspace: WorkspaceOption = None,
    passphrase_file: PassphraseFileOption = None,
) -> None:
    """Allow workloads with this TEE type and measurement to get KEY.

    The sim TEE is accepted only in a dev workspace (`ppml init --dev`). The TEE-specific
    options add reference values that must hold too.
    """
    with kms_command(fmt):
        rule = _rule(
            tee, measurement, debug_ok, min_tcb,
            {
                "mr_signer": mr_signer,
                "isv_prod_id": isv_prod_id,
                "min_isv_svn": min_isv_svn,
                "mr_seam": mr_seam,
                "min_reported_tcb": _min_reported_tcb(min_reported_tcb),
                **_rtmrs(rtmr),
                "migration_agent_ok": False if no_migration_agent else None,
                "smt_ok": False if no_smt else None,
            },
        )  # fmt: skip
        policy = with_policies(workspace, passphrase_file, lambda p: p.allow(key, rule))
        if debug_ok:
            typer.echo(
                "ppml: warning: --debug-ok accepts debug TEEs, whose memory their host can read",
                err=True,
            )
        _show_policy(policy, fmt)


@policy_app.command("set")
def policy_set(
    key: KeyArg,
    file: Annotated[
        Path,
        typer.Option(
            "--file",
            help="Policy file: the JSON `ppml policy show --format json` prints "
            '({"key": ..., "rules": [...]}); replaces every rule of KEY.',
        ),
    ],
    fmt: FormatOption = "text",
    workspace: WorkspaceOption = None,
    passphrase_file: PassphraseFileOption = None,
) -> None:
    """Replace KEY's whole release policy with the rules of a policy file."""
    with kms_command(fmt):
        from ppml.kms.policy import load_policy_file

        loaded = load_policy_file(file, key_name=key)
        _show_policy(
            with_policies(workspace, passphrase_file, lambda p: p.replace(key, loaded.rules)), fmt
        )


@policy_app.command("show")
def policy_show(
    key: KeyArg,
    fmt: FormatOption = "text",
    workspace: WorkspaceOption = None,
    passphrase_file: PassphraseFileOption = None,
) -> None:
    """Show KEY's release policy."""
    with kms_command(fmt):
        _show_policy(with_policies(workspace, passphrase_file, lambda p: p.show(key)), fmt)


@policy_app.command("revoke")
def policy_revoke(
    key: KeyArg,
    measurement: MeasurementOption,
    fmt: FormatOption = "text",
    workspace: WorkspaceOption = None,
    passphrase_file: PassphraseFileOption = None,
) -> None:
    """Remove KEY's rules for this measurement: such workloads get the key no more."""
    with kms_command(fmt):
        from ppml.kms.policy import parse_measurement

        value = parse_measurement(measurement)
        _show_policy(with_policies(workspace, passphrase_file, lambda p: p.revoke(key, value)), fmt)
