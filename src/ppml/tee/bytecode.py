"""The bytecode of attested workloads: compiled by ppml, never by a workload.

An attested workload reads Python bytecode only from `bytecode_dir` (``PYTHONPYCACHEPREFIX``;
its sandbox shows the directory read-only, and the guard refuses any other prefix). A module of
the environment that has no bytecode there is compiled from its source inside the workload, and
the guard names its file in the run's hint file. After the run, `cache_hinted` has the
environment's own interpreter, outside the sandbox and reading no bytecode but ppml's, compile
those files into the cache: the hints decide only *which* files of the environment are
compiled, never what the bytecode holds, so a lying workload wastes time at most.

The bytecode is hash-checked (``checked-hash`` pycs): Python uses it only while the source's
bytes are the ones it was compiled from.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from ppml.tee.environment import PythonEnvironment, bytecode_dir

__all__ = ["HINTS_NAME", "cache_hinted"]

HINTS_NAME = ".ppml-bytecode"  # in the run's own /tmp
_MAX_HINTS = 4 << 20
_TIMEOUT = 600

# Run by the environment's interpreter (-I -S -B, bytecode read from ppml's cache only).
_COMPILE = r"""
import importlib.util, os, py_compile, sys
done = 0
for line in sys.stdin:
    level, _, path = line.rstrip("\n").partition(" ")
    cfile = importlib.util.cache_from_source(path, optimization="" if level == "0" else level)
    if os.path.exists(cfile):
        continue
    try:
        py_compile.compile(path, cfile=cfile, doraise=True, optimize=int(level),
                           invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
        done += 1
    except (OSError, SyntaxError, ValueError, py_compile.PyCompileError):
        pass
print(done)
"""


def _read_hints(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return b""
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            return b""
        return fh.read(_MAX_HINTS)


def _wanted(env: PythonEnvironment, data: bytes) -> list[str]:
    roots = tuple(r.rstrip("/") + "/" for r in env.roots)
    wanted: dict[str, None] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        level, _, path = line.partition(" ")
        if level not in ("0", "1", "2") or not path.endswith(".py"):
            continue
        if not os.path.isabs(path) or os.path.normpath(path) != path:
            continue
        real = os.path.realpath(path)
        if real.startswith(roots) and os.path.isfile(real):
            wanted[f"{level} {path}"] = None
    return list(wanted)


def cache_hinted(env: PythonEnvironment, hints: Path) -> int:
    """Compile the environment's files named in `hints` into the bytecode cache; how many were
    compiled. Never raises: a cache that is not filled costs time, never correctness."""
    lines = _wanted(env, _read_hints(hints))
    if not lines:
        return 0
    try:
        out = subprocess.run(  # noqa: S603 -- the environment's own interpreter
            [
                env.interpreter,
                "-I",
                "-S",
                "-B",
                "-X",
                f"pycache_prefix={bytecode_dir()}",
                "-c",
                _COMPILE,
            ],
            input="\n".join(lines) + "\n",
            capture_output=True,
            text=True,
            timeout=_TIMEOUT,
            check=True,
            env={"PATH": os.defpath},
            cwd="/",
        ).stdout
        return int(out.strip() or 0)
    except (OSError, subprocess.SubprocessError, ValueError):
        return 0
