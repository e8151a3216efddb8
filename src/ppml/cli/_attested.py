"""Attested launches from the command line: the workspace, its services on loopback, and
`ppml.tee.launcher`, composed once for `ppml run`, `ppml sql --tee` and `ppml spark-submit --tee`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ppml.cli._common import open_workspace
from ppml.errors import ConfigurationError, UsageError

if TYPE_CHECKING:
    from ppml.tee.environment import EnvironmentCache
    from ppml.tee.launcher import RunDirectory
    from ppml.tee.manifest import WorkloadManifest
    from ppml.workspace import Workspace

SIM_NOTICE = (
    "ppml: SIMULATED TEE (sim): the workload is measured, sandboxed and attested, but nothing "
    "protects it from this host. For development and demonstration only."
)
RUN_DIR = "run"


def shared_dir() -> Path:
    """Where a launcher puts what it shares with processes outside the sandbox (a Spark
    cluster's executors read the key stores there): hidden from every workload but the one it
    is made for (`ppml.tee.launcher.shared_directory`)."""
    from ppml.tee.launcher import shared_directory

    return shared_directory()


def hidden_paths(workspace: Path | None, passphrase_file: Path | None) -> list[Path]:
    """What no workload sees and no measured file may be: the workspace, the shared directory,
    the passphrase file."""
    from ppml.cli._common import workspace_dir

    return [workspace_dir(workspace), shared_dir(), *([passphrase_file] if passphrase_file else [])]


def progress(message: str) -> None:
    typer.echo(f"ppml: {message}", err=True)


@dataclass(frozen=True, slots=True)
class Workload:
    """What is measured: the command and what it adds (see `ppml.tee.manifest.build_manifest`)."""

    command: Sequence[str]
    trusted: Sequence[Path] = ()
    env: Sequence[str] = ()
    fixed_env: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def manifest(
        self,
        *,
        snapshot: Path | None = None,
        cache: EnvironmentCache | None = None,
        forbidden: Sequence[Path] | None = None,
    ) -> WorkloadManifest:
        """The manifest; no trusted file may be one of `forbidden` (default: `hidden_paths`)."""
        from ppml.tee.manifest import build_manifest

        return build_manifest(
            list(self.command),
            trusted=self.trusted,
            env=self.env,
            fixed_env=self.fixed_env,
            extra=self.extra,
            snapshot=snapshot,
            environment_cache=cache,
            progress=progress,
            forbidden=hidden_paths(None, None) if forbidden is None else forbidden,
        )


@dataclass(frozen=True, slots=True)
class Launch:
    """Where and how: the TEE, the data directories, the KMS, files that must stay visible."""

    tee: str
    data: Sequence[Path] = ()
    kms_url: str | None = None
    visible: Sequence[Path] = ()
    exposed: Sequence[Path] = ()  # inside the hidden shared directory
    extra_env: Mapping[str, str] = field(default_factory=dict)


def open_for_launch(workspace: Path | None, passphrase_file: Path | None) -> Workspace:
    """Open the workspace, then harden this process (it now holds the master key)."""
    from ppml.tee.launcher import harden_launcher

    ws = open_workspace(workspace, passphrase_file)
    harden_launcher()
    return ws


def require_dev(ws: Workspace, what: str = "the sim TEE") -> None:
    if not ws.dev:
        raise ConfigurationError(
            f"{what} runs only with a development workspace (`ppml init --dev`)", path=ws.path
        )


@contextlib.contextmanager
def loopback_services(ws: Workspace, actor: str, kms_url: str | None) -> Iterator[str]:
    """The URL of the attestation service and KMS: `kms_url`, or this workspace's, served on
    loopback TLS for the block."""
    if kms_url is not None:
        yield kms_url.rstrip("/")
        return
    from ppml.server.app import create_app
    from ppml.server.embedded import services_for, tls_files_for
    from ppml.server.tls import serving

    services = services_for(ws, actor=actor)
    try:
        with serving(create_app(services), tls_files_for(ws)) as server:
            yield server.url
    finally:
        services.close()


def _quote_for(ws: Workspace, tee: str) -> Callable[[str], Callable[[bytes], bytes]]:
    """For a measurement, the function that makes evidence binding report data."""
    if tee == "sim":
        from ppml.tee.sim_launch import sim_quote_for

        return sim_quote_for(ws.sim_platform_key())
    if tee in ("tdx", "snp"):
        from ppml.tee.attester import require_tsm_guest

        client = require_tsm_guest(tee)
        return lambda _m: lambda rd: client.report(rd).outblob
    raise UsageError(f"--tee {tee} is not run this way")


def launch(
    workload: Workload,
    how: Launch,
    workspace: Path | None,
    passphrase_file: Path | None,
) -> int:
    """Measure `workload`, start it sandboxed with its evidence and the KMS, wait; its code."""
    return launch_prepared(lambda _ws, _run: workload, how, workspace, passphrase_file)


def launch_prepared(
    prepare: Callable[[Workspace, RunDirectory], Workload],
    how: Launch,
    workspace: Path | None,
    passphrase_file: Path | None,
) -> int:
    """`launch`, with the workload made by `prepare` once the workspace is open and the run
    directory exists (Spark writes its configuration into the boot directory)."""
    from ppml.tee import launcher

    if how.tee in ("tdx", "snp"):
        from ppml.tee.attester import require_tsm_guest

        require_tsm_guest(how.tee)  # before anything is opened or started
    ws = open_for_launch(workspace, passphrase_file)
    if how.tee == "sim":
        require_dev(ws)
    quote_for = _quote_for(ws, how.tee)
    hidden = [ws.path, *hidden_paths(workspace, passphrase_file)[1:]]
    isolation = launcher.Isolation(
        hidden=tuple(hidden),
        writable=tuple(how.data),
        visible=tuple(how.visible),
        exposed=tuple(how.exposed),
    )
    with launcher.prepared_run(ws.path / RUN_DIR) as run:
        manifest = prepare(ws, run).manifest(snapshot=run.snapshot, forbidden=hidden)
        measurement = manifest.measurement()
        for arg in launcher.unseen_arguments(manifest, isolation, Path.cwd()):
            progress(
                f"note: {arg} is not visible to the workload (its /tmp is its own, the "
                "workspace is hidden): pass its directory with --data"
            )
        if how.tee == "sim":
            typer.echo(SIM_NOTICE, err=True)
        with loopback_services(ws, f"{how.tee}:{measurement[:16]}", how.kms_url) as url:
            started = launcher.start(
                manifest,
                run,
                tee=how.tee,
                quote=quote_for(measurement),
                kms_url=url,
                ca_pem=ws.ca_cert.read_text(),
                isolation=isolation,
                extra_env=how.extra_env,
            )
            code = started.wait()
    sys.stdout.flush()
    return code
