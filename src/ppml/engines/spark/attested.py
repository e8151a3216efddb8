"""An attested Spark driver: what `ppml spark-submit --tee` measures, refuses and hands over.

The attested process is the Python driver (``python APP ARGS``); pyspark starts Spark's JVM
from it with ``PYSPARK_SUBMIT_ARGS``, inside the same sandbox. A JVM application runs in the
JVM of the driver module `ppml.engines.spark.jvm_app`, its jar measured with the ``--jars``.
Everything that puts code into the driver or the executors is measured or refused:

- measured: the application and its local imports, every ``--py-files``, ``--jars``,
  ``--files`` and ``--archives`` entry (their bytes; local files only), the spark-submit options
  and ``--conf`` values (through ``PYSPARK_SUBMIT_ARGS``, whose value is measured like every
  variable), Spark itself (pyspark's distribution is part of the measured Python environment;
  its version and path are named), ppml's jar (likewise), and the Java runtime (every file of
  its home directory, by a digest cached like the environment's);
- refused: ``--packages``, ``--repositories`` and the ``spark.jars.*`` resolution settings (code
  fetched at run time), class and library path additions (``--driver-class-path``,
  ``spark.*.extraClassPath``, ``spark.*.extraLibraryPath``), JVM options other than memory
  sizes, ``-XX`` flags that run nothing and ``-D`` properties that load no code
  (``-javaagent``, ``-agentlib``, ``-Xbootclasspath``, ``-XX:OnError`` ... are refused),
  executor variables that change which code runs (as for the workload's own), another Python
  for the workers, resource discovery scripts, and remote (URL) resources.

Spark's configuration for the driver (the workspace's secret and key stores, which it needs to
join the authenticated, encrypted Spark network) is written to the run's boot directory, which
the sandbox mounts read-only at ``/tmp/.ppml``: fixed paths, so that the measurement is stable.
The key stores themselves go to a private directory outside the workspace that a cluster's
executors can read at the same path, which every other workload's sandbox hides.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ppml._internal.fs import ensure_private_dir
from ppml.engines.spark.launcher import SubmitRequest, local_ip_for, spark_home, write_conf_dir
from ppml.errors import UsageError
from ppml.tee.command import check_env_name
from ppml.tee.sandbox import BOOT_DIR

if TYPE_CHECKING:
    from ppml.engines.java import JavaRuntime
    from ppml.workspace import Workspace

__all__ = [
    "SPARK_BOOT",
    "DriverParts",
    "check_attested_request",
    "driver_parts",
    "is_jvm_application",
    "jvm_driver_request",
    "jvm_main_class",
    "write_driver_boot",
]

SPARK_BOOT = "spark"  # below the boot directory
_CONF_INSIDE = f"{BOOT_DIR}/{SPARK_BOOT}/conf"
_JAVA_INSIDE = f"{BOOT_DIR}/{SPARK_BOOT}/java-home"

_REFUSED_OPTIONS = {
    "--packages": "packages are fetched at run time and cannot be measured; pass --jars",
    "--exclude-packages": "packages are fetched at run time and cannot be measured",
    "--repositories": "packages are fetched at run time and cannot be measured",
    "--driver-class-path": "class path additions are not measured; pass --jars",
    "--driver-library-path": "native library paths are not measured",
    "--proxy-user": "not supported for an attested driver",
    "--principal": "not supported for an attested driver",
    "--keytab": "not supported for an attested driver",
}
_REFUSED_CONF = re.compile(
    r"spark\.jars\.(packages|excludes|repositories|ivy|ivySettings)"
    r"|spark\.(driver|executor)\.(extraClassPath|extraLibraryPath)"
    r"|spark\.(driver|executor)\.resource\..*\.discoveryScript"
    r"|spark\.pyspark\.(python|driver\.python)"
    r"|spark\.sql\.hive\.metastore\.jars(\.path)?"
    r"|spark\.(files|archives|submit\.pyFiles)"
)
_JAVA_OPTION_CONF = re.compile(r"spark\.(driver|executor)\.(extra|default)JavaOptions")
_ENV_CONF = re.compile(r"spark\.(executorEnv|yarn\.appMasterEnv)\.(.+)")
_SAFE_JAVA = re.compile(
    r"-Xm[sx]\d+[kKmMgG]?|-Xss\d+[kKmMgG]?|--add-(opens|exports)[= ]\S+"
    r"|-XX:[+-]?(Use\w+GC|MaxMetaspaceSize=\w+|MaxDirectMemorySize=\w+|ParallelGCThreads=\d+"
    r"|ActiveProcessorCount=\d+|MaxRAMPercentage=[\d.]+|InitialRAMPercentage=[\d.]+)"
)
_CODE_PROPERTIES = re.compile(
    r"java\.(system\.class\.loader|security\.(manager|policy)|class\.path|library\.path"
    r"|ext\.dirs|endorsed\.dirs|util\.logging\.config\.(file|class))|log4j.*|jdk\.module\..*"
    r"|javax\.script\..*|spark\..*"
)
_REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def _check_java_options(where: str, value: str) -> None:
    for token in shlex.split(value):
        if _SAFE_JAVA.fullmatch(token):
            continue
        prop = re.fullmatch(r"-D([^=]+)(=.*)?", token)
        if prop is not None and not _CODE_PROPERTIES.fullmatch(prop.group(1)):
            continue
        raise UsageError(
            f"{where}: {token!r} can put unmeasured code into the JVM; an attested driver "
            "accepts memory sizes, -D properties that load no code and GC flags only"
        )


def check_attested_request(req: SubmitRequest) -> None:
    """Refuse what would put unmeasured code into the driver or the executors."""
    options = list(req.options)
    for i in range(0, len(options), 1):
        name = options[i]
        if name in _REFUSED_OPTIONS:
            raise UsageError(f"{name} under --tee: {_REFUSED_OPTIONS[name]}")
        if name == "--driver-java-options" and i + 1 < len(options):
            _check_java_options(name, options[i + 1])
    for key, value in req.conf:
        if _REFUSED_CONF.fullmatch(key):
            raise UsageError(
                f"--conf {key} under --tee: it names code or resources that are not measured "
                "(pass local files with --jars, --py-files, --files or --archives)"
            )
        if _JAVA_OPTION_CONF.fullmatch(key):
            _check_java_options(f"--conf {key}", value)
        env = _ENV_CONF.fullmatch(key)
        if env is not None:
            check_env_name(env.group(2))
    for resource in [*req.jars, *(str(p) for p in req.py_files), *_listed(req, "--files")]:
        if _REMOTE.match(resource) and not resource.startswith("file://"):
            raise UsageError(f"{resource}: only local files can be measured under --tee")
    for resource in _listed(req, "--archives"):
        if _REMOTE.match(resource):
            raise UsageError(f"{resource}: only local files can be measured under --tee")


def _listed(req: SubmitRequest, option: str) -> list[str]:
    options = list(req.options)
    out: list[str] = []
    for i, name in enumerate(options[:-1]):
        if name == option:
            out += [f.split("#", 1)[0] for f in options[i + 1].split(",") if f]
    return out


def _local(resource: str) -> Path:
    path = Path(resource.removeprefix("file://"))
    if not path.exists():
        raise UsageError(f"{resource}: no such file")
    return path


@dataclass(frozen=True, slots=True)
class DriverParts:
    """The driver's measured command, files, variables and Spark section."""

    command: tuple[str, ...]
    trusted: tuple[Path, ...]
    fixed_env: Mapping[str, str]
    extra: Mapping[str, Any]


def is_jvm_application(req: SubmitRequest) -> bool:
    """Whether the application is a jar (a Java or Scala application)."""
    return Path(req.app).suffix.lower() == ".jar"


def jvm_main_class(req: SubmitRequest) -> str:
    """The application's main class: ``--class``, else the jar manifest's ``Main-Class``."""
    options = list(req.options)
    for i, name in enumerate(options[:-1]):
        if name == "--class":
            return options[i + 1]
    import zipfile

    try:
        with zipfile.ZipFile(req.app) as jar:
            manifest = jar.read("META-INF/MANIFEST.MF").decode("utf-8", "replace")
    except (OSError, KeyError, zipfile.BadZipFile):
        manifest = ""
    found = re.search(r"^Main-Class:\s*(\S+)", manifest, re.MULTILINE)
    if found is None:
        raise UsageError(f"{req.app}: name the main class with --class (the jar names none)")
    return found.group(1)


def jvm_driver_request(req: SubmitRequest) -> SubmitRequest:
    """`req` as the options of the attested driver of a JVM application: the jar joins
    ``--jars`` (the driver's and the executors' class path), ``--class`` goes to the driver
    module (pyspark's gateway is the JVM's main class)."""
    import dataclasses

    options = list(req.options)
    kept: list[str] = []
    skip = False
    for item in options:  # flags (--verbose) stand alone: drop "--class" and its value only
        if not skip and item != "--class":
            kept.append(item)
        skip = item == "--class" and not skip
    jars = (*req.jars, str(Path(req.app).absolute()))
    return dataclasses.replace(req, options=tuple(kept), jars=jars)


def driver_parts(
    req: SubmitRequest,
    java: JavaRuntime,
    options: list[str],
    java_digest: str,
    decrypt: tuple[str, ...] = (),
) -> DriverParts:
    """What `ppml spark-submit --tee` measures for `req` (`options`: the spark-submit options
    as passed, ppml's jar included; for a JVM application, those of `jvm_driver_request`).

    A Python application is the driver (``python APP ARGS``). A JVM application runs in the
    JVM of ``python -m ppml.engines.spark.jvm_app [--decrypt PATH]... CLASS APP.jar ARGS``,
    which releases the keys of the `decrypt` files before it calls ``CLASS.main``; the jar is
    measured with the other ``--jars``."""
    import pyspark

    check_attested_request(req)
    jvm = is_jvm_application(req)
    if decrypt and not jvm:
        raise UsageError(
            "--decrypt is for JVM applications: a Python application reads encrypted files "
            "with ppml.spark.PPMLContext"
        )
    trusted = [*req.py_files, *(_local(j) for j in req.jars)]
    if jvm:
        trusted.append(_local(str(req.app)))
    trusted += [_local(f) for f in [*_listed(req, "--files"), *_listed(req, "--archives")]]
    java_home = _JAVA_INSIDE if java.wrapped else str(java.java_home)
    real_java = java.real_home
    fixed_env = {
        "JAVA_HOME": java_home,
        "SPARK_HOME": str(spark_home()),
        "SPARK_CONF_DIR": _CONF_INSIDE,
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "PYSPARK_SUBMIT_ARGS": shlex.join([*options, "pyspark-shell"]),
    }
    local_ip = local_ip_for(req.master)
    if local_ip is not None:
        fixed_env["SPARK_LOCAL_IP"] = local_ip
    spark: dict[str, Any] = {
        "version": pyspark.__version__,
        "home": str(spark_home()),
        "java": {"home": str(real_java), "version": java.version, "digest": java_digest},
    }
    if jvm:
        module = [sys.executable, "-m", "ppml.engines.spark.jvm_app"]
        for path in decrypt:
            module += ["--decrypt", path]
        command = (*module, jvm_main_class(req), str(req.app), *req.app_args)
        spark["application"] = {"jar": str(req.app), "class": jvm_main_class(req)}
    else:
        command = (sys.executable, str(req.app), *req.app_args)
    return DriverParts(command, tuple(trusted), fixed_env, {"spark": spark})


def write_driver_boot(
    ws: Workspace, java: JavaRuntime, boot: Path, props: Mapping[str, str], stores: Path
) -> None:
    """Spark's configuration and, for a wrapped runtime, its JAVA_HOME, into `boot`/spark (the
    paths inside the sandbox are fixed). The key stores go to `stores`, a private directory
    that the executors of a cluster (outside the sandbox, on this machine) read at the same
    path; they are encrypted with the password that only the configuration holds."""
    conf = boot / SPARK_BOOT / "conf"
    ensure_private_dir(conf)
    ensure_private_dir(stores)
    inside = dict(props)
    for key, store in (
        ("spark.ssl.keyStore", ws.keystore),
        ("spark.ssl.trustStore", ws.truststore),
    ):
        shutil.copyfile(store, stores / store.name)
        os.chmod(stores / store.name, 0o600)
        inside[key] = str(stores / store.name)
    write_conf_dir(conf, inside)
    if java.wrapped:
        from ppml.engines.java import wrap_java_home

        wrap_java_home(java.real_home, boot / SPARK_BOOT, has_vector_module=java.quiet_wrapper)
