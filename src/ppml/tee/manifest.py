"""Workload manifests and their measurement: what runs, from which bytes, with which environment.

A manifest names the interpreter (by path and SHA-256 of its binary), the entry script, the
arguments, every trusted file (the script, the local modules it imports, and `--trusted` paths)
with its SHA-256, and the names of the environment variables the workload may receive. Its
measurement is SHA-384 over the manifest's canonical JSON encoding, printed as lowercase hex:
any change to a trusted byte, an argument or the allow-list changes it.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ppml._internal.canonical import canonical_json
from ppml.errors import InputNotFound, UsageError
from ppml.tee.imports import local_imports

__all__ = [
    "DEFAULT_ENV_ALLOW",
    "MANIFEST_FORMAT",
    "TrustedFile",
    "WorkloadManifest",
    "build_manifest",
]

MANIFEST_FORMAT = "ppml-workload/1"
# Variables a workload gets unless told otherwise: none of them can change which code runs.
DEFAULT_ENV_ALLOW = ("HOME", "LANG", "LC_ALL", "LC_CTYPE", "PATH", "TERM", "TMPDIR", "TZ", "USER")
# Variables that change which code an interpreter loads: never passed, even when asked for.
_FORBIDDEN_ENV = frozenset(
    {"LD_PRELOAD", "LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONINSPECT"}
)
_PYTHON_NAMES = ("python", "python3")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class TrustedFile:
    """A file whose bytes are part of the measurement; `path` is relative to the base dir."""

    path: str
    sha256: str


@dataclass(frozen=True, slots=True)
class WorkloadManifest:
    """Everything the measurement covers. Build it with `build_manifest`."""

    interpreter: str
    interpreter_sha256: str
    entry: str | None
    args: tuple[str, ...]
    base_dir: Path
    trusted_files: tuple[TrustedFile, ...]
    env_allow: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """The canonical content that is measured (the base directory is not: moving a
        workload to another directory keeps its measurement)."""
        return {
            "format": MANIFEST_FORMAT,
            "interpreter": {"path": self.interpreter, "sha256": self.interpreter_sha256},
            "entry": self.entry,
            # The script is measured by its name and bytes, not by the path it was called by.
            "args": [self.entry, *self.args[1:]] if self.entry is not None else list(self.args),
            "trusted_files": [{"path": f.path, "sha256": f.sha256} for f in self.trusted_files],
            "env_allow": list(self.env_allow),
        }

    def measurement(self) -> str:
        """SHA-384 of the canonical manifest, lowercase hex (96 characters)."""
        return hashlib.sha384(canonical_json(self.to_dict())).hexdigest()

    def command(self) -> list[str]:
        """The argv to launch."""
        return [self.interpreter, *self.args]

    def child_environment(self, env: dict[str, str]) -> dict[str, str]:
        """The allow-listed subset of `env`."""
        return {k: env[k] for k in self.env_allow if k in env}


def _resolve_interpreter(name: str) -> Path:
    found = shutil.which(name)
    if found is None:
        raise InputNotFound(f"command not found: {name}")
    return Path(found)


def _is_python(interpreter: Path) -> bool:
    base = interpreter.name
    return base.startswith(_PYTHON_NAMES) or Path(sys.executable).resolve() == interpreter.resolve()


def _relative(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def build_manifest(
    command: Sequence[str],
    *,
    trusted: Iterable[Path] = (),
    env_allow: Iterable[str] = (),
) -> WorkloadManifest:
    """Describe `command` (interpreter, then its arguments) as a measurable manifest.

    For a Python interpreter whose first argument is a script, the script and the local modules
    it imports (found by reading its imports, transitively, under the script's directory) are
    trusted files. `trusted` adds files or directories (every file below them).
    """
    if not command:
        raise UsageError("no command given: use `-- CMD [ARGS...]`")
    interpreter = _resolve_interpreter(command[0])
    args = tuple(command[1:])
    entry: Path | None = None
    if _is_python(interpreter) and args and not args[0].startswith("-"):
        entry = Path(args[0])
        if not entry.is_file():
            raise InputNotFound("no such script", path=entry)
    base = (entry.parent if entry is not None else Path.cwd()).resolve()
    files: dict[Path, None] = {}
    if entry is not None:
        files[entry.resolve()] = None
        for module in local_imports(entry):
            files[module.resolve()] = None
    for t in trusted:
        t = Path(t)
        if not t.exists():
            raise InputNotFound("no such trusted file or directory", path=t)
        paths = sorted(p for p in t.rglob("*") if p.is_file()) if t.is_dir() else [t]
        for p in paths:
            files[p.resolve()] = None
    allow = set(DEFAULT_ENV_ALLOW)
    for name in env_allow:
        if not name or "=" in name:
            raise UsageError(f"invalid environment variable name {name!r}")
        if name in _FORBIDDEN_ENV:
            raise UsageError(f"{name} changes which code runs and cannot be passed to a workload")
        allow.add(name)
    trusted_files = tuple(
        sorted(
            (TrustedFile(_relative(p, base), _sha256_file(p)) for p in files),
            key=lambda f: f.path,
        )
    )
    return WorkloadManifest(
        interpreter=str(interpreter),
        interpreter_sha256=_sha256_file(interpreter.resolve()),
        entry=_relative(entry, base) if entry is not None else None,
        args=args,
        base_dir=base,
        trusted_files=trusted_files,
        env_allow=tuple(sorted(allow)),
    )
