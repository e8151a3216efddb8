"""Workload manifests and their measurement: which code runs, from which bytes, in which
environment, with which variables.

A manifest names the resolved command (`ppml.tee.command`: the program's path and the SHA-256 of
its real binary, the interpreter's options, the mode and target, the arguments), every trusted
file (the script, the local modules it imports, ``--trusted`` paths, a local ``-m`` module) with
its SHA-256, the workload's environment variables with their values, the measured Python
environment (`ppml.tee.environment`) and the launch protocol (the sandbox and the import guard,
whose rules are part of what is measured). Extra sections (Spark's options, jars and Java)
come from the command that launches the workload. The measurement is SHA-384 over the
canonical JSON encoding, lowercase hex.

With a snapshot directory, each trusted file is copied there and hashed from the bytes written,
so that the copy, which the launcher then mounts read-only over the original inside the
sandbox, holds exactly the measured bytes whatever happens to the original afterwards.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ppml._internal.canonical import canonical_json
from ppml.errors import InputNotFound, UsageError
from ppml.tee.command import (
    DEFAULT_ENV,
    ResolvedCommand,
    local_package_inits,
    resolve_command,
    workload_environment,
)
from ppml.tee.environment import EnvironmentCache, PythonEnvironment, measure_environment
from ppml.tee.imports import local_imports

__all__ = [
    "DEFAULT_ENV",
    "LAUNCH_PROTOCOL",
    "MANIFEST_FORMAT",
    "TrustedFile",
    "WorkloadManifest",
    "build_manifest",
]

MANIFEST_FORMAT = "ppml-workload/2"
# The sandbox (ppml.tee.sandbox) and the import guard (ppml.tee.guard), version 2.
LAUNCH_PROTOCOL = "ppml-sandbox/3"
_COPY_CHUNK = 1 << 20
_PSEUDO_ROOTS = ("/proc", "/sys", "/dev")


@dataclass(frozen=True, slots=True)
class TrustedFile:
    """A file whose bytes are measured. `path` is relative to the base directory (absolute
    when outside it); `source` is its real path, `copy` its snapshot (neither is measured)."""

    path: str
    sha256: str
    source: str = field(default="", compare=False)
    copy: str | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class WorkloadManifest:
    """Everything the measurement covers. Build it with `build_manifest`."""

    command: ResolvedCommand
    base_dir: Path
    trusted_files: tuple[TrustedFile, ...]
    env: tuple[tuple[str, str], ...]
    environment: PythonEnvironment | None
    extra: tuple[tuple[str, Any], ...] = ()

    # -- what other modules read ----------------------------------------------------------------

    @property
    def interpreter(self) -> str:
        return self.command.program

    @property
    def interpreter_sha256(self) -> str:
        return self.command.real_sha256

    @property
    def entry(self) -> str | None:
        return self._relative(self.command.script) if self.command.script else None

    @property
    def args(self) -> tuple[str, ...]:
        """The arguments after the program, as it will be started (`launch_argv` minus argv[0])."""
        return tuple(self.command.launch_argv()[1:])

    @property
    def env_allow(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.env)

    def child_environment(self) -> dict[str, str]:
        """The workload's variables (the launcher adds its own PPML_* ones)."""
        return dict(self.env)

    def _relative(self, path: Path) -> str:
        return _relative(path, self.base_dir)

    # -- the measurement ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The canonical content that is measured. The base directory is not: moving a workload
        to another directory keeps its measurement."""
        c = self.command
        target = self.entry if c.mode == "script" else c.target
        doc: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "launch": LAUNCH_PROTOCOL,
            "command": {
                "kind": c.kind,
                "program": c.program,
                "real": {"path": c.real, "sha256": self.interpreter_sha256},
                "flags": list(c.flags),
                "mode": c.mode,
                "target": target,
                "args": list(c.args),
            },
            "trusted_files": [{"path": f.path, "sha256": f.sha256} for f in self.trusted_files],
            "env": dict(self.env),
            "environment": self.environment.to_dict() if self.environment else None,
        }
        for key, value in self.extra:
            doc[key] = value
        return doc

    def describe(self) -> dict[str, Any]:
        """`to_dict` plus what is shown but not measured (sizes, where the files are)."""
        doc = self.to_dict()
        if self.environment is not None:
            doc["environment"] = {
                **doc["environment"],
                "version": self.environment.version,
                "files": self.environment.files,
                "bytes": self.environment.size,
            }
        doc["base_dir"] = str(self.base_dir)
        return doc

    def measurement(self) -> str:
        """SHA-384 of the canonical manifest, lowercase hex (96 characters)."""
        return hashlib.sha384(canonical_json(self.to_dict())).hexdigest()

    def launch_argv(self) -> list[str]:
        return self.command.launch_argv()


def _relative(path: Path, base: Path) -> str:
    real = Path(os.path.realpath(path))
    try:
        return real.relative_to(base).as_posix()
    except ValueError:
        return real.as_posix()


def _under(path: str, roots: Iterable[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _check_trusted_path(path: Path, forbidden: Iterable[str]) -> None:
    """Refuse a trusted path (already resolved) that is no file of code: a file of the kernel's
    pseudo file systems (``/proc/self/environ`` would copy the launcher's variables), or a file
    of the workspace or of another path the workload must never see (reached through a
    symbolic link: its bytes would be copied into the snapshot and mounted for the workload)."""
    text = path.as_posix()
    if _under(text, _PSEUDO_ROOTS):
        raise UsageError(f"{path} is a file of the kernel, not code: it cannot be measured")
    if _under(text, forbidden):
        raise UsageError(
            f"{path} is inside the workspace (or another path hidden from every workload): "
            "it cannot be a workload's file; keep the workload's code outside it"
        )


def _open_regular(source: Path) -> int:
    """A descriptor of `source`, which must be a regular file reached without a symbolic link
    (the path is resolved already: a link here was planted since)."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise InputNotFound(f"cannot read a trusted file: {exc.strerror}", path=source) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(f"{source} is not a regular file: only regular files can be measured")
    return fd


def _copy_and_hash(source: Path, snapshot: Path | None, index: int) -> tuple[str, str | None]:
    """SHA-256 of `source`; with a snapshot directory, of the bytes copied there (0400)."""
    h = hashlib.sha256()
    with os.fdopen(_open_regular(source), "rb") as src:
        if snapshot is None:
            while chunk := src.read(_COPY_CHUNK):
                h.update(chunk)
            return h.hexdigest(), None
        copy = snapshot / f"{index:05d}"
        fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as dst:
            while chunk := src.read(_COPY_CHUNK):
                h.update(chunk)
                dst.write(chunk)
    os.chmod(copy, 0o400)
    return h.hexdigest(), str(copy)


def _python_imports(files: Iterable[Path]) -> list[Path]:
    found: list[Path] = []
    for f in files:
        if f.suffix == ".py":
            found += local_imports(f)
    return found


def build_manifest(
    command: list[str] | tuple[str, ...],
    *,
    trusted: Iterable[Path] = (),
    env: Iterable[str] = (),
    env_source: Mapping[str, str] | None = None,
    fixed_env: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
    snapshot: Path | None = None,
    environment_cache: EnvironmentCache | None = None,
    progress: Callable[[str], None] | None = None,
    forbidden: Iterable[Path] = (),
) -> WorkloadManifest:
    """Resolve and describe `command` as a measurable manifest.

    `trusted` adds files or directories (every file below them); `env` adds variables
    (``NAME`` takes its value from `env_source`, default the process environment, ``NAME=VALUE``
    sets it); `fixed_env` adds variables that ppml itself sets for the workload (Spark's), whose
    values are measured like the others; `extra` adds measured sections; `snapshot` (a private,
    empty directory) receives a copy of every trusted file, hashed as it is copied;
    `forbidden` names directories and files (the workspace, the passphrase file) that no
    trusted file may be, even through a symbolic link.
    """
    resolved = resolve_command(list(command), path=(env_source or os.environ).get("PATH"))
    variables = workload_environment(env, os.environ if env_source is None else env_source)
    for name, value in (fixed_env or {}).items():
        if name.startswith("PPML_"):
            raise UsageError(f"{name}: PPML_* variables are the launcher's own")
        variables[name] = value
    variables = dict(sorted(variables.items()))
    entry = resolved.script if resolved.kind in ("python", "shell") else None
    base = Path(os.path.realpath(entry.parent if entry is not None else Path.cwd()))
    files: dict[Path, None] = {}
    if entry is not None:
        files[Path(os.path.realpath(entry))] = None
    if resolved.module_file is not None:
        files[Path(os.path.realpath(resolved.module_file))] = None
        for init in local_package_inits(str(resolved.target)):
            files[Path(os.path.realpath(init))] = None
    for t in trusted:
        t = Path(t)
        if not t.exists():
            raise InputNotFound("no such trusted file or directory", path=t)
        paths = sorted(p for p in t.rglob("*") if p.is_file()) if t.is_dir() else [t]
        for p in paths:
            files[Path(os.path.realpath(p))] = None
    hidden = [os.path.realpath(p) for p in forbidden]
    for f in files:  # before any is read (a FIFO would block, a link may lead anywhere)
        _check_trusted_path(f, hidden)
        if f.exists() and not f.is_file():
            raise UsageError(f"{f} is not a regular file: only regular files can be measured")
    if resolved.kind == "python" or resolved.kind == "shell":
        for module in _python_imports(list(files)):
            files[Path(os.path.realpath(module))] = None
    python = resolved.program if resolved.kind == "python" else _launcher_python()
    environment = measure_environment(python, cache=environment_cache, progress=progress)
    for f in files:
        _check_trusted_path(f, hidden)
        if _under(f.as_posix(), environment.roots):
            continue  # covered by the environment's digest
        if not f.is_file():
            raise InputNotFound("a trusted path is not a regular file", path=f)
    ordered = sorted(files, key=lambda p: _relative(p, base))
    trusted_files = []
    for index, path in enumerate(ordered):
        sha, copy = _copy_and_hash(path, snapshot, index)
        trusted_files.append(TrustedFile(_relative(path, base), sha, str(path), copy))
    return WorkloadManifest(
        command=resolved,
        base_dir=base,
        trusted_files=tuple(trusted_files),
        env=tuple(variables.items()),
        environment=environment,
        extra=tuple(sorted((extra or {}).items())),
    )


def _launcher_python() -> str:
    """The interpreter that Python programs of a non-Python workload must use: this one."""
    import sys

    if not sys.executable:
        raise UsageError("cannot tell which Python interpreter runs ppml")
    return sys.executable
