"""Flink's Python environment: where PyFlink and its Flink distribution live, apart from ppml's.

apache-flink pins what its Beam runtime allows (pyarrow < 17, numpy < 2.2, py4j 0.10.9.7, ...),
which no environment that also holds PySpark 4 and ppml's newest pyarrow can satisfy. So Flink
gets a virtual environment of its own, with ppml installed in it too (``ppml[flink]``: the
operators decrypt and encrypt with ppml's code). The ``ppml flink`` commands run from either
environment and start Flink's processes with that environment's interpreter.

Which environment: ``$PPML_FLINK_PYTHON`` (its interpreter), else the running interpreter if
it has PyFlink, else the one ``ppml flink setup`` makes (``~/.local/state/ppml/flink-venv``,
under ``$XDG_STATE_HOME`` when set).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ppml._internal.fs import state_root
from ppml._internal.procs import without_secrets
from ppml.errors import ConfigurationError, UsageError

__all__ = [
    "FLINK_PYTHON_ENV",
    "FLINK_REQUIREMENT",
    "FlinkEnvironment",
    "default_venv",
    "find_flink_environment",
    "install_spec",
    "setup_flink_environment",
]

FLINK_PYTHON_ENV = "PPML_FLINK_PYTHON"
FLINK_REQUIREMENT = "apache-flink>=2.3,<2.4"
_PROBE_TIMEOUT = 60
_PROBE = r"""
import json, pathlib, sys, sysconfig
import pyflink, pyflink.version, ppml
print(json.dumps({
    "flink_home": str(pathlib.Path(pyflink.__file__).parent),
    "flink_version": pyflink.version.__version__,
    "site_packages": sysconfig.get_paths()["purelib"],
    "ppml": str(pathlib.Path(ppml.__file__).parent),
    "version": "%d.%d" % sys.version_info[:2],
}))
"""


@dataclass(frozen=True, slots=True)
class FlinkEnvironment:
    """A Python environment with PyFlink and ppml: its interpreter, Flink's distribution."""

    python: Path
    flink_home: Path
    flink_version: str
    site_packages: Path
    ppml_package: Path
    python_version: str

    @property
    def python_path(self) -> str:
        """The environment's site-packages and ppml's own directory, as a search path: what
        the interpreter PemJa embeds in Flink's JVM needs (it starts from the base
        installation and reads no ``.pth`` file, an editable install being one)."""
        return os.pathsep.join(
            dict.fromkeys([str(self.site_packages), str(self.ppml_package.parent)])
        )

    @property
    def python_jar(self) -> Path:
        """flink-python's jar (in ``opt/``): what Python operators need on the class path."""
        jars = sorted((self.flink_home / "opt").glob("flink-python-*.jar"))
        if not jars:
            raise ConfigurationError(
                "the Flink distribution has no flink-python jar", path=self.flink_home / "opt"
            )
        return jars[-1]


def default_venv() -> Path:
    return state_root() / "flink-venv"


def _probe(python: Path) -> FlinkEnvironment | str:
    """The environment of `python`, or why it is not one."""
    try:
        done = subprocess.run(  # noqa: S603 -- a fixed probe run by a chosen interpreter
            [str(python), "-I", "-c", _PROBE],
            capture_output=True,
            text=True,
            env=without_secrets(),
            timeout=_PROBE_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{python} does not run ({type(exc).__name__})"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return f"{python}: {last}"
    try:
        facts = json.loads(done.stdout)
    except ValueError:
        return f"{python}: unexpected output"
    return FlinkEnvironment(
        python=python,
        flink_home=Path(facts["flink_home"]),
        flink_version=str(facts["flink_version"]),
        site_packages=Path(facts["site_packages"]),
        ppml_package=Path(facts["ppml"]),
        python_version=str(facts["version"]),
    )


def find_flink_environment(env: Mapping[str, str] = os.environ) -> FlinkEnvironment:
    """The Flink environment to use (see the module's docstring); `ConfigurationError` naming
    what was tried when there is none."""
    tried: list[str] = []
    chosen = env.get(FLINK_PYTHON_ENV)
    if chosen:
        candidates = [Path(chosen)]
    else:
        candidates = [Path(sys.executable), default_venv() / "bin" / "python"]
    for python in candidates:
        if not python.exists():
            tried.append(f"{python}: no such interpreter")
            continue
        found = _probe(python)
        if isinstance(found, FlinkEnvironment):
            _check_same_ppml(found)
            return found
        tried.append(found)
    raise ConfigurationError(
        "no Python environment with PyFlink and ppml (" + "; ".join(tried) + "): run "
        f"`ppml flink setup` to make one, or set {FLINK_PYTHON_ENV} to its interpreter"
    )


def _check_same_ppml(found: FlinkEnvironment) -> None:
    here = Path(__file__).resolve().parents[2]
    if found.ppml_package.resolve() != here and not _same_version(found):
        raise ConfigurationError(
            f"the Flink environment ({found.python}) has another ppml ({found.ppml_package}); "
            "run `ppml flink setup --force` to install this one into it"
        )


def _same_version(found: FlinkEnvironment) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        mine = version("ppml")
    except PackageNotFoundError:
        return False
    dist_info = list(found.site_packages.glob(f"ppml-{mine}.dist-info"))
    return bool(dist_info)


def install_spec() -> list[str]:
    """What pip installs for ppml in the Flink environment: this source tree (editable) when
    ppml runs from one, else this version of ppml from the package index; with Flink's extra."""
    here = Path(__file__).resolve().parents[3]
    if (here.parent / "pyproject.toml").is_file() and here.name == "src":
        return ["-e", f"{here.parent}[flink]"]
    from importlib.metadata import version

    return [f"ppml[flink]=={version('ppml')}"]


def setup_flink_environment(
    venv: Path,
    *,
    force: bool = False,
    python: str = sys.executable,
    progress: Callable[[str], None] = lambda _m: None,
) -> FlinkEnvironment:
    """Make (or complete) the virtual environment `venv` with PyFlink and this ppml."""
    interpreter = venv / "bin" / "python"
    if interpreter.exists() and not force:
        found = _probe(interpreter)
        if isinstance(found, FlinkEnvironment):
            _check_same_ppml(found)
            return found
    if not interpreter.exists():
        progress(f"creating the virtual environment {venv}")
        _run([_base_python(python), "-m", "venv", str(venv)], "cannot create the environment")
    progress(f"installing {FLINK_REQUIREMENT} and ppml into {venv} (about 850 MB, once)")
    _run(
        [str(interpreter), "-m", "pip", "install", "-q", *install_spec()],
        "pip could not install Flink's environment",
    )
    found = _probe(interpreter)
    if isinstance(found, str):
        raise ConfigurationError(f"the new environment does not work: {found}", path=venv)
    return found


def _base_python(python: str) -> str:
    """The interpreter a venv is made from (a venv's own `python` would chain environments)."""
    base = getattr(sys, "_base_executable", None) if python == sys.executable else None
    return str(base or python)


def _run(command: list[str], failure: str) -> None:
    try:
        done = subprocess.run(  # noqa: S603 -- fixed pip/venv commands
            command, env=without_secrets(), check=False
        )
    except OSError as exc:
        raise UsageError(f"{failure}: {exc.strerror}") from None
    if done.returncode != 0:
        raise ConfigurationError(f"{failure} (exit {done.returncode})")
