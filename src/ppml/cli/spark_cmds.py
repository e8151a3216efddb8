"""`ppml spark-submit` and `ppml spark cluster up|down|status`: Spark with its security on."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ppml.cli._attested import Launch, Workload, launch_prepared, progress, shared_dir
from ppml.cli._common import (
    PassphraseFileOption,
    WorkspaceOption,
    cluster_status_text,
    open_workspace,
)
from ppml.errors import UsageError

if TYPE_CHECKING:
    from ppml.engines.java import JavaRuntime
    from ppml.engines.spark.launcher import SubmitRequest
    from ppml.tee.launcher import RunDirectory
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


DecryptOption = Annotated[
    list[str] | None,
    typer.Option(
        "--decrypt",
        metavar="PATH",
        help="With --tee and a JVM application: encrypted Parquet (a file or a directory) "
        "that the application reads with Spark's own reader; the attested driver releases "
        "exactly these files' keys to it (repeatable, measured).",
    ),
]


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
    data: Annotated[
        list[Path] | None,
        typer.Option(
            "--data",
            metavar="DIR",
            help="With --tee: a directory the attested driver may write to, or read under /tmp "
            "(repeatable; default: the current directory).",
        ),
    ] = None,
    decrypt: DecryptOption = None,
    workspace: WorkspaceOption = None,
    passphrase_file: PassphraseFileOption = None,
) -> None:
    """Run a Spark application with authentication, TLS (RPC and HTTP) and I/O encryption on,
    configured from the workspace; its secrets never appear on a command line.

    With --tee sim the driver runs attested as in `ppml run --tee sim`: keys are released to it
    only if a key's policy names its measurement (`ppml spark-submit --measure APP`). A JVM
    application (`--class CLASS APP.jar`) runs attested too, its jar measured; it gets the keys
    of the `--decrypt` files for Spark's Parquet reader. Exits with the application's code.
    """
    from ppml.engines.spark.launcher import parse_submit_args

    req = parse_submit_args(args, master=master, py_files=py_files or [])
    if tee is not None and tee != "sim":
        raise UsageError(f"unknown or unsupported TEE backend {tee!r} (available: sim)")
    paths = (*(decrypt or ()), *req.decrypt)
    if paths and tee is None and not measure_only:
        raise UsageError("--decrypt needs --tee: keys are released to an attested driver only")
    if measure_only:
        from ppml.engines.java import find_java

        with tempfile.TemporaryDirectory(prefix="ppml-measure-") as tmp:
            workload = _driver_workload(req, find_java(Path(tmp), quiet=True), paths)
            manifest = workload.manifest()
        typer.echo(manifest.measurement())
        spark = dict(workload.extra)["spark"]
        typer.echo(
            f"ppml: covers Spark {spark['version']} ({spark['home']}) and Java "
            f"{spark['java']['version']} ({spark['java']['home']}, digest "
            f"{spark['java']['digest'][:16]}...)",
            err=True,
        )
        return
    if tee is not None:
        raise typer.Exit(_submit_attested(req, ui, data or [], paths, workspace, passphrase_file))
    raise typer.Exit(_submit(req, ui, workspace, passphrase_file))


def _driver_workload(
    req: SubmitRequest, java: JavaRuntime, decrypt: tuple[str, ...] = ()
) -> Workload:
    """The attested driver, as `ppml.engines.spark.attested` describes it."""
    from ppml.engines.java import measure_java
    from ppml.engines.spark.attested import driver_parts, is_jvm_application, jvm_driver_request
    from ppml.engines.spark.launcher import ppml_jars

    digest = measure_java(java.real_home, progress)
    driver = jvm_driver_request(req) if is_jvm_application(req) else req
    options = driver.submit_options(extra_jars=ppml_jars())
    parts = driver_parts(req, java, options, digest, decrypt)
    return Workload(parts.command, parts.trusted, fixed_env=parts.fixed_env, extra=parts.extra)


def _submit_attested(
    req: SubmitRequest,
    ui: bool,
    data: list[Path],
    decrypt: tuple[str, ...],
    workspace: Path | None,
    passphrase_file: Path | None,
) -> int:
    """The driver attested on the sim TEE, its JVM in the same sandbox."""
    from ppml.engines.java import find_java
    from ppml.engines.spark.attested import write_driver_boot
    from ppml.engines.spark.launcher import executor_defaults, security_properties

    stores = shared_dir() / f"spark-stores-{secrets.token_hex(8)}"

    def prepare(ws: Workspace, run: RunDirectory) -> Workload:
        java = find_java(run.path / "java", quiet=True)
        props = security_properties(ws, ui=ui) | executor_defaults(req, _spark_dir(ws))
        write_driver_boot(ws, java, run.boot, props, stores)
        return _driver_workload(req, java, decrypt)

    how = Launch("sim", data=tuple(data), exposed=(stores,))
    try:
        return launch_prepared(prepare, how, workspace, passphrase_file)
    finally:
        shutil.rmtree(stores, ignore_errors=True)


def _submit(
    req: SubmitRequest, ui: bool, workspace: Path | None, passphrase_file: Path | None
) -> int:
    from ppml._internal.fs import ensure_private_dir
    from ppml.engines.java import find_java
    from ppml.engines.spark.launcher import (
        executor_defaults,
        ppml_jars,
        private_conf_dir,
        security_properties,
        spark_environment,
        spark_home,
    )

    ws = open_workspace(workspace, passphrase_file)
    java = find_java(_spark_dir(ws), quiet=True)
    home = spark_home()
    runs = _spark_dir(ws) / "run"
    ensure_private_dir(runs)
    options = req.submit_options(extra_jars=ppml_jars())
    props = security_properties(ws, ui=ui) | executor_defaults(req, _spark_dir(ws))
    with private_conf_dir(props, parent=runs) as conf_dir:
        env = spark_environment(java, conf_dir, master=req.master)
        command = [str(home / "bin" / "spark-submit"), *options, str(req.app), *req.app_args]
        try:
            proc = subprocess.Popen(command, env=env)  # noqa: S603 -- the user's job
        except OSError as exc:
            raise UsageError(f"cannot start spark-submit: {exc.strerror}") from None
        from ppml.tee.launcher import wait_forwarding_signals

        return wait_forwarding_signals(proc)


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
    from ppml.engines.spark.launcher import start_cluster

    ws = open_workspace(workspace, passphrase_file)
    state = start_cluster(ws, _spark_dir(ws), workers=workers, cores=cores, memory=memory)
    typer.echo(state.master_url)


@cluster_app.command("down")
def cluster_down(workspace: WorkspaceOption = None) -> None:
    """Stop the cluster's workers and master (needs no passphrase)."""
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
    from ppml.cli._common import workspace_dir
    from ppml.engines.spark.launcher import cluster_status as status

    info = cluster_status_text(status(workspace_dir(workspace).absolute() / "spark"), fmt)
    if info is None:
        return
    typer.echo(
        f"master {info['master_url']}  pid {info['master']['pid']}  "
        f"{'up' if info['master']['alive'] else 'DOWN'}"
    )
    for w in info["workers"]:
        typer.echo(f"worker pid {w['pid']}  {'up' if w['alive'] else 'DOWN'}  log {w['log']}")
