"""What every `ppml flink run` shares, attested or not: the job's Flink settings, where its key
relay listens, and the variables through which `ppml.flink` learns how the job runs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ppml._internal.fs import ensure_private_dir
from ppml.engines.flink.cluster import CLUSTER_DIR, RUN_TAG, read_cluster_state
from ppml.engines.flink.config import (
    ClusterSecurity,
    base_settings,
    client_settings,
    issue_cluster_security,
    node_settings,
)
from ppml.errors import UsageError

if TYPE_CHECKING:
    from ppml.engines.flink.environment import FlinkEnvironment
    from ppml.workspace import Workspace

__all__ = ["RELAY_HOST_ENV", "SCRATCH_ENV", "TARGET_ENV", "job_settings", "relay_host"]

TARGET_ENV = "FLINK_PPML_TARGET"  # "local" or "remote": how ppml.flink builds the environment
SCRATCH_ENV = "FLINK_PPML_SCRATCH"  # made by ppml.flink inside an attested job's sandbox
RELAY_HOST_ENV = "FLINK_PPML_RELAY_HOST"  # where an attested job's own relay listens
_NO_CLUSTER = "no Flink cluster is up: start one with `ppml flink cluster up` or run with --local"
_LOOPBACK_KEYS = (
    "jobmanager.bind-host",
    "taskmanager.bind-host",
    "taskmanager.host",
    "jobmanager.rpc.address",
    "rest.bind-address",
    "rest.address",
)


def relay_host(flink_dir: Path, local: bool) -> str:
    """Where the job's key relay listens: loopback for a mini-cluster, else the cluster's
    address (`UsageError` when no cluster is up)."""
    if local:
        return "127.0.0.1"
    state = read_cluster_state(flink_dir / CLUSTER_DIR)
    if state is None:
        raise UsageError(_NO_CLUSTER)
    return state.host


def job_settings(
    ws: Workspace,
    flink_dir: Path,
    flink: FlinkEnvironment,
    stores: Path,
    *,
    local: bool,
    scratch: Path,
    shown: Path | None = None,
    checkpoints: Path | None = None,
    tag: str = "",
) -> dict[str, str]:
    """A job's Flink settings, its key stores written to `stores`: for a mini-cluster, a node
    certificate issued for the run and loopback addresses; for the cluster, copies of its
    client and trust stores and its REST address. `shown` is where the job sees `stores` and
    `scratch` is its scratch directory as it sees it (an attested job's sandbox shows both
    elsewhere, and makes its scratch itself); by default both are as given, made here."""
    settings = base_settings(flink, scratch, make=shown is None, checkpoints=checkpoints)
    if local:
        issued = issue_cluster_security(ws, stores, ["127.0.0.1", "localhost"])
        settings.update(node_settings(issued.moved(shown or stores)))
        settings.update(dict.fromkeys(_LOOPBACK_KEYS, "127.0.0.1"))
        return settings
    cluster = flink_dir / CLUSTER_DIR
    state = read_cluster_state(cluster)
    if state is None:
        raise UsageError(_NO_CLUSTER)
    security = ClusterSecurity.load(cluster / "conf")
    ensure_private_dir(stores)
    for store in (security.client_store, security.trust_store):
        shutil.copyfile(store, stores / store.name)
        os.chmod(stores / store.name, 0o600)
    settings.update(client_settings(security.moved(shown or stores)))
    # The cluster's own (private, in-memory) checkpoint directory, not one the job names.
    del settings["execution.checkpointing.dir"]
    # Which run submitted the job: its jobs are cancelled if the run ends before them.
    settings["pipeline.global-job-parameters"] = f"{RUN_TAG}:{tag}"
    settings.update({"rest.address": state.host, "rest.port": str(state.rest_port)})
    return settings
