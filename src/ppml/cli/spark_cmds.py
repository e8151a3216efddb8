"""`ppml spark-submit` and `ppml spark cluster up|down|status`: Spark with its security on."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ppml.cli._common import (
    PassphraseFileOption,
    WorkspaceOption,
    handle_errors,
    open_workspace,
    print_json,
)
from ppml.errors import ConfigurationError, UsageError

if TYPE_CHECKING:
    from ppml.engines.spark.launcher import SubmitRequest
    from ppml.tee.manifest import WorkloadManifest
    from ppml.workspace import Workspace

_SUBMIT_CONTEXT = {
    "allow_extra_args": True,
    "ignore_unknown_options": True,
    "allow_interspersed_args": False,
}

spark_app = typer.Typer(help="Spark on this machine.", no_args_is_help=True)
cluster_app = typer.Typer(
    help="A local Spark standalone cluster (master and workers on 127.0.0.1), with "
    "authentication and TLS on RPC.",
    no_args_is_help=True,
)
spark_app.add_typer(cluster_app, name="cluster")


def register(app: typer.Typer) -> None:
    app.command("spark-submit", context_settings=_SUBMIT_CONTEXT)(spark_submit)
    app.add_typer(spark_app, name="spark")


def _driver_manifest(req: SubmitRequest) -> WorkloadManifest:
    """What an attested Spark driver measures: this interpreter running APP with ARGS, APP's
    local imports, every --py-files entry, and the names of the variables Spark needs.

    The Python driver is the attested process (it starts the JVM through pyspark's gateway with
    PYSPARK_SUBMIT_ARGS): a JVM does not pass inherited descriptors on to the processes it
    starts, so the evidence channel could not reach a driver started by spark-submit."""
    from ppml.engines.spark.launcher import SPARK_ENV_ALLOW
    from ppml.tee.manifest import build_manifest

    return build_manifest(
        [sys.executable, str(req.app), *req.app_args],
        trusted=list(req.py_files),
        env_allow=SPARK_ENV_ALLOW,
    )


@contextlib.contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set `values` in os.environ for the block (the attested launcher reads it), then restore."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _spark_dir(ws: Workspace) -> Path:
    from ppml._internal.fs import ensure_private_dir

    d = ws.path / "spark"
    ensure_private_dir(d)
    return d


def spark_submit(
    args: Annotated[
        list[str],
        typer.Argument(
            metavar="[SPARK-SUBMIT OPTIONS] APP [ARGS...]",
            help="spark-submit options (--conf, --name, --jars, --driver-memory, ...), then the "
            "application and its arguments.",
            show_default=False,
        ),
    ],
    tee: Annotated[
        str | None,
        typer.Option("--tee", help="Run the driver attested on this TEE backend (sim)."),
    ] = None,
    measure_only: Annotated[
        bool, typer.Option("--measure", help="Print the driver's measurement and exit.")
    ] = False,
    master: Annotated[
        str | None,
        typer.Option("--master", metavar="URL", help="Spark master. Default: local[*]."),
    ] = None,
    py_files: Annotated[
        list[str] | None,
        typer.Option(
            "--py-files",
            metavar="FILES",
            help="Python files for the job (comma-separated, repeatable); measured with --tee.",
        ),
    ] = None,
    ui: Annotated[
        bool, typer.Option("--ui", help="Enable the driver's web UI (HTTPS, workspace keystore).")
    ] = False,
    workspace: WorkspaceOption = None,
    passphrase_file: PassphraseFileOption = None,
) -> None:
    """Run a Spark application with authentication, TLS (RPC and HTTP) and I/O encryption on,
    configured from the workspace; its secrets never appear on a command line.

    With --tee sim the driver runs attested as in `ppml run --tee sim`: keys are released to it
    only if a key's policy names its measurement (`ppml spark-submit --measure APP`).
    Exits with the application's code.
    """
    with handle_errors():
        from ppml.engines.spark.launcher import parse_submit_args

        req = parse_submit_args(args, master=master, py_files=py_files or [])
        if tee is not None and tee != "sim":
            raise UsageError(f"unknown or unsupported TEE backend {tee!r} (available: sim)")
        manifest = _driver_manifest(req)
        if measure_only:
            typer.echo(manifest.measurement())
            return
        raise typer.Exit(_submit(req, manifest, tee, ui, workspace, passphrase_file))


def _submit(
    req: SubmitRequest,
    manifest: WorkloadManifest,
    tee: str | None,
    ui: bool,
    workspace: Path | None,
    passphrase_file: Path | None,
) -> int:
    from ppml._internal.fs import ensure_private_dir
    from ppml.cli.run_cmd import SIM_NOTICE, _launch_sim, _wait
    from ppml.engines.spark.java import find_java
    from ppml.engines.spark.launcher import (
        ppml_jars,
        private_conf_dir,
        security_properties,
        spark_environment,
        spark_home,
    )

    ws = open_workspace(workspace, passphrase_file)
    if tee is not None and not ws.dev:
        raise ConfigurationError(
            "the sim TEE runs only with a development workspace (`ppml init --dev`)",
            path=ws.path,
        )
    java = find_java(_spark_dir(ws))
    home = spark_home()
    runs = _spark_dir(ws) / "run"
    ensure_private_dir(runs)
    options = req.submit_options(extra_jars=ppml_jars())
    with private_conf_dir(security_properties(ws, ui=ui), parent=runs) as conf_dir:
        if tee is None:
            env = spark_environment(java, conf_dir)
            command = [
                str(home / "bin" / "spark-submit"),
                *options,
                str(req.app),
                *req.app_args,
            ]
            try:
                proc = subprocess.Popen(command, env=env)  # noqa: S603 -- the user's job
            except OSError as exc:
                raise UsageError(f"cannot start spark-submit: {exc.strerror}") from None
            return _wait(proc)
        typer.echo(SIM_NOTICE, err=True)
        env = spark_environment(java, conf_dir, submit_args=options)
        from ppml.engines.spark.launcher import SPARK_ENV_ALLOW

        with _environ({k: env[k] for k in SPARK_ENV_ALLOW if k in env}):
            return _launch_sim(ws, manifest)


# -- the standalone cluster ----------------------------------------------------------------------


@cluster_app.command("up")
def cluster_up(
    workers: Annotated[int, typer.Option("--workers", min=1, help="Number of workers.")] = 1,
    cores: Annotated[int, typer.Option("--cores", min=1, help="Cores per worker.")] = 2,
    memory: Annotated[str, typer.Option("--memory", help="Memory per worker (e.g. 1g).")] = "1g",
    workspace: WorkspaceOption = None,
    passphrase_file: PassphraseFileOption = None,
) -> None:
    """Start a master and workers on 127.0.0.1; print the master URL."""
    with handle_errors():
        from ppml.engines.spark.launcher import start_cluster

        ws = open_workspace(workspace, passphrase_file)
        state = start_cluster(ws, _spark_dir(ws), workers=workers, cores=cores, memory=memory)
        typer.echo(state.master_url)


@cluster_app.command("down")
def cluster_down(workspace: WorkspaceOption = None) -> None:
    """Stop the cluster's workers and master (needs no passphrase)."""
    with handle_errors():
        from ppml.cli._common import workspace_dir
        from ppml.engines.spark.launcher import stop_cluster

        stopped = stop_cluster(workspace_dir(workspace).absolute() / "spark")
        typer.echo(f"stopped {stopped} process(es)")


@cluster_app.command("status")
def cluster_status(
    fmt: Annotated[str, typer.Option("--format", help="Output format: text or json.")] = "text",
    workspace: WorkspaceOption = None,
) -> None:
    """Show the cluster's master URL, processes and whether they are alive."""
    with handle_errors():
        from ppml.cli._common import check_format, workspace_dir
        from ppml.engines.spark.launcher import cluster_status as status

        check_format(fmt)
        info = status(workspace_dir(workspace).absolute() / "spark")
        if info is None:
            if fmt == "json":
                print_json({"running": False})
            else:
                typer.echo("no cluster")
            raise typer.Exit(1)
        if fmt == "json":
            print_json(info)
            return
        typer.echo(
            f"master {info['master_url']}  pid {info['master']['pid']}  "
            f"{'up' if info['master']['alive'] else 'DOWN'}"
        )
        for w in info["workers"]:
            typer.echo(f"worker pid {w['pid']}  {'up' if w['alive'] else 'DOWN'}  log {w['log']}")
