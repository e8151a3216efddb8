"""`ppml init`: create a workspace."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ppml.cli._common import PassphraseFileOption, read_passphrase, workspace_dir


def register(app: typer.Typer) -> None:
    app.command("init")(init)


def init(
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            "--workspace",
            "-w",
            help="Where to create the workspace. Default: $PPML_HOME, else ./.ppml",
            show_default=False,
        ),
    ] = None,
    dev: Annotated[
        bool, typer.Option("--dev", help="Development profile (later: may allow the sim TEE).")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing workspace (its keys are lost).")
    ] = False,
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host",
            help="Extra DNS name or IP for the TLS server certificate (repeatable); "
            "localhost and 127.0.0.1 are always included.",
        ),
    ] = None,
    passphrase_file: PassphraseFileOption = None,
) -> None:
    """Create a workspace: master key sealed by your passphrase, KMS, TLS CA and certificates,
    JVM keystores, enclave signing key, sealed secrets and config.toml.

    Non-interactive when $PPML_PASSPHRASE or --passphrase-file is given; otherwise it prompts.
    """
    from ppml.workspace import Workspace

    path = workspace_dir(directory)
    passphrase = read_passphrase(passphrase_file, confirm=True)
    ws = Workspace.create(
        path,
        passphrase,
        dev=dev,
        hosts=host or [],
        force=force,
        progress=lambda line: typer.echo(f"  {line}", err=True),
    )
    ws.key_service().close()
    ws.token_signing_key()  # the attestation service's token key
    ws.sim_platform_key()  # the simulated TEE's platform key
    typer.echo(f"created workspace {ws.path} (profile: {ws.config.profile})")
