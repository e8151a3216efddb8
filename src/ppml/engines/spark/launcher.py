"""Launching Spark with its security switched on, secrets kept out of argv and logs.

Every Spark process ppml starts reads its configuration from a ``spark-defaults.conf`` that ppml
writes, mode 0600, in a private (0700) directory named by ``SPARK_CONF_DIR``: for a job, a fresh
directory under ``<workspace>/spark/run/`` removed when the job ends; for a standalone cluster,
``<workspace>/spark/conf/``, removed by ``ppml spark cluster down``. That file carries:

- ``spark.authenticate=true`` and ``spark.authenticate.secret`` (the workspace's
  ``spark-auth-secret``): Spark reads the secret from its configuration, which it redacts in the
  UI's environment page, in event logs and in ``--verbose`` output (``spark.redaction.regex``);
  it is never on a command line, so ``ps`` does not show it;
- ``spark.ssl.rpc.enabled=true`` and ``spark.ssl.*`` with the workspace's PKCS12 keystore (its
  server certificate and key) and truststore (its CA) and the ``keystore-password`` secret: TLS
  1.3 on every RPC and block-transfer connection (driver, executors, standalone master and
  workers; Spark's JDK TLS provider, which reads PKCS12 stores), and on Spark's HTTP endpoints
  (UI, standalone master and worker UIs). A client accepts only a server certificate issued by
  the workspace CA (Spark asks no client certificate: clients prove themselves with the shared
  secret); standalone executors receive the store passwords from their worker in their
  environment (``_SPARK_SSL_RPC_*``), never on a command line;
- ``spark.network.crypto.enabled=true`` (authentication protocol version 2, AES-GCM): Spark's
  AES-based authentication of every connection with the shared secret, with no SASL fallback.
  Spark logs "Network encryption disabled as RPC SSL encryption is enabled", yet its transport
  layer still runs this handshake inside TLS and keeps the derived AES-GCM channel under it (with
  it off, authentication would fall back to SASL DIGEST-MD5); ``spark.io.encryption.enabled=true``
  (shuffle and spill files encrypted with a per-application key);
- ``spark.ui.enabled=false`` unless asked for, and ``local[*]`` unless a master is given.

Settings that would weaken this (the ``spark.authenticate*``, ``spark.network.crypto*``,
``spark.io.encryption*``, ``spark.ssl*`` families and ``spark.redaction.regex``) cannot be
overridden with ``--conf``; ``--properties-file`` is refused (use ``--conf``).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ppml._internal.clock import MonotonicClock
from ppml._internal.fs import PRIVATE_DIR_MODE, write_private
from ppml._internal.procs import record_owner, sweep_orphaned
from ppml.engines import daemons
from ppml.errors import ConfigurationError, InputNotFound, UsageError

if TYPE_CHECKING:
    from ppml.engines.java import JavaRuntime
    from ppml.workspace import Workspace

__all__ = [
    "DEFAULT_MASTER",
    "KEYS_WITHHELD_ENV",
    "SPARK_ENV_ALLOW",
    "SubmitRequest",
    "driver_log4j2",
    "executor_defaults",
    "local_ip_for",
    "merge_jars",
    "parse_submit_args",
    "ppml_jars",
    "private_conf_dir",
    "properties_text",
    "security_properties",
    "spark_environment",
    "spark_home",
    "sweep_stale_conf_dirs",
    "write_conf_dir",
]

DEFAULT_MASTER = "local[*]"
KEYS_WITHHELD_ENV = "PPML_KEYS_WITHHELD"  # set for a driver that gets no workspace keys
AUTH_SECRET = "spark-auth-secret"  # noqa: S105 -- a secret's name, not its value
KEYSTORE_PASSWORD = "keystore-password"  # noqa: S105 -- a secret's name, not its value
# What the Spark driver's environment needs; the names are measured in attested runs.
SPARK_ENV_ALLOW = (
    "JAVA_HOME",
    "SPARK_HOME",
    "SPARK_CONF_DIR",
    "PYSPARK_PYTHON",
    "PYSPARK_DRIVER_PYTHON",
    "PYSPARK_SUBMIT_ARGS",
)
# Variables never handed to a Spark process (the workspace passphrase unseals every key).
_WITHHELD_ENV = frozenset(
    {
        "PPML_PASSPHRASE",
        "_SPARK_AUTH_SECRET",
        "_SPARK_SSL_RPC_KEY_PASSWORD",
        "_SPARK_SSL_RPC_PRIVATE_KEY_PASSWORD",
        "_SPARK_SSL_RPC_KEY_STORE_PASSWORD",
        "_SPARK_SSL_RPC_TRUST_STORE_PASSWORD",
    }
)
_PROTECTED_PREFIXES = (
    "spark.authenticate",
    "spark.network.crypto",
    "spark.io.encryption",
    "spark.ssl",
    "spark.redaction",
)
# spark-submit options that take a value (everything else before APP is a flag).
_VALUE_OPTIONS = frozenset(
    {
        "--master",
        "--deploy-mode",
        "--class",
        "--name",
        "--jars",
        "--packages",
        "--exclude-packages",
        "--repositories",
        "--py-files",
        "--files",
        "--archives",
        "--conf",
        "-c",
        "--decrypt",  # ppml's own (for a JVM application under --tee), never passed on
        "--properties-file",
        "--driver-memory",
        "--driver-java-options",
        "--driver-library-path",
        "--driver-class-path",
        "--executor-memory",
        "--proxy-user",
        "--driver-cores",
        "--total-executor-cores",
        "--executor-cores",
        "--num-executors",
        "--queue",
        "--principal",
        "--keytab",
    }
)
_FLAG_OPTIONS = frozenset({"--supervise", "--verbose", "-v"})
_REFUSED_OPTIONS = {
    "--properties-file": "ppml writes Spark's properties itself; pass settings with --conf",
    "--deploy-mode": "only client mode is supported (the driver runs here)",
    "--kill": "not supported",
    "--status": "not supported",
}


def spark_home() -> Path:
    """pyspark's Spark distribution (with bin/spark-submit and jars/)."""
    try:
        import pyspark
    except ImportError:
        raise ConfigurationError(
            "Spark is not installed: install ppml[spark] (pyspark and a Java runtime)"
        ) from None
    home = Path(pyspark.__file__).parent
    if not (home / "bin" / "spark-submit").is_file() or not (home / "jars").is_dir():
        raise ConfigurationError("pyspark has no Spark distribution", path=home)
    return home


@dataclass(frozen=True, slots=True)
class SubmitRequest:
    """A parsed `spark-submit` command line: options (without --master), APP and its ARGS."""

    master: str
    options: tuple[str, ...]
    conf: tuple[tuple[str, str], ...]
    py_files: tuple[Path, ...]
    app: Path
    app_args: tuple[str, ...] = field(default=())
    jars: tuple[str, ...] = field(default=())  # --jars and --conf spark.jars, in order
    decrypt: tuple[str, ...] = field(default=())  # ppml's --decrypt among the options

    def submit_options(self, extra_jars: Sequence[str | Path] = ()) -> list[str]:
        """The spark-submit options (master first), without APP and its ARGS; the user's jars
        and `extra_jars` go together in one --jars (spark.jars)."""
        opts = ["--master", self.master, *self.options]
        for key, value in self.conf:
            opts += ["--conf", f"{key}={value}"]
        jars = merge_jars(self.jars, extra_jars)
        if jars:
            opts += ["--jars", ",".join(jars)]
        if self.py_files:
            opts += ["--py-files", ",".join(str(p) for p in self.py_files)]
        return opts


def merge_jars(user: Sequence[str], extra: Sequence[str | Path] = ()) -> list[str]:
    """The user's jars (comma-separated lists allowed) then `extra`, without blanks or repeats.

    spark-submit keeps one value of `spark.jars`: a `--jars` replaces a `--conf spark.jars`, so
    ppml passes a single merged `--jars` rather than adding its own and losing the user's."""
    out: list[str] = []
    for item in [*user, *(str(p) for p in extra)]:
        for jar in item.split(","):
            jar = jar.strip()
            if jar and jar not in out:
                out.append(jar)
    return out


def ppml_jars() -> list[Path]:
    """ppml's own jars for Spark's class path (the Parquet KMS client), those that exist."""
    from ppml.engines.spark.jvm import kms_client_jar

    jar = kms_client_jar()
    return [jar] if jar.is_file() else []


def _check_conf(pair: str) -> tuple[str, str]:
    key, sep, value = pair.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"--conf takes KEY=VALUE, not {pair!r}")
    if key.startswith(_PROTECTED_PREFIXES):
        raise UsageError(f"{key} is set by ppml (Spark security settings cannot be overridden)")
    return key, value


def parse_submit_args(
    args: Sequence[str], *, master: str | None = None, py_files: Sequence[str] = ()
) -> SubmitRequest:
    """Split `[spark-submit options] APP [ARGS]`; refuse options that would weaken security."""
    options: list[str] = []
    conf: list[tuple[str, str]] = []
    jars: list[str] = []
    decrypt: list[str] = []
    files: list[str] = [f for item in py_files for f in item.split(",") if f]
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-") or arg == "-":
            break
        name, eq, inline = arg.partition("=")
        if name in _REFUSED_OPTIONS:
            raise UsageError(f"{name}: {_REFUSED_OPTIONS[name]}")
        if name in _FLAG_OPTIONS and not eq:
            options.append(arg)
            i += 1
            continue
        if name not in _VALUE_OPTIONS:
            raise UsageError(f"unknown spark-submit option {name}")
        if eq:
            value = inline
            i += 1
        else:
            if i + 1 >= len(args):
                raise UsageError(f"{name} needs a value")
            value = args[i + 1]
            i += 2
        if name == "--master":
            master = value
        elif name == "--decrypt":  # ppml's own, also accepted among Spark's options
            decrypt.append(value)
        elif name == "--py-files":
            files += [f for f in value.split(",") if f]
        elif name == "--jars":
            jars.append(value)
        elif name in ("--conf", "-c"):
            key, val = _check_conf(value)
            if key == "spark.jars":
                jars.append(val)
            else:
                conf.append((key, val))
        else:
            options += [name, value]
    if i >= len(args):
        raise UsageError("no application given: ppml spark-submit [OPTIONS] APP [ARGS...]")
    app = Path(args[i])
    if not app.is_file():
        raise InputNotFound("no such application", path=app)
    paths = [Path(f) for f in files]
    for p in paths:
        if not p.exists():
            raise InputNotFound("no such --py-files entry", path=p)
    return SubmitRequest(
        master=master or DEFAULT_MASTER,
        options=tuple(options),
        conf=tuple(conf),
        py_files=tuple(paths),
        app=app,
        app_args=tuple(args[i + 1 :]),
        jars=tuple(merge_jars(jars)),
        decrypt=tuple(decrypt),
    )


def security_properties(ws: Workspace, *, ui: bool = False) -> dict[str, str]:
    """Spark's security configuration from the workspace (holds secrets: write it privately)."""
    for store in (ws.keystore, ws.truststore):
        # Without its truststore Spark's RPC TLS would trust any certificate.
        if not store.is_file():
            raise ConfigurationError("the workspace has no Java key store", path=store)
    password = ws.secret(KEYSTORE_PASSWORD)
    return {
        "spark.authenticate": "true",
        "spark.authenticate.secret": ws.secret(AUTH_SECRET),
        "spark.network.crypto.enabled": "true",
        "spark.network.crypto.authEngineVersion": "2",
        "spark.network.crypto.cipher": "AES/GCM/NoPadding",
        "spark.network.crypto.saslFallback": "false",
        "spark.authenticate.enableSaslEncryption": "false",
        "spark.io.encryption.enabled": "true",
        "spark.ssl.enabled": "true",
        "spark.ssl.rpc.enabled": "true",
        "spark.ssl.protocol": "TLSv1.3",
        "spark.ssl.keyStore": str(ws.keystore),
        "spark.ssl.keyStoreType": "PKCS12",
        "spark.ssl.keyStorePassword": password,
        "spark.ssl.keyPassword": password,
        "spark.ssl.trustStore": str(ws.truststore),
        "spark.ssl.trustStoreType": "PKCS12",
        "spark.ssl.trustStorePassword": password,
        "spark.ui.enabled": "true" if ui else "false",
        # Spark's progress bar redraws one line with carriage returns: on a terminal only.
        "spark.ui.showConsoleProgress": "true" if sys.stderr.isatty() else "false",
    }


def _escape(text: str, *, key: bool) -> str:
    """Java `Properties.load` escaping (keys and values), non-ASCII as \\uXXXX."""
    out: list[str] = []
    for i, ch in enumerate(text):
        if ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\f":
            out.append("\\f")
        elif ch in "=:#!" or (ch == " " and (key or i == 0)):
            out.append("\\" + ch)
        elif not (0x20 <= ord(ch) < 0x7F):
            out.extend(f"\\u{u:04x}" for u in _utf16(ch))
        else:
            out.append(ch)
    return "".join(out)


def _utf16(ch: str) -> list[int]:
    data = ch.encode("utf-16-be")
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


# Logging of a driver ppml starts on the user's terminal (``log4j2-driver.xml``, written as
# ``log4j2.xml`` beside ``spark-defaults.conf``; Spark's own default prints its profile's name,
# INFO lines and, for a Python driver, how to change the level): warnings and errors only.
# Dropped, each for a reason: the warning that network encryption is off because RPC TLS is on
# (misleading: the AES-GCM channel still runs inside TLS, see above), Hadoop's note that it has
# no native library (it uses its Java code), the warning that an application's
# SparkSession.builder() got the driver's running session (always so for a JVM application
# under --tee), and a cluster's executors disconnecting while the application stops.
def driver_log4j2() -> Path:
    """ppml's logging configuration for a Spark driver (shipped in the package)."""
    return Path(__file__).resolve().with_name("log4j2-driver.xml")


def write_conf_dir(conf_dir: Path, props: Mapping[str, str]) -> None:
    """Spark's configuration in `conf_dir`: a 0600 ``spark-defaults.conf`` with `props` and
    ppml's driver logging (``log4j2.xml``)."""
    write_private(conf_dir / "spark-defaults.conf", properties_text(props).encode())
    write_private(conf_dir / "log4j2.xml", driver_log4j2().read_bytes())


def properties_text(props: Mapping[str, str]) -> str:
    """`props` as a Java properties file."""
    lines = ["# Written by ppml for one Spark run; removed when it ends."]
    lines += [f"{_escape(k, key=True)}={_escape(v, key=False)}" for k, v in sorted(props.items())]
    return "\n".join(lines) + "\n"


def sweep_stale_conf_dirs(parent: Path) -> list[Path]:
    """Remove the conf directories of launchers that died without cleaning up (SIGKILL, power
    loss); a directory whose owner still runs, or that has no owner record yet, is kept."""
    return sweep_orphaned(parent, "ppml-spark-*", lambda d: shutil.rmtree(d, ignore_errors=True))


@contextlib.contextmanager
def private_conf_dir(props: Mapping[str, str], *, parent: Path | None = None) -> Iterator[Path]:
    """A 0700 directory holding a 0600 `spark-defaults.conf` with `props`; removed afterwards.

    Under `parent`, directories left by launchers that were killed are removed first (each
    records its owner process, so that a later launcher can tell)."""
    if parent is not None:
        sweep_stale_conf_dirs(parent)
    d = Path(tempfile.mkdtemp(prefix="ppml-spark-", dir=parent))
    try:
        os.chmod(d, PRIVATE_DIR_MODE)
        record_owner(d, os.getpid())
        write_conf_dir(d, props)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def local_ip_for(master: str) -> str | None:
    """The address a driver for `master` binds to: 127.0.0.1 for a local master or one on this
    machine's loopback (Spark would otherwise pick the first non-loopback interface, and warn
    that it did), None (Spark's choice) for another machine's."""
    if master.startswith("local"):
        return "127.0.0.1"
    host = master.removeprefix("spark://").rsplit(":", 1)[0]
    return "127.0.0.1" if host in ("127.0.0.1", "localhost", "[::1]") else None


def spark_environment(
    java: JavaRuntime,
    conf_dir: Path,
    *,
    base: Mapping[str, str] = os.environ,
    submit_args: Sequence[str] | None = None,
    master: str | None = None,
) -> dict[str, str]:
    """The environment of a Spark process: `base` without ppml's secrets, plus JAVA_HOME,
    SPARK_HOME, SPARK_CONF_DIR, PYSPARK_PYTHON (this interpreter) and, for a Python driver that
    starts its own JVM, PYSPARK_SUBMIT_ARGS."""
    import sys

    env = {k: v for k, v in base.items() if k not in _WITHHELD_ENV}
    env.update(
        {
            "JAVA_HOME": str(java.java_home),
            "SPARK_HOME": str(spark_home()),
            "SPARK_CONF_DIR": str(conf_dir),
            "PYSPARK_PYTHON": sys.executable,
            "PYSPARK_DRIVER_PYTHON": sys.executable,
        }
    )
    # The passphrase is withheld: say why when the application asks for keys (ppml.api).
    env[KEYS_WITHHELD_ENV] = "spark-submit"
    local_ip = None if master is None else local_ip_for(master)
    if local_ip is not None:
        env.setdefault("SPARK_LOCAL_IP", local_ip)
    if submit_args is not None:
        env["PYSPARK_SUBMIT_ARGS"] = shlex.join([*submit_args, "pyspark-shell"])
    else:
        env.pop("PYSPARK_SUBMIT_ARGS", None)
    return env


# -- a local standalone cluster ------------------------------------------------------------------

CLUSTER_STATE = "cluster.json"
_MASTER_CLASS = "org.apache.spark.deploy.master.Master"
_WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"
_LOOPBACK = "127.0.0.1"
_START_TIMEOUT = 90.0


@dataclass(frozen=True, slots=True)
class ClusterState:
    """What `start_cluster` records in `<workspace>/spark/cluster.json` (nothing secret)."""

    master_url: str
    master_port: int
    master_pid: int
    master_log: str
    workers: tuple[tuple[int, str], ...]  # (pid, log)
    conf_dir: str
    worker_memory: str = ""  # what each worker offers its executors (`cluster up --memory`)

    def to_dict(self) -> dict[str, object]:
        return {
            "master_url": self.master_url,
            "master": {"pid": self.master_pid, "port": self.master_port, "log": self.master_log},
            "workers": [{"pid": pid, "log": log} for pid, log in self.workers],
            "conf_dir": self.conf_dir,
            "worker_memory": self.worker_memory,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> ClusterState:
        master = d["master"]
        workers = d["workers"]
        if not isinstance(master, dict) or not isinstance(workers, list):
            raise ConfigurationError("the cluster state file is damaged")
        return cls(
            master_url=str(d["master_url"]),
            master_port=int(master["port"]),
            master_pid=int(master["pid"]),
            master_log=str(master["log"]),
            workers=tuple((int(w["pid"]), str(w["log"])) for w in workers),
            conf_dir=str(d["conf_dir"]),
            worker_memory=str(d.get("worker_memory", "")),
        )


def _is_spark_daemon(pid: int) -> bool:
    """Whether `pid` is alive and one of Spark's master/worker JVMs (not a recycled pid)."""
    return daemons.cmdline_has(pid, b"org.apache.spark.deploy.")


def executor_defaults(req: SubmitRequest, spark_dir: Path) -> dict[str, str]:
    """Defaults for a job on the workspace's own cluster: executors as large as a worker offers
    (Spark's default, 1g, would wait forever on smaller workers), unless the job sets them."""
    state = read_cluster_state(spark_dir)
    if state is None or not state.worker_memory or req.master != state.master_url:
        return {}
    if "--executor-memory" in req.options or any(k == "spark.executor.memory" for k, _ in req.conf):
        return {}
    return {"spark.executor.memory": state.worker_memory}


def read_cluster_state(spark_dir: Path) -> ClusterState | None:
    import json

    path = spark_dir / CLUSTER_STATE
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


def start_cluster(
    ws: Workspace,
    spark_dir: Path,
    *,
    workers: int = 1,
    cores: int = 2,
    memory: str = "1g",
    timeout: float = _START_TIMEOUT,
    clock: MonotonicClock | None = None,
) -> ClusterState:
    """Start a master and `workers` workers on 127.0.0.1 with the workspace's security
    configuration (in a 0600 spark-defaults.conf under `spark_dir`, kept while the cluster
    runs). Records pids, ports and logs in `spark_dir/cluster.json`."""
    import json
    import time

    from ppml.engines.java import find_java

    now = clock or time.monotonic
    existing = read_cluster_state(spark_dir)
    if existing is not None:
        if _is_spark_daemon(existing.master_pid):
            raise UsageError(f"a cluster is already up at {existing.master_url}")
        stop_cluster(spark_dir)
    java = find_java(spark_dir)
    home = spark_home()
    conf_dir = spark_dir / "conf"
    logs = spark_dir / "logs"
    for d in (conf_dir, logs, spark_dir / "work"):
        d.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)
        os.chmod(d, PRIVATE_DIR_MODE)
    props = security_properties(ws)
    write_private(conf_dir / "spark-defaults.conf", properties_text(props).encode())
    env = spark_environment(java, conf_dir)
    env.update({"SPARK_LOCAL_IP": _LOOPBACK, "SPARK_LOG_DIR": str(logs)})
    spark_class = str(home / "bin" / "spark-class")
    port = daemons.free_port()
    url = f"spark://{_LOOPBACK}:{port}"
    started: list[int] = []
    try:
        master_log = logs / "master.log"
        ui_port = str(daemons.free_port())
        master_args = ["--host", _LOOPBACK, "--port", str(port), "--webui-port", ui_port]
        master = _start_daemon(spark_class, _MASTER_CLASS, master_args, env, master_log, started)
        daemons.wait_for_log(
            master_log, master, "I have been elected leader", timeout, "a Spark daemon", now
        )
        worker_entries: list[tuple[int, str]] = []
        for n in range(workers):
            log = logs / f"worker-{n}.log"
            worker_args = [
                *("--host", _LOOPBACK, "--cores", str(cores), "--memory", memory),
                *("--webui-port", str(daemons.free_port())),
                *("--work-dir", str(spark_dir / "work"), url),
            ]
            pid = _start_daemon(spark_class, _WORKER_CLASS, worker_args, env, log, started)
            worker_entries.append((pid, str(log)))
        for pid, worker_log in worker_entries:
            daemons.wait_for_log(
                Path(worker_log),
                pid,
                "Successfully registered with master",
                timeout,
                "a Spark daemon",
                now,
            )
    except BaseException:
        for pid in reversed(started):
            daemons.terminate(pid, _is_spark_daemon)
        raise
    entries = tuple(worker_entries)
    state = ClusterState(url, port, master, str(master_log), entries, str(conf_dir), memory)
    write_private(spark_dir / CLUSTER_STATE, json.dumps(state.to_dict(), indent=2).encode())
    return state


def _start_daemon(
    spark_class: str,
    main_class: str,
    args: list[str],
    env: dict[str, str],
    log: Path,
    started: list[int],
) -> int:
    """Start one Spark daemon (`spark-class main_class args`) logging to a fresh `log`; its pid
    is appended to `started` at once, so that a later failure stops it too."""
    log.unlink(missing_ok=True)
    pid = daemons.start_daemon([spark_class, main_class, *args], env, log, "Spark")
    started.append(pid)
    return pid


def stop_cluster(spark_dir: Path) -> int:
    """Stop the recorded workers and master; remove the state and the private configuration.
    Returns how many processes were stopped (0 when no cluster is recorded)."""
    state = read_cluster_state(spark_dir)
    if state is None:
        return 0
    stopped = 0
    for pid, _log in state.workers:
        stopped += daemons.terminate(pid, _is_spark_daemon)
    stopped += daemons.terminate(state.master_pid, _is_spark_daemon)
    shutil.rmtree(state.conf_dir, ignore_errors=True)
    (spark_dir / CLUSTER_STATE).unlink(missing_ok=True)
    return stopped


def cluster_status(spark_dir: Path) -> dict[str, Any] | None:
    """The recorded cluster with an `alive` flag per process, or None."""
    state = read_cluster_state(spark_dir)
    if state is None:
        return None
    return {
        "master_url": state.master_url,
        "master": {
            "pid": state.master_pid,
            "port": state.master_port,
            "alive": _is_spark_daemon(state.master_pid),
            "log": state.master_log,
        },
        "workers": [
            {"pid": pid, "alive": _is_spark_daemon(pid), "log": log} for pid, log in state.workers
        ],
    }
