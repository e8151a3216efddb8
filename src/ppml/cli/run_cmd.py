"""`ppml measure`, `ppml run` (attested runs: sim, sgx through Gramine or Occlum, tdx and snp
guests) and `ppml serve`."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ppml.cli._attested import (
    Launch,
    Workload,
    hidden_paths,
    launch,
    loopback_services,
    open_for_launch,
    require_dev,
)
from ppml.cli._common import PassphraseFileOption, WorkspaceOption, open_workspace
from ppml.errors import UsageError
from ppml.tee.command import DEFAULT_ENV
from ppml.tee.gramine import DEFAULT_ENCLAVE_SIZE, DEFAULT_MAX_THREADS

if TYPE_CHECKING:
    from ppml.tee.gramine import EnclaveOptions

_EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}

TrustedOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--trusted",
        metavar="PATH",
        help="Another file or directory of code or configuration to measure (repeatable); "
        "Python programs the workload starts may run measured scripts only.",
    ),
]
EnvOption = Annotated[
    list[str] | None,
    typer.Option(
        "--env",
        metavar="NAME[=VALUE]",
        help="Pass this environment variable to the workload, its value measured (repeatable; "
        "NAME alone takes the current value). Always passed: "
        + ", ".join(DEFAULT_ENV)
        + " (and TMPDIR=/tmp). Variables that change which code runs (LD_*, PYTHON*, *PATH, "
        "JAVA_TOOL_OPTIONS, ...) are refused.",
    ),
]
CommandArg = Annotated[list[str], typer.Argument(metavar="-- CMD [ARGS...]", show_default=False)]
DataOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--data",
        metavar="DIR",
        help="A directory the workload may write to (repeatable; default: the current "
        "directory). Everything else is read-only for it; /tmp is its own.",
    ),
]


def register(app: typer.Typer) -> None:
    app.command("measure", context_settings=_EXTRA)(measure)
    app.command("run", context_settings=_EXTRA)(run)
    app.command("serve")(serve)


def _workload(command: list[str], trusted: list[Path] | None, env: list[str] | None) -> Workload:
    return Workload(tuple(command), tuple(trusted or ()), tuple(env or ()))


def measure(
    command: CommandArg,
    trusted: TrustedOption = None,
    env: EnvOption = None,
    manifest: Annotated[
        bool, typer.Option("--manifest", help="Also print the measured manifest (JSON).")
    ] = False,
) -> None:
    """Print a workload's measurement (SHA-384, lowercase hex) alone on the first line.

    The measurement covers the resolved command (the program's binary, the interpreter's
    options, the script or module, the arguments), the script's local imports and every
    --trusted file, the environment variables with their values, the Python environment
    (the interpreter and every file it can import) and the launch protocol.
    """
    m = _workload(command, trusted, env).manifest()
    typer.echo(m.measurement())
    if manifest:
        typer.echo(json.dumps(m.describe(), indent=2))


TEE_BACKENDS = ("sim", "sgx", "tdx", "snp")
SGX_LIBOSES = ("gramine", "occlum")
TEE_HELP = (
    "TEE backend: sim (simulated: development only, needs a `ppml init --dev` workspace); "
    "sgx (an Intel SGX enclave through Gramine: needs gramine-manifest, gramine-sgx-sign and "
    "gramine-sgx on PATH and /dev/sgx_enclave; or through Occlum with --libos occlum: needs "
    "occlum and copy_bom on PATH, /opt/occlum and /dev/sgx_enclave); tdx or snp (this machine "
    "is an Intel TDX or AMD SEV-SNP confidential VM: evidence comes from "
    "/sys/kernel/config/tsm/report, Linux 6.7+)."
)
DEBUG_ENCLAVE_NOTICE = (
    "ppml: DEBUG ENCLAVE (--debug-enclave): the host can read the enclave's memory. "
    "For development only; production key policies refuse debug enclaves."
)


LibosOption = Annotated[
    str | None,
    typer.Option(
        "--libos",
        metavar="NAME",
        help="sgx: the library OS that runs the workload in the enclave: gramine (the "
        "default) or occlum (Python workloads).",
    ),
]


def run(
    command: CommandArg,
    tee: Annotated[str, typer.Option("--tee", help=TEE_HELP)] = "sim",
    libos: LibosOption = None,
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
    data: DataOption = None,
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
    """Run a workload attested: measure it, start it sandboxed in the TEE with a way to get
    evidence, and serve it the attestation service and the KMS on loopback TLS. Keys are
    released to it only if a key's policy names its measurement (`ppml policy allow`). Exits
    with the workload's code.

    The workload cannot see the workspace, the passphrase file or this process; it writes only
    to its --data directories; the files measured are the files that run.
    """
    _check_tee(tee)
    if libos is not None and tee != "sgx":
        raise UsageError(f"--libos chooses the SGX library OS: it has no meaning with --tee {tee}")
    if libos is not None and libos not in SGX_LIBOSES:
        raise UsageError(f"unknown SGX library OS {libos!r} (available: {', '.join(SGX_LIBOSES)})")
    if kms is not None and not kms.startswith("https://"):
        raise UsageError("--kms takes an https:// URL (ppml never speaks plain HTTP)")
    workload = _workload(command, trusted, env)
    if tee == "sgx":
        from ppml.tee.gramine import EnclaveOptions

        options = EnclaveOptions(enclave_size, max_threads, edmm, debug_enclave)
        raise typer.Exit(
            _run_sgx(workload, options, data, workspace, passphrase_file, kms, measure_only, libos)
        )
    if measure_only:
        if tee != "sim":
            raise UsageError(
                f"--measure with --tee {tee}: the measurement is the VM's (MRTD for tdx, "
                "MEASUREMENT for snp), which its image tooling computes, not ppml"
            )
        typer.echo(workload.manifest().measurement())
        return
    how = Launch(tee, data=tuple(data or ()), kms_url=kms)
    raise typer.Exit(launch(workload, how, workspace, passphrase_file))


def _check_tee(tee: str) -> None:
    if tee not in TEE_BACKENDS:
        raise UsageError(
            f"unknown or unsupported TEE backend {tee!r} (available: {', '.join(TEE_BACKENDS)})"
        )


def _run_sgx(
    workload: Workload,
    options: EnclaveOptions,
    data: list[Path] | None,
    workspace: Path | None,
    passphrase_file: Path | None,
    kms_url: str | None,
    measure_only: bool,
    libos: str | None = None,
) -> int:
    """SGX through Gramine (write the manifest, sign it with the workspace's enclave key and,
    unless only measuring, start `gramine-sgx`) or Occlum (make, fill, build and sign an
    instance, then `occlum run`); the workload makes its own quotes in the enclave."""
    from ppml.tee import attester, gramine, occlum
    from ppml.tee.workload_env import KMS_URL_ENV

    occlum_run = libos == "occlum"
    # Everything this machine lacks is reported before anything is opened or started.
    if occlum_run:
        attester.require_occlum()
    else:
        tools = attester.GRAMINE_TOOLS
        attester.require_gramine(tools[:2] if measure_only else tools)
    if not measure_only:
        attester.require_sgx_device()
    m = workload.manifest(forbidden=hidden_paths(workspace, passphrase_file))
    ws = open_for_launch(workspace, passphrase_file)
    if options.debug:
        require_dev(ws, "--debug-enclave")
        typer.echo(DEBUG_ENCLAVE_NOTICE, err=True)
    host = gramine.host_for(m, ca_pem=ws.ca_cert.read_text(), data_dirs=data or [Path.cwd()])
    build: contextlib.AbstractContextManager[gramine.SignedEnclave | occlum.OcclumEnclave]
    if occlum_run:
        build = occlum.occlum_build(m, options, host, ws.enclave_key_path)
    else:
        template = gramine.render_manifest_template(m, options, host)
        build = gramine.enclave_build(template, ws.enclave_key_path)
    with build as enclave:
        if measure_only:
            typer.echo(enclave.mrenclave)
            return 0
        if isinstance(enclave, occlum.OcclumEnclave):
            name, argv, cwd = "Occlum", occlum.launch_command(enclave), enclave.directory
        else:
            name, argv, cwd = "Gramine", gramine.launch_command(enclave), None
        typer.echo(f"ppml: SGX enclave {enclave.mrenclave} ({name})", err=True)
        with loopback_services(ws, f"sgx:{enclave.mrenclave[:16]}", kms_url) as url:
            child_env = {**m.child_environment(), KMS_URL_ENV: url}
            try:
                proc = subprocess.Popen(argv, env=child_env, cwd=cwd)  # noqa: S603 -- signed
            except OSError as exc:
                raise UsageError(f"cannot start {Path(argv[0]).name}: {exc.strerror}") from None
            from ppml.tee.launcher import wait_forwarding_signals

            return wait_forwarding_signals(proc)


def serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8443,
    workspace: WorkspaceOption = None,
    passphrase_file: PassphraseFileOption = None,
) -> None:
    """Serve the attestation service and the KMS over HTTPS (no plain HTTP), with the
    workspace's certificates. Administrators authenticate with the workspace's client
    certificate (mutual TLS); workloads with attestation tokens. The OpenAPI document is at
    /openapi.json (no interactive docs: they would load third-party script). Challenges,
    attestations, releases and refused calls are rate limited per client (429, Retry-After)."""
    from ppml.server.app import create_app
    from ppml.server.embedded import services_for, tls_files_for
    from ppml.server.tls import serve_forever

    ws = open_workspace(workspace, passphrase_file)
    services = services_for(ws, actor="server")
    typer.echo(f"ppml serve: https://{host}:{port} (workspace {ws.path})", err=True)
    try:
        serve_forever(create_app(services), tls_files_for(ws), host=host, port=port)
    finally:
        services.close()
    sys.stdout.flush()
