"""`ppml key ...`, `ppml audit ...` and `ppml secret show`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ppml.cli._common import (
    FormatOption,
    PassphraseFileOption,
    WorkspaceOption,
    open_workspace,
    print_json,
)
from ppml.cli._kms import kms_command, with_keys
from ppml.errors import IntegrityError

if TYPE_CHECKING:
    from ppml.kms import KeyInfo, KeyService

key_app = typer.Typer(
    help="Named keys: create, list, show, rotate.", no_args_is_help=True, add_completion=False
)
audit_app = typer.Typer(
    help="The KMS audit log: show it, verify its hash chain.",
    no_args_is_help=True,
    add_completion=False,
)
secret_app = typer.Typer(
    help="Workspace secrets (sealed under the master key).", no_args_is_help=True
)

NameArg = Annotated[str, typer.Argument(help="Key name: letters, digits, '.', '_', '-'.")]


def register(app: typer.Typer) -> None:
    app.add_typer(key_app, name="key")
    app.add_typer(audit_app, name="audit")
    app.add_typer(secret_app, name="secret")


def _show_key(info: dict[str, object], fmt: str) -> None:
    if fmt == "json":
        print_json(info)
        return
    typer.echo(f"name             {info['name']}")
    typer.echo(f"created          {info['created_at']}")
    typer.echo(f"current version  {info['current_version']}")
    versions = info["versions"]
    assert isinstance(versions, list)
    for v in versions:
        typer.echo(f"  v{v['version']:<4} created {v['created_at']}")


def _key_command(
    fmt: str,
    workspace: Path | None,
    passphrase_file: Path | None,
    op: Callable[[KeyService], KeyInfo],
) -> None:
    """Run one operation on a named key and show the key as it left it."""
    with kms_command(fmt):
        _show_key(with_keys(workspace, passphrase_file, op).to_dict(), fmt)


@key_app.command("create")
def key_create(
    name: NameArg,
    fmt: FormatOption = "text",
    workspace: WorkspaceOption = None,
    passphrase_file: PassphraseFileOption = None,
) -> None:
    """Create a named key (version 1)."""
    _key_command(fmt, workspace, passphrase_file, lambda keys: keys.create_key(name))


@key_app.command("list")
def key_list(
    fmt: FormatOption = "text",
    workspace: WorkspaceOption = None,
    passphrase_file: PassphraseFileOption = None,
) -> None:
    """List the named keys with their current versions."""
    with kms_command(fmt):
        infos = with_keys(
            workspace, passphrase_file, lambda keys: [k.to_dict() for k in keys.list_keys()]
        )
        if fmt == "json":
            print_json(infos)
            return
        if not infos:
            typer.echo("no keys yet: create one with `ppml key create NAME`", err=True)
            return
        typer.echo(f"{'NAME':<32} {'VERSION':>7}  CREATED")
        for k in infos:
            typer.echo(f"{k['name']:<32} {k['current_version']:>7}  {k['created_at']}")


@key_app.command("show")
def key_show(
    name: NameArg,
    fmt: FormatOption = "text",
    workspace: WorkspaceOption = None,
    passphrase_file: PassphraseFileOption = None,
) -> None:
    """Show a named key's versions (metadata only, never key material)."""
    _key_command(fmt, workspace, passphrase_file, lambda keys: keys.describe(name))


@key_app.command("rotate")
def key_rotate(
    name: NameArg,
    fmt: FormatOption = "text",
    workspace: WorkspaceOption = None,
    passphrase_file: PassphraseFileOption = None,
) -> None:
    """Add a new version: new files use it, old files still decrypt (`ppml rewrap` moves them)."""
    _key_command(fmt, workspace, passphrase_file, lambda keys: keys.rotate(name))


@audit_app.command("show")
def audit_show(
    limit: Annotated[
        int | None, typer.Option("--limit", "-n", help="Only the newest N records.")
    ] = None,
    key: Annotated[str | None, typer.Option("--key", help="Only records of this key.")] = None,
    fmt: FormatOption = "text",
    workspace: WorkspaceOption = None,
    passphrase_file: PassphraseFileOption = None,
) -> None:
    """Show the audit log: every key operation, allowed or refused."""
    with kms_command(fmt):
        entries = with_keys(
            workspace,
            passphrase_file,
            lambda keys: [e.to_dict() for e in keys.audit.entries(limit=limit, key_name=key)],
        )
        if fmt == "json":
            print_json(entries)
            return
        typer.echo(f"{'SEQ':>5}  {'TIME':<32} {'OP':<18} {'KEY':<20} {'VER':>4}  OUTCOME")
        for e in entries:
            version = "" if e["version"] is None else e["version"]
            typer.echo(
                f"{e['seq']:>5}  {e['ts']:<32} {e['op']:<18} {e['key_name'] or '':<20} "
                f"{version:>4}  {e['outcome']}"
            )


@audit_app.command("verify")
def audit_verify(
    fmt: FormatOption = "text",
    workspace: WorkspaceOption = None,
    passphrase_file: PassphraseFileOption = None,
) -> None:
    """Verify the audit log's MAC chain and the KMS state.

    The chain: an edited, inserted, deleted or reordered record, or a cut-off tail. The state:
    every key, key version and release rule against the authenticated state record, that record
    against the audit log, and the state counter kept outside the workspace (a rollback of the
    whole key store file). Exit 0 when both are intact, 3 when not.
    """
    with kms_command(fmt):
        chain, state = with_keys(
            workspace, passphrase_file, lambda keys: (keys.audit.verify(), keys.verify_state())
        )
        if fmt == "json":
            print_json({**chain.to_dict(), "state": state.to_dict()})
        else:
            if chain.ok:
                typer.echo(f"audit log intact: {chain.count} records")
            if state.ok:
                counter = "" if state.counter is None else f", counter at {state.counter}"
                typer.echo(f"KMS state intact: version {state.version}, {state.keys} keys{counter}")
        if not chain.ok:
            where = f" at record {chain.first_bad_seq}" if chain.first_bad_seq else ""
            if not state.ok:
                typer.echo(f"KMS state check failed: {state.reason}", err=True)
            raise IntegrityError(f"audit log broken{where}: {chain.reason}")
        if not state.ok:
            raise IntegrityError(f"KMS state check failed: {state.reason}")


@secret_app.command("show")
def secret_show(
    name: Annotated[str, typer.Argument(help="Secret name, e.g. spark-auth-secret.")],
    workspace: WorkspaceOption = None,
    passphrase_file: PassphraseFileOption = None,
) -> None:
    """Write one secret to stdout, for piping (a newline is added only on a terminal).

    This is the only command that ever prints a secret.
    """
    value = open_workspace(workspace, passphrase_file).secret(name)
    sys.stdout.write(value + ("\n" if sys.stdout.isatty() else ""))
    sys.stdout.flush()


@secret_app.command("list")
def secret_list(
    workspace: WorkspaceOption = None,
    passphrase_file: PassphraseFileOption = None,
) -> None:
    """List the names of the workspace's secrets (never their values)."""
    for name in open_workspace(workspace, passphrase_file).secret_names():
        typer.echo(name)
