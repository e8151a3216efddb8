"""A standalone Flink cluster from the workspace: one JobManager and N TaskManagers.

Everything lives in ``<workspace>/flink/cluster/`` (0700): the configuration and the key stores
(``conf/``, 0600 files; see `ppml.engines.flink.config`), a private FLINK_HOME of links into
Flink's environment (``home/``), the processes' logs (``log/``) and scratch directories
(``scratch/``), and ``cluster.json`` (pids, ports). ``ppml flink cluster down`` stops the
processes and removes the directory's secrets; a cluster whose processes died is swept by the
next ``up``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ppml._internal.fs import ensure_private_dir, memory_files, write_private
from ppml._internal.procs import without_secrets
from ppml.engines import daemons
from ppml.engines.flink.config import (
    ClusterSecurity,
    base_settings,
    issue_cluster_security,
    memory_directory,
    node_settings,
    private_flink_home,
    remove_memory_directory,
    write_config,
)
from ppml.errors import ConfigurationError, UsageError

if TYPE_CHECKING:
    from ppml.engines.flink.environment import FlinkEnvironment
    from ppml.engines.java import JavaRuntime
    from ppml.workspace import Workspace

__all__ = [
    "CLUSTER_DIR",
    "ClusterState",
    "cancel_run_jobs",
    "cluster_status",
    "flink_environment_variables",
    "ppml_flink_jar",
    "read_cluster_state",
    "start_cluster",
    "stop_cluster",
]

CLUSTER_DIR = "cluster"
_STATE = "cluster.json"
_START_TIMEOUT = 120.0
_MARK = b"org.apache.flink.runtime."
_JOBMANAGER_READY = "Rest endpoint listening at"
_TASKMANAGER_READY = "Successful registration at resource manager"


def ppml_flink_jar() -> Path:
    return Path(__file__).resolve().parent / "jars" / "ppml-flink.jar"


def flink_environment_variables(
    flink: FlinkEnvironment,
    java: JavaRuntime,
    home: Path,
    conf_dir: Path,
    log_dir: Path,
    tmp: Path,
    base: Mapping[str, str] = os.environ,
) -> dict[str, str]:
    """A Flink process's environment: `base` without ppml's secrets and without Python
    variables that would change which code the operators run, plus Flink's own variables.
    PYTHONPATH is the environment's site-packages and ppml's own directory: the interpreter
    that PemJa embeds in the JVM starts from the base installation and reads no ``.pth`` file
    (an editable install is one), so it would not see them otherwise. No working directory or
    user site goes on Python's path (PYTHONSAFEPATH, PYTHONNOUSERSITE), no other virtual
    environment is active, Flink's environment comes first on PATH, and temporary files go to
    `tmp` (private), never to the shared /tmp."""
    env = {
        k: v
        for k, v in without_secrets(base).items()
        if not k.startswith(("PYTHON", "FLINK_", "PPML_FLINK", "VIRTUAL_ENV", "CONDA_"))
    }
    env.update(
        {
            "JAVA_HOME": str(java.java_home),
            "FLINK_HOME": str(home),
            "FLINK_CONF_DIR": str(conf_dir),
            "FLINK_LOG_DIR": str(log_dir),
            "PYTHONPATH": flink.python_path,
            "PYTHONSAFEPATH": "1",
            "PYTHONNOUSERSITE": "1",
            "TMPDIR": str(tmp),
            "PATH": os.pathsep.join([str(flink.python.parent), env.get("PATH", os.defpath)]),
        }
    )
    return env


@dataclass(frozen=True, slots=True)
class ClusterState:
    """A running cluster: its REST endpoint and its processes."""

    host: str
    rest_port: int
    rpc_port: int
    jobmanager: tuple[int, str]  # pid, log
    taskmanagers: tuple[tuple[int, str], ...]

    @property
    def rest_url(self) -> str:
        return f"https://{self.host}:{self.rest_port}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "rest_port": self.rest_port,
            "rpc_port": self.rpc_port,
            "jobmanager": {"pid": self.jobmanager[0], "log": self.jobmanager[1]},
            "taskmanagers": [{"pid": p, "log": log} for p, log in self.taskmanagers],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClusterState:
        return cls(
            host=str(d["host"]),
            rest_port=int(d["rest_port"]),
            rpc_port=int(d["rpc_port"]),
            jobmanager=(int(d["jobmanager"]["pid"]), str(d["jobmanager"]["log"])),
            taskmanagers=tuple((int(t["pid"]), str(t["log"])) for t in d["taskmanagers"]),
        )


def read_cluster_state(cluster_dir: Path) -> ClusterState | None:
    path = cluster_dir / _STATE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        raise ConfigurationError("the cluster state file is damaged", path=path) from None
    try:
        return ClusterState.from_dict(raw)
    except (KeyError, TypeError, ValueError):
        raise ConfigurationError("the cluster state file is damaged", path=path) from None


def _is_flink(pid: int) -> bool:
    return daemons.cmdline_has(pid, _MARK)


def _node_settings(
    flink: FlinkEnvironment,
    security: ClusterSecurity,
    d: Path,
    host: str,
    slots: int,
    memory: str,
    rest_port: int,
    rpc_port: int,
    checkpoints: Path,
) -> dict[str, str]:
    return {
        **base_settings(flink, d / "scratch", checkpoints=checkpoints),
        **node_settings(security),
        "jobmanager.rpc.address": host,
        "jobmanager.rpc.port": str(rpc_port),
        "jobmanager.bind-host": host,
        "rest.address": host,
        "rest.bind-address": host,
        "rest.port": str(rest_port),
        "taskmanager.host": host,
        "taskmanager.bind-host": host,
        "taskmanager.numberOfTaskSlots": str(slots),
        "jobmanager.memory.process.size": "1024m",
        "taskmanager.memory.process.size": memory,
        "blob.server.port": "0",
        "taskmanager.rpc.port": "0",
        "taskmanager.data.port": "0",
    }


def start_cluster(
    ws: Workspace,
    flink_dir: Path,
    flink: FlinkEnvironment,
    java: JavaRuntime,
    *,
    taskmanagers: int = 1,
    slots: int = 2,
    memory: str = "1536m",
    host: str = "127.0.0.1",
    timeout: float = _START_TIMEOUT,
) -> ClusterState:
    """Start a JobManager and `taskmanagers` TaskManagers on `host` (see the module)."""
    d = flink_dir / CLUSTER_DIR
    existing = read_cluster_state(d)
    if existing is not None:
        if _is_flink(existing.jobmanager[0]):
            raise UsageError(f"a Flink cluster is already up at {existing.rest_url}")
        stop_cluster(flink_dir)
    shutil.rmtree(d, ignore_errors=True)
    ensure_private_dir(d)
    hosts = sorted({host, "127.0.0.1", "localhost"})
    security = issue_cluster_security(ws, d / "conf", hosts)
    home = private_flink_home(flink, d / "home", [ppml_flink_jar()])
    rest_port, rpc_port = daemons.free_port(host), daemons.free_port(host)
    # The jobs' checkpoints (operator state: decrypted records) stay in memory, in a private
    # directory the cluster owns; a job sent to the cluster names none of its own.
    checkpoints = memory_directory(d, "ppml-flink-")
    write_config(
        d / "conf",
        _node_settings(flink, security, d, host, slots, memory, rest_port, rpc_port, checkpoints),
        flink,
    )
    logs = d / "log"
    ensure_private_dir(logs)
    env = flink_environment_variables(flink, java, home, d / "conf", logs, d / "scratch" / "tmp")
    started: list[int] = []
    try:
        jm_log = logs / "jobmanager.out"
        jm = daemons.start_daemon(
            [str(home / "bin" / "jobmanager.sh"), "start-foreground"], env, jm_log, "Flink", cwd=d
        )
        started.append(jm)
        daemons.wait_for_log(jm_log, jm, _JOBMANAGER_READY, timeout, "the Flink JobManager")
        tms: list[tuple[int, str]] = []
        for n in range(taskmanagers):
            tm_log = logs / f"taskmanager-{n}.out"
            pid = daemons.start_daemon(
                [str(home / "bin" / "taskmanager.sh"), "start-foreground"],
                env,
                tm_log,
                "Flink",
                cwd=d,
            )
            started.append(pid)
            tms.append((pid, str(tm_log)))
        for pid, log in tms:
            daemons.wait_for_log(Path(log), pid, _TASKMANAGER_READY, timeout, "a Flink TaskManager")
    except BaseException:
        for pid in reversed(started):
            daemons.terminate(pid, _is_flink)
        raise
    state = ClusterState(host, rest_port, rpc_port, (jm, str(jm_log)), tuple(tms))
    write_private(d / _STATE, json.dumps(state.to_dict(), indent=2).encode())
    return state


def stop_cluster(flink_dir: Path) -> int:
    """Stop the recorded processes; remove the cluster's configuration and key stores.
    Returns how many processes were stopped."""
    d = flink_dir / CLUSTER_DIR
    state = read_cluster_state(d)
    stopped = 0
    if state is not None:
        for pid, _log in state.taskmanagers:
            stopped += daemons.terminate(pid, _is_flink)
        stopped += daemons.terminate(state.jobmanager[0], _is_flink)
    shutil.rmtree(d / "conf", ignore_errors=True)
    shutil.rmtree(d / "scratch", ignore_errors=True)
    remove_memory_directory(d)
    (d / _STATE).unlink(missing_ok=True)
    return stopped


def rest_get(cluster_dir: Path, state: ClusterState, path: str) -> Any:
    """GET `path` from the cluster's REST endpoint with its client certificate."""
    return _rest(cluster_dir, state, "GET", path)


def _rest(cluster_dir: Path, state: ClusterState, method: str, path: str) -> Any:
    import httpx
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    security = ClusterSecurity.load(cluster_dir / "conf")
    store = pkcs12.load_pkcs12(security.client_store.read_bytes(), security.password.encode())
    if store.key is None or store.cert is None:
        raise ConfigurationError(
            "the cluster's client store is damaged", path=security.client_store
        )
    key_pem = store.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_pem = store.cert.certificate.public_bytes(serialization.Encoding.PEM)
    ca_pem = b"".join(
        c.certificate.public_bytes(serialization.Encoding.PEM) for c in store.additional_certs
    )
    import ssl

    with memory_files(cert_pem, key_pem) as (cert_file, key_file):
        context = ssl.create_default_context(cadata=ca_pem.decode())
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(cert_file, key_file)
    response = httpx.request(method, state.rest_url + path, verify=context, timeout=10.0)
    response.raise_for_status()
    return response.json() if response.content else None


RUN_TAG = "ppml.run"
"""The global job parameter naming the `ppml flink run` that submitted a job to the cluster."""

_LIVE = ("CREATED", "INITIALIZING", "RUNNING", "RESTARTING", "FAILING", "RECONCILING")


def cancel_run_jobs(flink_dir: Path, tag: str) -> int:
    """Cancel the cluster's live jobs that the run `tag` submitted (its client ended, by a
    signal or a crash, while the job still ran); how many. Best effort: no cluster, no jobs."""
    d = flink_dir / CLUSTER_DIR
    state = read_cluster_state(d)
    if state is None or not _is_flink(state.jobmanager[0]):
        return 0
    cancelled = 0
    try:
        for job in rest_get(d, state, "/jobs/overview").get("jobs", []):
            if job.get("state") not in _LIVE:
                continue
            config = rest_get(d, state, f"/jobs/{job['jid']}/config")
            user = config.get("execution-config", {}).get("user-config", {})
            if user.get(RUN_TAG) == tag:
                _rest(d, state, "PATCH", f"/jobs/{job['jid']}?mode=cancel")
                cancelled += 1
    except Exception:  # the cluster is going away: nothing left to cancel there
        return cancelled
    return cancelled


def cluster_status(flink_dir: Path) -> dict[str, Any] | None:
    """The recorded cluster, each process's liveness and, when the JobManager answers, what
    its REST endpoint reports (task managers, slots, jobs)."""
    d = flink_dir / CLUSTER_DIR
    state = read_cluster_state(d)
    if state is None:
        return None
    info: dict[str, Any] = {
        "rest_url": state.rest_url,
        "jobmanager": {
            "pid": state.jobmanager[0],
            "alive": _is_flink(state.jobmanager[0]),
            "log": state.jobmanager[1],
        },
        "taskmanagers": [
            {"pid": pid, "alive": _is_flink(pid), "log": log} for pid, log in state.taskmanagers
        ],
    }
    if info["jobmanager"]["alive"]:
        try:
            info["overview"] = rest_get(d, state, "/overview")
        except Exception as exc:
            info["overview_error"] = type(exc).__name__
    return info
