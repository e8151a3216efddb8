"""`ppml measure`, `ppml run` (attested runs: sim, sgx through Gramine, tdx and snp guests) and
`ppml serve`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ppml.cli._common import PassphraseFileOption, WorkspaceOption, handle_errors, open_workspace
from ppml.errors import ConfigurationError, UsageError
from ppml.tee.gramine import DEFAULT_ENCLAVE_SIZE, DEFAULT_MAX_THREADS

if TYPE_CHECKING:
    from ppml.tee.gramine import EnclaveOptions
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


TEE_BACKENDS = ("sim", "sgx", "tdx", "snp")
TEE_HELP = (
    "TEE backend: sim (simulated: development only, needs a `ppml init --dev` workspace); "
    "sgx (an Intel SGX enclave through Gramine: needs gramine-manifest, gramine-sgx-sign and "
    "gramine-sgx on PATH and /dev/sgx_enclave); tdx or snp (this machine is an Intel TDX or "
    "AMD SEV-SNP confidential VM: the command runs as it is, evidence comes from "
    "/sys/kernel/config/tsm/report, Linux 6.7+)."
)
DEBUG_ENCLAVE_NOTICE = (
    "ppml: DEBUG ENCLAVE (--debug-enclave): the host can read the enclave's memory. "
    "For development only; production key policies refuse debug enclaves."
)


def run(
    command: CommandArg,
    tee: Annotated[str, typer.Option("--tee", help=TEE_HELP)] = "sim",
    measure_only: Annotated[
        bool,
        typer.Option(
            "--measure",
            help="Print the measurement and exit (sim: the workload's SHA-384; sgx: the "
            "enclave's MRENCLAVE, which needs Gramine's tools and the workspace).",
        ),
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
    data: Annotated[
        list[Path] | None,
        typer.Option(
            "--data",
            metavar="DIR",
            help="sgx: a directory of ppml-encrypted data the enclave may read and write "
            "(repeatable; default: the current directory). It must not hold the workload's code.",
        ),
    ] = None,
    enclave_size: Annotated[
        str,
        typer.Option("--enclave-size", metavar="SIZE", help="sgx: enclave size, a power of two."),
    ] = DEFAULT_ENCLAVE_SIZE,
    max_threads: Annotated[
        int, typer.Option("--max-threads", metavar="N", help="sgx: most threads at a time.")
    ] = DEFAULT_MAX_THREADS,
    edmm: Annotated[
        bool,
        typer.Option("--edmm/--no-edmm", help="sgx: add enclave memory on demand (SGX2, EDMM)."),
    ] = False,
    debug_enclave: Annotated[
        bool,
        typer.Option(
            "--debug-enclave",
            help="sgx, INSECURE, development only: a debug enclave, whose memory the host can "
            "read. Needs a dev workspace.",
        ),
    ] = False,
    workspace: WorkspaceOption = None,
    passphrase_file: PassphraseFileOption = None,
) -> None:
    """Run a workload attested: measure it, launch it in the TEE with a way to get evidence,
    and serve it the attestation service and the KMS on loopback TLS. Keys are released to it
    only if a key's policy names its measurement (`ppml policy allow`). Exits with the
    workload's code.
    """
    with handle_errors():
        _check_tee(tee)
        m = _manifest(command, trusted, env)
        if kms is not None and not kms.startswith("https://"):
            raise UsageError("--kms takes an https:// URL (ppml never speaks plain HTTP)")
        if tee == "sgx":
            from ppml.tee.gramine import EnclaveOptions

            options = EnclaveOptions(enclave_size, max_threads, edmm, debug_enclave)
            raise typer.Exit(
                _run_sgx(m, options, data, workspace, passphrase_file, kms, measure_only)
            )
        if measure_only:
            if tee != "sim":
                raise UsageError(
                    f"--measure with --tee {tee}: the measurement is the VM's (MRTD for tdx, "
                    "MEASUREMENT for snp), which its image tooling computes, not ppml"
                )
            typer.echo(m.measurement())
            return
        raise typer.Exit(_run_manifest(m, tee, workspace, passphrase_file, kms))


def _check_tee(tee: str) -> None:
    if tee not in TEE_BACKENDS:
        raise UsageError(
            f"unknown or unsupported TEE backend {tee!r} (available: {', '.join(TEE_BACKENDS)})"
        )


def run_attested(
    command: list[str], tee: str, workspace: Path | None, passphrase_file: Path | None
) -> int:
    """Run `command` attested, as `ppml run --tee TEE -- command` does; returns its exit code."""
    m = _manifest(command, None, None)
    if tee == "sgx":
        from ppml.tee.gramine import EnclaveOptions

        return _run_sgx(m, EnclaveOptions(), None, workspace, passphrase_file, None, False)
    return _run_manifest(m, tee, workspace, passphrase_file)


def _run_manifest(
    m: WorkloadManifest,
    tee: str,
    workspace: Path | None,
    passphrase_file: Path | None,
    kms_url: str | None = None,
) -> int:
    _check_tee(tee)
    if tee in ("tdx", "snp"):
        return _run_tsm(m, tee, workspace, passphrase_file, kms_url)
    if tee != "sim":
        raise UsageError(f"--tee {tee} is not run this way")
    ws = open_workspace(workspace, passphrase_file)
    if not ws.dev:
        raise ConfigurationError(
            "the sim TEE runs only with a development workspace (`ppml init --dev`)",
            path=ws.path,
        )
    typer.echo(SIM_NOTICE, err=True)
    return _launch_sim(ws, m, kms_url)


def _launch_sim(ws: Workspace, m: WorkloadManifest, kms_url: str | None = None) -> int:
    """Run `m` attested by the workspace's simulated TEE (the caller checked it is dev)."""
    from ppml.attestation.sim import SimPlatform

    measurement = m.measurement()
    platform = SimPlatform(ws.sim_platform_key())
    return _launch(ws, m, "sim", lambda rd: platform.quote(measurement, rd), kms_url)


def _run_tsm(
    m: WorkloadManifest,
    tee: str,
    workspace: Path | None,
    passphrase_file: Path | None,
    kms_url: str | None,
) -> int:
    """A TDX or SEV-SNP guest: the command runs as it is; the launcher gets reports from
    configfs-tsm and hands them over the evidence channel."""
    from ppml.tee.hardware import require_tsm_guest

    client = require_tsm_guest(tee)  # before anything is opened or started
    ws = open_workspace(workspace, passphrase_file)
    return _launch(ws, m, tee, lambda rd: client.report(rd).outblob, kms_url)


def _run_sgx(
    m: WorkloadManifest,
    options: EnclaveOptions,
    data: list[Path] | None,
    workspace: Path | None,
    passphrase_file: Path | None,
    kms_url: str | None,
    measure_only: bool,
) -> int:
    """Gramine-SGX: write the manifest, sign it with the workspace's enclave key, and (unless
    only measuring) start `gramine-sgx`; the workload makes its own quotes in the enclave."""
    from ppml.tee import gramine, hardware
    from ppml.tee.runtime import KMS_URL_ENV

    # Everything this machine lacks is reported before anything is opened or started.
    hardware.require_gramine(hardware.GRAMINE_TOOLS[:2] if measure_only else hardware.GRAMINE_TOOLS)
    if not measure_only:
        hardware.require_sgx_device()
    ws = open_workspace(workspace, passphrase_file)
    if options.debug:
        if not ws.dev:
            raise ConfigurationError(
                "--debug-enclave runs only with a development workspace (`ppml init --dev`)",
                path=ws.path,
            )
        typer.echo(DEBUG_ENCLAVE_NOTICE, err=True)
    host = gramine.host_for(m, ca_pem=ws.ca_cert.read_text(), data_dirs=data or [Path.cwd()])
    template = gramine.render_manifest_template(m, options, host)
    with gramine.enclave_build(template, ws.enclave_key_path) as enclave:
        if measure_only:
            typer.echo(enclave.mrenclave)
            return 0
        argv = gramine.launch_command(enclave)
        typer.echo(f"ppml: SGX enclave {enclave.mrenclave} (Gramine)", err=True)

        def start(url: str) -> int:
            child_env = m.child_environment(dict(os.environ))
            child_env[KMS_URL_ENV] = url
            try:
                proc = subprocess.Popen(argv, env=child_env)  # noqa: S603 -- gramine-sgx, signed
            except OSError as exc:
                raise UsageError(f"cannot start gramine-sgx: {exc.strerror}") from None
            return _wait(proc)

        return _serve(ws, f"sgx:{enclave.mrenclave[:16]}", kms_url, start)


def _serve(ws: Workspace, actor: str, kms_url: str | None, start: Callable[[str], int]) -> int:
    """Call `start(url)` with the URL of the attestation service and KMS: `kms_url`, or this
    workspace's, served on loopback TLS for as long as `start` runs."""
    from ppml.server.app import create_app
    from ppml.server.embedded import services_for, tls_files_for
    from ppml.server.tls import serving

    if kms_url is not None:
        return start(kms_url.rstrip("/"))
    services = services_for(ws, actor=actor)
    try:
        with serving(create_app(services), tls_files_for(ws)) as server:
            return start(server.url)
    finally:
        services.keys.close()


def _launch(
    ws: Workspace,
    manifest: WorkloadManifest,
    tee: str,
    quote: Callable[[bytes], bytes],
    kms_url: str | None = None,
) -> int:
    from ppml.tee.channel import CHANNEL_ENV, EvidenceChannelServer
    from ppml.tee.runtime import CA_PEM_ENV, KMS_URL_ENV, TEE_ENV

    measurement = manifest.measurement()
    channel = EvidenceChannelServer(quote, tee=tee)

    def start(url: str) -> int:
        child_env = manifest.child_environment(dict(os.environ))
        child_env.update(
            {
                TEE_ENV: tee,
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
        return _serve(ws, f"{tee}:{measurement[:16]}", kms_url, start)
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
