"""`ppml flink setup|run` and `ppml flink cluster up|status|down`: Flink with TLS, keys by relay."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ppml.cli._attested import Launch, Workload, launch_prepared, progress
from ppml.cli._common import (
    PassphraseFileOption,
    WorkspaceOption,
    cluster_status_text,
    open_workspace,
    workspace_dir,
)
from ppml.errors import UsageError

if TYPE_CHECKING:
    from ppml.tee.launcher import RunDirectory
    from ppml.workspace import Workspace

_RUN_CONTEXT = {
    "allow_extra_args": True,
    "ignore_unknown_options": True,
    "allow_interspersed_args": False,
}

flink_app = typer.Typer(
    help="Apache Flink jobs over encrypted data (PyFlink, in an environment of its own).",
    no_args_is_help=True,
)
cluster_app = typer.Typer(
    help="A standalone Flink cluster (JobManager and TaskManagers) with mutual TLS on every "
    "connection, from the workspace's CA.",
    no_args_is_help=True,
)
flink_app.add_typer(cluster_app, name="cluster")


def register(app: typer.Typer) -> None:
    app.add_typer(flink_app, name="flink")


def _flink_dir(ws_path: Path) -> Path:
    from ppml._internal.fs import ensure_private_dir

    d = ws_path / "flink"
    ensure_private_dir(d)
    return d


@flink_app.command("setup")
def setup(
    venv: Annotated[
        Path | None,
        typer.Option(
            "--venv",
            metavar="DIR",
            help="Where to make the environment. Default: ~/.local/share/ppml/flink-venv "
            "($XDG_DATA_HOME/ppml/flink-venv).",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Reinstall ppml and Flink into an existing one.")
    ] = False,
    source: Annotated[
        Path | None,
        typer.Option(
            "--source",
            metavar="PATH",
            help="The ppml to install into it: its source directory or a ppml wheel. Default: "
            "where pip installed this ppml from.",
        ),
    ] = None,
) -> None:
    """Make Flink's Python environment: a virtual environment with apache-flink and this ppml
    (Flink's dependencies cannot share one with PySpark 4 and the newest pyarrow). Prints the
    interpreter; `ppml flink` finds it there, or through $PPML_FLINK_PYTHON.

    ppml comes from the source directory or wheel pip installed this ppml from (or --source),
    never by name from a package index."""
    from ppml.engines.flink.environment import default_venv, setup_flink_environment

    found = setup_flink_environment(
        venv or default_venv(), force=force, source=source, progress=progress
    )
    progress(f"Flink {found.flink_version} with ppml ({found.ppml_package})")
    typer.echo(found.python)


@flink_app.command("run", context_settings=_RUN_CONTEXT)
def run(
    args: Annotated[
        list[str],
        typer.Argument(
            metavar="JOB.py [ARGS...]",
            help="The PyFlink job and its arguments.",
            show_default=False,
        ),
    ],
    local: Annotated[
        bool,
        typer.Option(
            "--local",
            help="Run on a mini-cluster in this job's own process (the "
            "default when no cluster is up).",
        ),
    ] = False,
    cluster: Annotated[
        bool,
        typer.Option(
            "--cluster",
            help="Run on the workspace's cluster (`ppml flink "
            "cluster up`); the default when one is up.",
        ),
    ] = False,
    tee: Annotated[
        str | None,
        typer.Option(
            "--tee",
            help="Run the job attested on this TEE backend (sim): its keys "
            "are released only to its measurement.",
        ),
    ] = None,
    measure_only: Annotated[
        bool, typer.Option("--measure", help="Print the attested job's measurement and exit.")
    ] = False,
    data: Annotated[
        list[Path] | None,
        typer.Option(
            "--data",
            metavar="DIR",
            help="With --tee: a directory the attested job "
            "may write to, or read under /tmp (repeatable; default: the current "
            "directory).",
        ),
    ] = None,
    workspace: WorkspaceOption = None,
    passphrase_file: PassphraseFileOption = None,
) -> None:
    """Run a PyFlink job with TLS between Flink's processes and keys served to its operators
    (`from ppml.flink import read_encrypted_files, ...`) by a relay this command runs for the
    job's lifetime; no key or password reaches the job's command line, environment, job
    parameters or logs. Waits for the job and exits with its code.

    With --tee sim the job's own Python runs attested as in `ppml run --tee sim` (the job file
    and its local imports, Flink's environment and Java measured) and serves its operators the
    keys that the KMS releases to its measurement (`ppml flink run --measure JOB.py ARGS`)."""
    from ppml.engines.flink.cluster import CLUSTER_DIR, read_cluster_state
    from ppml.engines.flink.environment import find_flink_environment
    from ppml.engines.flink.relay import KeyRelay
    from ppml.engines.flink.submit import prepare_run, run_job
    from ppml.engines.java import find_java

    if local and cluster:
        raise UsageError("--local and --cluster exclude each other")
    if tee is not None and tee != "sim":
        raise UsageError(f"unknown or unsupported TEE backend {tee!r} (available: sim)")
    job, job_args = Path(args[0]), args[1:]
    if not local and not cluster:
        flink_state = workspace_dir(workspace).absolute() / "flink" / CLUSTER_DIR
        local = read_cluster_state(flink_state) is None
    if measure_only or tee is not None:
        raise typer.Exit(
            _attested(job, job_args, local, measure_only, data or [], workspace, passphrase_file)
        )
    ws = open_workspace(workspace, passphrase_file)
    flink_dir = _flink_dir(ws.path)
    flink = find_flink_environment()
    java = find_java(flink_dir / "java")
    keys = ws.key_service(actor="flink")
    try:
        with (
            prepare_run(ws, flink_dir, flink, java, job, job_args, local=local) as prepared,
            KeyRelay(keys, host=prepared.relay_host) as relay,
        ):
            relay.write_ticket(prepared.ticket)
            progress(f"running {job.name} on {'a mini-cluster' if local else 'the cluster'}")
            try:
                code = run_job(prepared)
            finally:
                if not local:
                    _cancel_leftovers(flink_dir, prepared.tag)
    finally:
        keys.close()
    raise typer.Exit(code)


def _cancel_leftovers(flink_dir: Path, tag: str) -> None:
    """The job outlives its client only when the client was stopped (a signal, a crash): then
    it is cancelled, as `--local` jobs end with their process."""
    from ppml.engines.flink.cluster import cancel_run_jobs

    if cancel_run_jobs(flink_dir, tag):
        progress("cancelled the job on the cluster (its run ended first)")


def _attested_workload(
    java_dir: Path, job: Path, job_args: list[str], local: bool, relay_host: str
) -> Workload:
    from ppml.engines.flink.attested import job_parts
    from ppml.engines.flink.environment import find_flink_environment
    from ppml.engines.java import find_java, measure_java

    flink = find_flink_environment()
    home = find_java(java_dir).real_home
    digest = measure_java(home, progress)
    parts = job_parts(flink, home, digest, job, job_args, local=local, relay_host=relay_host)
    return Workload(parts.command, parts.trusted, fixed_env=parts.fixed_env, extra=parts.extra)


def _attested(
    job: Path,
    job_args: list[str],
    local: bool,
    measure_only: bool,
    data: list[Path],
    workspace: Path | None,
    passphrase_file: Path | None,
) -> int:
    """`ppml flink run --tee sim` (or `--measure`): the job's Python attested, in a sandbox."""
    import tempfile

    from ppml.engines.flink.attested import write_job_boot
    from ppml.engines.flink.jobconf import relay_host

    flink_dir = workspace_dir(workspace).absolute() / "flink"
    host = relay_host(flink_dir, local)
    if measure_only:
        with tempfile.TemporaryDirectory(prefix="ppml-measure-") as tmp:
            workload = _attested_workload(Path(tmp), job, job_args, local, host)
            typer.echo(workload.manifest().measurement())
        section = dict(workload.extra)["flink"]
        progress(
            f"covers Flink {section['version']} ({section['home']}) and Java "
            f"({section['java']['home']}, digest {section['java']['digest'][:16]}...)"
        )
        return 0

    tag = secrets.token_hex(8)

    def prepare(ws: Workspace, run: RunDirectory) -> Workload:
        from ppml.engines.flink.environment import find_flink_environment

        flink = find_flink_environment()
        write_job_boot(ws, flink_dir, flink, run.boot, local=local, tag=tag)
        return _attested_workload(run.path / "java", job, job_args, local, host)

    try:
        return launch_prepared(prepare, Launch("sim", data=tuple(data)), workspace, passphrase_file)
    finally:
        if not local:
            _cancel_leftovers(flink_dir, tag)


@cluster_app.command("up")
def cluster_up(
    taskmanagers: Annotated[
        int, typer.Option("--taskmanagers", min=1, help="Number of TaskManagers.")
    ] = 1,
    slots: Annotated[int, typer.Option("--slots", min=1, help="Task slots per TaskManager.")] = 2,
    memory: Annotated[
        str, typer.Option("--memory", help="Process memory per TaskManager (e.g. 1536m).")
    ] = "1536m",
    host: Annotated[
        str, typer.Option("--host", help="Address to bind and advertise (default loopback).")
    ] = "127.0.0.1",
    workspace: WorkspaceOption = None,
    passphrase_file: PassphraseFileOption = None,
) -> None:
    """Start a JobManager and TaskManagers with mutual TLS 1.3 on RPC, data and REST
    connections (certificates issued by the workspace CA for this cluster); print the REST URL."""
    from ppml.engines.flink.cluster import start_cluster
    from ppml.engines.flink.environment import find_flink_environment
    from ppml.engines.java import find_java

    ws: Workspace = open_workspace(workspace, passphrase_file)
    flink_dir = _flink_dir(ws.path)
    flink = find_flink_environment()
    java = find_java(flink_dir / "java")
    progress(f"starting a JobManager and {taskmanagers} TaskManager(s) on {host}")
    state = start_cluster(
        ws,
        flink_dir,
        flink,
        java,
        taskmanagers=taskmanagers,
        slots=slots,
        memory=memory,
        host=host,
    )
    typer.echo(state.rest_url)


@cluster_app.command("down")
def cluster_down(workspace: WorkspaceOption = None) -> None:
    """Stop the cluster's processes and remove its key stores (needs no passphrase)."""
    from ppml.engines.flink.cluster import stop_cluster

    stopped = stop_cluster(workspace_dir(workspace).absolute() / "flink")
    typer.echo(f"stopped {stopped} process(es)")


@cluster_app.command("status")
def cluster_status(
    fmt: Annotated[str, typer.Option("--format", help="Output format: text or json.")] = "text",
    workspace: WorkspaceOption = None,
) -> None:
    """Show the cluster's REST URL, its processes, task slots and jobs. Exit 1 if none is up."""
    from ppml.engines.flink.cluster import cluster_status as status

    info = cluster_status_text(status(workspace_dir(workspace).absolute() / "flink"), fmt)
    if info is None:
        return
    jm = info["jobmanager"]
    typer.echo(f"jobmanager {info['rest_url']}  pid {jm['pid']}  {'up' if jm['alive'] else 'DOWN'}")
    for tm in info["taskmanagers"]:
        typer.echo(
            f"taskmanager pid {tm['pid']}  {'up' if tm['alive'] else 'DOWN'}  log {tm['log']}"
        )
    overview = info.get("overview")
    if overview:
        typer.echo(
            f"slots {overview['slots-available']}/{overview['slots-total']} free, "
            f"jobs running {overview['jobs-running']}, finished {overview['jobs-finished']}, "
            f"failed {overview['jobs-failed']}"
        )
