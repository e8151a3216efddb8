"""Flink's Python environment: where PyFlink and its Flink distribution live, apart from ppml's.

apache-flink pins what its Beam runtime allows (pyarrow < 17, numpy < 2.2, py4j 0.10.9.7, ...),
which no environment that also holds PySpark 4 and ppml's newest pyarrow can satisfy. So Flink
gets a virtual environment of its own, with ppml installed in it too (``ppml[flink]``: the
operators decrypt and encrypt with ppml's code). The ``ppml flink`` commands run from either
environment and start Flink's processes with that environment's interpreter.

Which environment: ``$PPML_FLINK_PYTHON`` (its interpreter), else the running interpreter if
it has PyFlink, else the one ``ppml flink setup`` makes (``~/.local/share/ppml/flink-venv``,
under ``$XDG_DATA_HOME`` when set). Never under ppml's state directory (``~/.local/state/ppml``),
which the attested sandbox hides from every workload: an environment there could not run
``ppml flink run --tee``.

Which ppml goes into it: never "ppml" by name from a package index (another project has that
name there). The source directory or wheel that pip recorded when it installed this ppml
(its ``direct_url.json``), the source tree this ppml runs from, or what ``--source`` names;
else `ppml flink setup` refuses and says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

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
    "legacy_venv",
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
    """``$XDG_DATA_HOME/ppml/flink-venv``, else ``~/.local/share/ppml/flink-venv``: outside
    ppml's state directory, which attested workloads never see."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return Path(base) / "ppml" / "flink-venv"


def legacy_venv() -> Path:
    """Where ``ppml flink setup`` made the environment before: inside the state directory that
    the attested sandbox hides, so it is not used any more (`find_flink_environment` says so)."""
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
    if not chosen and (legacy_venv() / "bin" / "python").exists():
        tried.append(
            f"{legacy_venv()} is not used any more: it lies in ppml's state directory, which "
            "attested workloads never see; remove it"
        )
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


def install_spec(
    source: Path | None = None,
    *,
    distribution: Callable[[str], Any] | None = None,
    package: Path | None = None,
) -> list[str]:
    """What pip installs for ppml in the Flink environment, with Flink's extra: `source` (a
    ppml source directory or wheel) when given; else the source tree ppml runs from (editable);
    else the directory or wheel pip recorded when it installed this ppml (``direct_url.json``;
    editable if it was). Never ``ppml`` by name from a package index: a `ConfigurationError`
    saying how to go on instead. (`distribution` and `package`, ppml's directory, for tests.)"""
    if source is not None:
        return [_checked_source(source)]
    here = (package or Path(__file__).resolve().parents[2]).resolve()  # .../ppml
    tree = here.parent
    if tree.name == "src" and _is_ppml_project(tree.parent):
        return ["-e", f"{tree.parent}[flink]"]
    from importlib import metadata

    recorded = _recorded_source(distribution or metadata.distribution, here)
    if isinstance(recorded, str):
        raise ConfigurationError(
            f"cannot install this ppml into Flink's environment: {recorded}; ppml never "
            "installs itself by name from a package index (another project is called ppml "
            "there). Run `ppml flink setup --source PATH` with ppml's source directory (a clone "
            "of its repository) or a ppml wheel file"
        )
    path, editable = recorded
    spec = f"{path}[flink]"
    return ["-e", spec] if editable else [spec]


def _recorded_source(distribution: Callable[[str], Any], here: Path) -> tuple[Path, bool] | str:
    """The local source pip recorded for the installed ppml and whether it was editable, or
    why there is none."""
    from importlib.metadata import PackageNotFoundError

    try:
        dist = distribution("ppml")
    except PackageNotFoundError:
        return "ppml is not installed as a distribution"
    text = dist.read_text("direct_url.json")
    if not text:
        return f"ppml {dist.version} was installed from a package index, not from a local source"
    try:
        record = json.loads(text)
        url = str(record["url"])
        editable = bool(record.get("dir_info", {}).get("editable", False))
    except (ValueError, KeyError, TypeError, AttributeError):
        return "pip's record of where ppml came from (direct_url.json) is damaged"
    parsed = urlparse(url)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
        return f"ppml {dist.version} was installed from {parsed.scheme or 'an unknown'} URL"
    path = Path(url2pathname(parsed.path))
    if "dir_info" in record:
        if not _is_ppml_project(path):
            return f"ppml's source directory {path} is gone or holds no ppml project"
        if editable:
            if not here.is_relative_to(path.resolve()):
                return f"the ppml running ({here}) is not the one installed from {path}"
        elif Path(dist.locate_file("ppml")).resolve() != here:
            return f"the ppml running ({here}) is not the installed distribution"
        return path, editable
    if not (path.is_file() and _is_ppml_wheel(path)):
        return f"the ppml wheel pip installed from ({path}) is gone"
    if Path(dist.locate_file("ppml")).resolve() != here:
        return f"the ppml running ({here}) is not the installed distribution"
    return path, False


def _is_ppml_project(directory: Path) -> bool:
    import tomllib

    try:
        with (directory / "pyproject.toml").open("rb") as fh:
            return bool(tomllib.load(fh).get("project", {}).get("name") == "ppml")
    except (OSError, ValueError):
        return False


def _is_ppml_wheel(path: Path) -> bool:
    return path.suffix == ".whl" and path.name.split("-", 1)[0] == "ppml"


def _checked_source(source: Path) -> str:
    """`--source`: a ppml source directory or wheel, as pip's requirement with Flink's extra."""
    path = source.expanduser().absolute()
    if path.is_dir():
        if not _is_ppml_project(path):
            raise UsageError(
                "not a ppml source directory (no pyproject.toml naming ppml)", path=path
            )
    elif not (path.is_file() and _is_ppml_wheel(path)):
        raise UsageError("not a ppml source directory or wheel (ppml-*.whl)", path=path)
    return f"{path}[flink]"


def setup_flink_environment(
    venv: Path,
    *,
    force: bool = False,
    source: Path | None = None,
    python: str = sys.executable,
    progress: Callable[[str], None] = lambda _m: None,
) -> FlinkEnvironment:
    """Make (or complete) the virtual environment `venv` with PyFlink and this ppml."""
    state = os.path.realpath(state_root())
    real = os.path.realpath(venv)
    if real == state or real.startswith(state + "/"):
        raise UsageError(
            f"{venv} lies in ppml's state directory, which attested workloads never see "
            "(`ppml flink run --tee` could not start there): choose another place"
        )
    interpreter = venv / "bin" / "python"
    if interpreter.exists() and not force and source is None:
        found = _probe(interpreter)
        if isinstance(found, FlinkEnvironment):
            _check_same_ppml(found)
            return found
    spec = install_spec(source)  # before anything is made: it may refuse
    if not interpreter.exists():
        progress(f"creating the virtual environment {venv}")
        _run([_base_python(python), "-m", "venv", str(venv)], "cannot create the environment")
    progress(f"installing {FLINK_REQUIREMENT} and ppml into {venv} (about 850 MB, once)")
    _run(
        [str(interpreter), "-m", "pip", "install", "-q", *spec],
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
