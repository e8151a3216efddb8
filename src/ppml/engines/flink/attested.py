"""An attested Flink job: what `ppml flink run --tee` measures, writes and hands over.

The attested process is the job's own Python (``python JOB ARGS`` in Flink's environment),
sandboxed like any `ppml run` workload. It is measured as `ppml run` measures a script: the job
file and its local imports by content, Flink's Python environment (PyFlink, Flink's distribution,
ppml and its ``ppml-flink.jar``) by its digest, the Java runtime by a digest over its home, and
the variables ppml sets (below), by value.

- ``--local``: PyFlink starts the mini-cluster in a JVM that is the job's child, in the same
  sandbox; the Python operators run in that JVM.
- on the cluster: the job's Python submits the job itself (``FLINK_PPML_TARGET=remote``:
  ``ppml.flink`` makes PyFlink's environment submit to the configured cluster, attached), over
  REST with the cluster's client certificate; its operators run in the cluster's TaskManagers.

Either way the job's keys come only through attestation: ``ppml.flink.job_keys()`` starts, in
the attested process, a key relay over its attested key provider (the KMS releases a key only
if the key's policy names this measurement); the operators reach it as in any ``ppml flink
run``. Flink's configuration (with the key stores' password), its FLINK_HOME of links and the
key stores are written to the run's boot directory, which the sandbox mounts read-only at
``/tmp/.ppml``: fixed paths, so that the measurement is stable. Flink's scratch directories and
logs are in the sandbox's own ``/tmp``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ppml._internal.fs import ensure_private_dir, state_root
from ppml.engines.flink.cluster import ppml_flink_jar
from ppml.engines.flink.config import private_flink_home, write_config
from ppml.engines.flink.environment import FLINK_PYTHON_ENV, default_venv
from ppml.engines.flink.jobconf import (
    RELAY_HOST_ENV,
    SCRATCH_ENV,
    TARGET_ENV,
    job_settings,
    relay_host,
)
from ppml.errors import ConfigurationError, UsageError
from ppml.tee.sandbox import BOOT_DIR

if TYPE_CHECKING:
    from ppml.engines.flink.environment import FlinkEnvironment
    from ppml.workspace import Workspace

__all__ = [
    "FlinkParts",
    "check_visible_to_workloads",
    "job_parts",
    "write_job_boot",
]

FLINK_BOOT = "flink"  # below the boot directory
_INSIDE = Path(BOOT_DIR) / FLINK_BOOT
_SCRATCH_INSIDE = Path("/tmp/ppml-flink")  # noqa: S108 -- the sandbox's own /tmp


@dataclass(frozen=True, slots=True)
class FlinkParts:
    """The attested job's measured command, files, variables and Flink section."""

    command: tuple[str, ...]
    trusted: tuple[Path, ...]
    fixed_env: Mapping[str, str]
    extra: Mapping[str, Any]


def job_parts(
    flink: FlinkEnvironment,
    java_home: Path,
    java_digest: str,
    job: Path,
    args: list[str],
    *,
    local: bool,
    relay_host: str,
) -> FlinkParts:
    """What `ppml flink run --tee` measures for ``python JOB ARGS``."""
    if not job.is_file():
        raise UsageError("no such job file", path=job)
    check_visible_to_workloads(flink)
    fixed_env = {
        "JAVA_HOME": str(java_home),
        "FLINK_HOME": str(_INSIDE / "home"),
        "FLINK_CONF_DIR": str(_INSIDE / "conf"),
        "FLINK_LOG_DIR": str(_SCRATCH_INSIDE / "log"),
        "PYTHONPATH": flink.python_path,
        TARGET_ENV: "local" if local else "remote",
        SCRATCH_ENV: str(_SCRATCH_INSIDE),
        RELAY_HOST_ENV: relay_host,
    }
    extra = {
        "flink": {
            "version": flink.flink_version,
            "home": str(flink.flink_home),
            "java": {"home": str(java_home), "digest": java_digest},
        }
    }
    return FlinkParts((str(flink.python), str(job), *args), (), fixed_env, extra)


def check_visible_to_workloads(flink: FlinkEnvironment) -> None:
    """Refuse a Flink environment inside ppml's state directory (where `ppml flink setup` once
    made it): the attested sandbox hides that directory, so the job's interpreter would not be
    there."""
    hidden = os.path.realpath(state_root())
    for path in (flink.python, flink.site_packages, flink.flink_home):
        for real in dict.fromkeys([os.path.abspath(path), os.path.realpath(path)]):
            if real == hidden or real.startswith(hidden + "/"):
                raise ConfigurationError(
                    f"Flink's environment ({flink.python}) lies in ppml's state directory "
                    f"({state_root()}), which is hidden from attested workloads: run `ppml "
                    f"flink setup` to make one in {default_venv()}, or set {FLINK_PYTHON_ENV} "
                    "to an interpreter elsewhere"
                )


def write_job_boot(
    ws: Workspace,
    flink_dir: Path,
    flink: FlinkEnvironment,
    boot: Path,
    *,
    local: bool,
    tag: str = "",
) -> str:
    """Flink's home, configuration and key stores into `boot`/flink, naming the paths the
    sandbox shows (a cluster's jobs tagged `tag`); returns the address the job's key relay
    listens on."""
    host = relay_host(flink_dir, local)
    root = boot / FLINK_BOOT
    ensure_private_dir(root)
    private_flink_home(flink, root / "home", [ppml_flink_jar()])
    settings = job_settings(
        ws,
        flink_dir,
        flink,
        root / "stores",
        local=local,
        scratch=_SCRATCH_INSIDE,
        shown=_INSIDE / "stores",
        tag=tag,
    )
    write_config(root / "conf", settings, flink)
    return host
