"""Running a PyFlink job: on a mini-cluster in one process, or on the workspace's cluster.

A run gets a private directory ``<workspace>/flink/run/<id>/`` (removed when the job ends; a
run killed before it could clean up is swept by the next): its FLINK_HOME of links, its
configuration (``conf/``, 0600; for the mini-cluster, internal TLS with a node certificate
issued for this run; for the cluster, the REST client certificate), its logs and its scratch
space. The job's operators get their keys from the key relay that the caller runs
(`ppml.engines.flink.relay`), whose ticket is the one file ``$PPML_FLINK_RELAY`` names.

- ``--local``: ``python job.py ARGS`` in Flink's environment; PyFlink starts the mini-cluster
  in a JVM of its own, below this run's FLINK_HOME.
- on the cluster: ``flink run -py job.py ARGS`` against the cluster's REST endpoint (mutual
  TLS), attached: the command ends when the job does, with its exit code.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ppml._internal.fs import ensure_private_dir
from ppml._internal.procs import record_owner, sweep_orphaned
from ppml.engines.flink.cluster import flink_environment_variables, ppml_flink_jar
from ppml.engines.flink.config import (
    memory_directory,
    private_flink_home,
    remove_memory_directory,
    write_config,
)
from ppml.engines.flink.jobconf import TARGET_ENV, job_settings, relay_host
from ppml.engines.flink.relay import RELAY_ENV
from ppml.errors import UsageError

if TYPE_CHECKING:
    from ppml.engines.flink.environment import FlinkEnvironment
    from ppml.engines.java import JavaRuntime
    from ppml.workspace import Workspace

__all__ = ["JobRun", "job_command", "prepare_run"]

RUN_DIR = "run"


@dataclass(frozen=True, slots=True)
class JobRun:
    """A prepared run: where it lives, its environment, its command."""

    directory: Path
    command: tuple[str, ...]
    env: Mapping[str, str]
    relay_host: str
    ticket: Path
    tag: str  # the run's tag on the cluster's jobs (`cancel_run_jobs`)


def job_command(
    flink: FlinkEnvironment, home: Path, job: Path, args: Sequence[str], *, local: bool
) -> tuple[str, ...]:
    if local:
        return (str(flink.python), str(job), *args)
    return (str(home / "bin" / "flink"), "run", "--python", str(job), *args)


@contextlib.contextmanager
def prepare_run(
    ws: Workspace,
    flink_dir: Path,
    flink: FlinkEnvironment,
    java: JavaRuntime,
    job: Path,
    args: Sequence[str],
    *,
    local: bool,
) -> Iterator[JobRun]:
    """A run's private directory, configuration and command (see the module), removed after."""
    if not job.is_file():
        raise UsageError("no such job file", path=job)
    runs = flink_dir / RUN_DIR
    ensure_private_dir(runs)
    sweep_orphaned(runs, "*", _remove_run)
    d = runs / secrets.token_hex(8)
    ensure_private_dir(d)
    record_owner(d, os.getpid())
    checkpoints = memory_directory(d, "ppml-flink-run-") if local else None
    try:
        host = relay_host(flink_dir, local)
        settings = job_settings(
            ws,
            flink_dir,
            flink,
            d / "stores",
            local=local,
            scratch=d / "scratch",
            checkpoints=checkpoints,
            tag=d.name,
        )
        home = private_flink_home(flink, d / "home", [ppml_flink_jar()])
        write_config(d / "conf", settings, flink)
        ensure_private_dir(d / "log")
        env = flink_environment_variables(
            flink, java, home, d / "conf", d / "log", d / "scratch" / "tmp"
        )
        ticket = d / "relay.json"
        env[RELAY_ENV] = str(ticket)
        if local:
            env[TARGET_ENV] = "local"
        command = job_command(flink, home, job.absolute(), args, local=local)
        yield JobRun(d, command, env, host, ticket, d.name)
    finally:
        _remove_run(d)


def _remove_run(d: Path) -> None:
    """Remove a run's directory and its in-memory checkpoints."""
    remove_memory_directory(d)
    shutil.rmtree(d, ignore_errors=True)


def run_job(run: JobRun) -> int:
    """Start the job's process and wait for it (Ctrl-C and SIGTERM are passed on)."""
    from ppml.tee.launcher import wait_forwarding_signals

    try:
        proc = subprocess.Popen(run.command, env=dict(run.env))  # noqa: S603 -- the user's job
    except OSError as exc:
        raise UsageError(f"cannot start the job: {exc.strerror}") from None
    return wait_forwarding_signals(proc)
