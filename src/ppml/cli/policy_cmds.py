"""`ppml policy ...`: the release policies that say which attested workloads may get a key."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from ppml.cli._common import (
    FormatOption,
    PassphraseFileOption,
    WorkspaceOption,
    check_format,
    handle_errors,
    open_workspace,
    print_json,
)

if TYPE_CHECKING:
    from ppml.kms.policy import Policy

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
        "sgx: MRENCLAVE, tdx: MRTD, snp: MEASUREMENT).",
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
    fmt: FormatOption = "text",
    workspace: WorkspaceOption = None,
    passphrase_file: PassphraseFileOption = None,
) -> None:
    """Allow workloads with this TEE type and measurement to get KEY.

    The sim TEE is accepted only in a dev workspace (`ppml init --dev`).
    """
    with handle_errors():
        from ppml.kms.policy import Rule, parse_measurement, parse_tcb_status, parse_tee

        check_format(fmt)
        rule = Rule(
            parse_tee(tee),
            parse_measurement(measurement),
            debug_ok,
            parse_tcb_status(min_tcb),
        )
        ws = open_workspace(workspace, passphrase_file)
        with ws.key_service() as keys:
            policy = keys.policies(allow_sim=ws.dev).allow(key, rule)
        if debug_ok:
            typer.echo(
                "ppml: warning: --debug-ok accepts debug TEEs, whose memory their host can read",
                err=True,
            )
        _show_policy(policy, fmt)


@policy_app.command("show")
def policy_show(
    key: KeyArg,
    fmt: FormatOption = "text",
    workspace: WorkspaceOption = None,
    passphrase_file: PassphraseFileOption = None,
) -> None:
    """Show KEY's release policy."""
    with handle_errors():
        check_format(fmt)
        ws = open_workspace(workspace, passphrase_file)
        with ws.key_service() as keys:
            policy = keys.policies(allow_sim=ws.dev).show(key)
        _show_policy(policy, fmt)


@policy_app.command("revoke")
def policy_revoke(
    key: KeyArg,
    measurement: MeasurementOption,
    fmt: FormatOption = "text",
    workspace: WorkspaceOption = None,
    passphrase_file: PassphraseFileOption = None,
) -> None:
    """Remove KEY's rules for this measurement: such workloads get the key no more."""
    with handle_errors():
        from ppml.kms.policy import parse_measurement

        check_format(fmt)
        value = parse_measurement(measurement)
        ws = open_workspace(workspace, passphrase_file)
        with ws.key_service() as keys:
            policy = keys.policies(allow_sim=ws.dev).revoke(key, value)
        _show_policy(policy, fmt)
