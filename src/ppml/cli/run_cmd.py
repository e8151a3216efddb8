"""`ppml measure`, `ppml run` (attested runs on the sim TEE) and `ppml serve`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ppml.cli._common import PassphraseFileOption, WorkspaceOption, handle_errors, open_workspace
from ppml.errors import ConfigurationError, UsageError

if TYPE_CHECKING:
    from ppml.tee.manifest import WorkloadManifest
    from ppml.workspace import Workspace

_EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}

TrustedOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--trusted", metavar="PATH", help="Another trusted file or directory (repeatable)."
    ),
]
EnvOption = Annotated[
    list[str] | None,
    typer.Option(
        "--env",
        metavar="NAME",
        help="Pass this environment variable to the workload (repeatable). Default allow-list: "
        "HOME, LANG, LC_ALL, LC_CTYPE, PATH, TERM, TMPDIR, TZ, USER.",
    ),
]
CommandArg = Annotated[list[str], typer.Argument(metavar="-- CMD [ARGS...]", show_default=False)]

SIM_NOTICE = (
    "ppml: SIMULATED TEE (sim): the workload is measured and attested, but nothing protects it "
    "from this host. For development and demonstration only."
)


def register(app: typer.Typer) -> None:
    app.command("measure", context_settings=_EXTRA)(measure)
    app.command("run", context_settings=_EXTRA)(run)
    app.command("serve")(serve)


def _manifest(
    command: list[str], trusted: list[Path] | None, env: list[str] | None
) -> WorkloadManifest:
    from ppml.tee.manifest import build_manifest

    return build_manifest(command, trusted=trusted or [], env_allow=env or [])


def measure(
    command: CommandArg,
    trusted: TrustedOption = None,
    env: EnvOption = None,
    manifest: Annotated[
        bool, typer.Option("--manifest", help="Also print the measured manifest (JSON).")
    ] = False,
) -> None:
    """Print a workload's measurement (SHA-384, lowercase hex) alone on the first line.

    The measurement covers the interpreter (path and bytes), the script and the local modules
    it imports, every --trusted file, the arguments and the environment allow-list.
    """
    with handle_errors():
        m = _manifest(command, trusted, env)
        typer.echo(m.measurement())
        if manifest:
            typer.echo(json.dumps(m.to_dict(), indent=2))


def run(
    command: CommandArg,
    tee: Annotated[str, typer.Option("--tee", help="TEE backend: sim.")] = "sim",
    measure_only: Annotated[
        bool, typer.Option("--measure", help="Print the measurement and exit.")
    ] = False,
    trusted: TrustedOption = None,
    env: EnvOption = None,
    kms: Annotated[
        str | None,
        typer.Option(
            "--kms",
            metavar="URL",
            help="Use the attestation service and KMS of a `ppml serve` at URL (its certificate "
            "must chain to this workspace's CA) instead of serving them here.",
        ),
    ] = None,
    workspace: WorkspaceOption = None,
    passphrase_file: PassphraseFileOption = None,
) -> None:
    """Run a workload attested: measure it, launch it with an evidence channel, and serve it
    the attestation service and the KMS on loopback TLS. Keys are released to it only if a
    key's policy names its measurement (`ppml policy allow`). Exits with the workload's code.
    """
    with handle_errors():
        m = _manifest(command, trusted, env)
        if measure_only:
            typer.echo(m.measurement())
            return
        if kms is not None and not kms.startswith("https://"):
            raise UsageError("--kms takes an https:// URL (ppml never speaks plain HTTP)")
        raise typer.Exit(_run_manifest(m, tee, workspace, passphrase_file, kms))


def run_attested(
    command: list[str], tee: str, workspace: Path | None, passphrase_file: Path | None
) -> int:
    """Run `command` attested, as `ppml run --tee TEE -- command` does; returns its exit code."""
    return _run_manifest(_manifest(command, None, None), tee, workspace, passphrase_file)


def _run_manifest(
    m: WorkloadManifest,
    tee: str,
    workspace: Path | None,
    passphrase_file: Path | None,
    kms_url: str | None = None,
) -> int:
    if tee != "sim":
        raise UsageError(f"unknown or unsupported TEE backend {tee!r} (available: sim)")
    ws = open_workspace(workspace, passphrase_file)
    if not ws.dev:
        raise ConfigurationError(
            "the sim TEE runs only with a development workspace (`ppml init --dev`)",
            path=ws.path,
        )
    typer.echo(SIM_NOTICE, err=True)
    return _launch(ws, m, kms_url)


def _launch(ws: Workspace, manifest: WorkloadManifest, kms_url: str | None = None) -> int:
    from ppml.attestation.sim import SimPlatform
    from ppml.server.app import create_app
    from ppml.server.embedded import services_for, tls_files_for
    from ppml.server.tls import serving
    from ppml.tee.channel import CHANNEL_ENV, EvidenceChannelServer
    from ppml.tee.runtime import CA_PEM_ENV, KMS_URL_ENV, TEE_ENV

    measurement = manifest.measurement()
    platform = SimPlatform(ws.sim_platform_key())
    channel = EvidenceChannelServer(lambda rd: platform.quote(measurement, rd), tee="sim")

    def start(url: str) -> int:
        child_env = manifest.child_environment(dict(os.environ))
        child_env.update(
            {
                TEE_ENV: "sim",
                CHANNEL_ENV: str(channel.child_fd),
                KMS_URL_ENV: url,
                CA_PEM_ENV: ws.ca_cert.read_text(),
                "PPML_MEASUREMENT": measurement,
            }
        )
        channel.start()
        try:
            proc = subprocess.Popen(  # noqa: S603 -- the user's own command, measured
                manifest.command(), env=child_env, pass_fds=(channel.child_fd,)
            )
        except OSError as exc:
            raise UsageError(f"cannot start the workload: {exc.strerror}") from None
        channel.child_started()
        return _wait(proc)

    try:
        if kms_url is not None:
            return start(kms_url.rstrip("/"))
        services = services_for(ws, actor=f"sim:{measurement[:16]}")
        try:
            with serving(create_app(services), tls_files_for(ws)) as server:
                return start(server.url)
        finally:
            services.keys.close()
    finally:
        channel.close()


def _wait(proc: subprocess.Popen[bytes]) -> int:
    """Wait for the workload, passing Ctrl-C and SIGTERM on to it."""

    def forward(signum: int, _frame: object) -> None:
        proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8443,
    workspace: WorkspaceOption = None,
    passphrase_file: PassphraseFileOption = None,
) -> None:
    """Serve the attestation service and the KMS over HTTPS (no plain HTTP), with the
    workspace's certificates. Administrators authenticate with the workspace's client
    certificate (mutual TLS); workloads with attestation tokens. OpenAPI at /docs and
    /openapi.json."""
    with handle_errors():
        from ppml.server.app import create_app
        from ppml.server.embedded import services_for, tls_files_for
        from ppml.server.tls import serve_forever

        ws = open_workspace(workspace, passphrase_file)
        services = services_for(ws, actor="server")
        typer.echo(f"ppml serve: https://{host}:{port} (workspace {ws.path})", err=True)
        try:
            serve_forever(create_app(services), tls_files_for(ws), host=host, port=port)
        finally:
            services.keys.close()
        sys.stdout.flush()
