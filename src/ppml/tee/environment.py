"""The measured environment of a Python workload: its interpreter and every file it can import.

The environment is the interpreter's real binary, the shared libraries of its own installation
that it loads (``libpython3.X.so`` of a shared build), and the directories on its import path as
an attested workload runs it (``-s``, no ``PYTHONPATH``): the standard library, ``lib-dynload``,
site-packages, and the directories that ``.pth`` files and editable installs add. Its digest is
SHA-384 over the canonical list of every regular file (and symbolic link) below those roots, by
root, relative path and SHA-256 (or link target), leaving out ``__pycache__`` directories
(bytecode caches come and go; the import guard never reads one for a measured file) and the
``site-packages`` of a base interpreter that a virtual environment does not use.

Hashing a large environment takes seconds (a few GB with Spark, PyTorch and a JDK), so the
SHA-256 of each file is cached (``~/.cache/ppml/environments``, private) with the file's device,
inode, size, modification and change times: an unchanged file is not read again, and any write
changes its change time, which no unprivileged process can set back. The cache is as
trustworthy as the environment it describes: whoever can write it can as well change ppml's own
launcher, which lives in that environment; an attested workload can write neither (its sandbox
mounts both read-only).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ppml._internal.canonical import canonical_json
from ppml._internal.fs import atomic_output, ensure_private_dir
from ppml.errors import ConfigurationError

__all__ = [
    "ENVIRONMENT_FORMAT",
    "EnvironmentCache",
    "PythonEnvironment",
    "bytecode_dir",
    "cache_root",
    "default_cache_dir",
    "measure_directory",
    "measure_environment",
    "probe_interpreter",
]

ENVIRONMENT_FORMAT = "ppml-environment/2"
_CACHE_FORMAT = "ppml-environment-cache/2"
_SKIP_DIRS = frozenset({"__pycache__"})
_SITE_DIRS = frozenset({"site-packages", "dist-packages"})
_HASH_THREADS = 4

# Run by the interpreter itself: where it imports from, as an attested workload runs it.
_PROBE = r"""
import json, os, sys
roots = [p for p in sys.path if p and p.startswith("/")]
for finder in sys.meta_path:
    module = sys.modules.get(getattr(finder, "__module__", "") or "")
    mapping = getattr(module, "MAPPING", None)
    if isinstance(mapping, dict) and module.__name__.startswith("__editable__"):
        roots += [str(v) for v in mapping.values()]
libraries = set()
prefixes = tuple(p.rstrip("/") + "/" for p in (sys.prefix, sys.base_prefix))
with open("/proc/self/maps") as maps:
    for line in maps:
        parts = line.split(None, 5)
        path = parts[5].strip() if len(parts) == 6 else ""
        if path.startswith(prefixes) and ".so" in os.path.basename(path):
            libraries.add(path)
print(json.dumps({"prefix": sys.prefix, "base_prefix": sys.base_prefix, "roots": roots,
                  "libraries": sorted(libraries), "version": sys.version}))
"""

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class PythonEnvironment:
    """What an attested Python workload may load code from, and its digest."""

    interpreter: str  # the real binary (symbolic links resolved)
    interpreter_sha256: str
    prefix: str  # sys.prefix (a virtual environment's directory)
    base_prefix: str  # sys.base_prefix (the installation the interpreter belongs to)
    libraries: tuple[tuple[str, str], ...]  # (path, SHA-256) of the interpreter's own shared
    # libraries, found in its prefix (libpython3.X.so of a shared build)
    version: str
    roots: tuple[str, ...]  # import roots, real paths, in import order
    digest: str  # SHA-384 of the file list, lowercase hex
    files: int
    size: int

    def to_dict(self) -> dict[str, Any]:
        """What the measurement covers (the counts are shown, not measured)."""
        return {
            "format": ENVIRONMENT_FORMAT,
            "interpreter": {"path": self.interpreter, "sha256": self.interpreter_sha256},
            "prefix": self.prefix,
            "base_prefix": self.base_prefix,
            "libraries": [{"path": p, "sha256": d} for p, d in self.libraries],
            "roots": list(self.roots),
            "digest": self.digest,
        }


def _sha256_file(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@dataclass(frozen=True, slots=True)
class _Probe:
    prefix: str
    base_prefix: str
    version: str
    roots: list[str]
    libraries: list[str]


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/ppml`, else `~/.cache/ppml`: ppml's own caches, which no attested
    workload may change (its sandbox shows them read-only, or not at all)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ppml"


def bytecode_dir() -> Path:
    """Where attested workloads read Python bytecode from (``PYTHONPYCACHEPREFIX``): compiled
    by ppml from the environment's own sources, never by a workload. A ``__pycache__``
    directory beside a source is never read, as any process that could write there could
    plant code that no measurement covers."""
    return cache_root() / "bytecode"


def probe_interpreter(program: str) -> _Probe:
    """Where a Python interpreter imports from, asked directly (reading no bytecode cache but
    ppml's own)."""
    cache = bytecode_dir()
    ensure_private_dir(cache.parent)
    ensure_private_dir(cache)
    try:
        out = subprocess.run(  # noqa: S603 -- the workload's own interpreter
            [program, "-s", "-E", "-B", "-X", f"pycache_prefix={cache}", "-c", _PROBE],
            capture_output=True,
            check=True,
            timeout=60,
            env={"PATH": os.defpath},
            cwd="/",
        ).stdout
        doc = json.loads(out)
        return _Probe(
            prefix=str(doc["prefix"]),
            base_prefix=str(doc["base_prefix"]),
            version=str(doc["version"]),
            roots=[str(r) for r in doc["roots"]],
            libraries=[str(r) for r in doc["libraries"]],
        )
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError):
        raise ConfigurationError(
            f"cannot ask {program} where it imports from (is it a Python interpreter?)"
        ) from None


@dataclass(frozen=True, slots=True)
class _Entry:
    """A file (or symbolic link) below a root: where, and what identifies its content."""

    root: int
    rel: str
    path: str
    link: str | None  # the target of a symbolic link, None for a file
    key: str  # device, inode, size, modification and change times
    size: int


def _scan(roots: list[str]) -> list[_Entry]:
    """Every file below `roots`, each once: a root inside another is scanned on its own; caches
    and a site directory that is not a root (a base interpreter's, below its standard library)
    are left out."""
    found: list[_Entry] = []
    all_roots = set(roots)
    for index, root in enumerate(roots):
        st = os.stat(root)
        if not stat.S_ISDIR(st.st_mode):  # a zip archive on the path
            found.append(_Entry(index, ".", root, None, _stat_key(st), st.st_size))
            continue
        prefix = len(root.rstrip("/")) + 1
        stack = [root]
        while stack:
            directory = stack.pop()
            try:
                entries = list(os.scandir(directory))
            except OSError as exc:
                raise ConfigurationError(
                    f"cannot read the Python environment: {exc.strerror}", path=Path(directory)
                ) from None
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    if entry.name in _SKIP_DIRS or entry.name in _SITE_DIRS:
                        continue
                    if entry.path not in all_roots:
                        stack.append(entry.path)
                elif stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                    link = os.readlink(entry.path) if stat.S_ISLNK(st.st_mode) else None
                    rel = entry.path[prefix:]
                    found.append(_Entry(index, rel, entry.path, link, _stat_key(st), st.st_size))
    return found


def _stat_key(st: os.stat_result) -> str:
    return f"{st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}"


@dataclass(slots=True)
class _Cached:
    """What a cache file holds: each file's key and SHA-256, and the digest they made."""

    entries: dict[str, tuple[str, str]]
    digest: str | None = None
    size: int = 0


class EnvironmentCache:
    """SHA-256 per file, keyed by path and stat data, and the last digest."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    def _path(self, name: str) -> Path:
        return self._directory / f"{name}.json"

    def load(self, name: str) -> _Cached:
        """The cached entries; empty when missing or damaged."""
        try:
            doc = json.loads(self._path(name).read_bytes())
            if doc.get("format") != _CACHE_FORMAT:
                return _Cached({})
            entries = {str(p): (str(k), str(v)) for p, (k, v) in doc["entries"].items()}
            return _Cached(entries, str(doc["digest"]), int(doc["size"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return _Cached({})

    def save(self, name: str, cached: _Cached) -> None:
        doc = {
            "format": _CACHE_FORMAT,
            "digest": cached.digest,
            "size": cached.size,
            "entries": cached.entries,
        }
        try:
            ensure_private_dir(self._directory)
            with atomic_output(self._path(name)) as fh:
                fh.write(json.dumps(doc, separators=(",", ":")).encode())
        except OSError:
            pass  # a cache that cannot be written costs time, never correctness


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/ppml/environments`, else `~/.cache/ppml/environments`."""
    return cache_root() / "environments"


def measure_directory(
    roots: list[str],
    *,
    cache: EnvironmentCache | None = None,
    cache_name: str | None = None,
    progress: Progress | None = None,
) -> tuple[str, int, int]:
    """(digest, files, bytes) of every file below `roots` (real, absolute paths)."""
    outer = list(dict.fromkeys(roots))
    found = _scan(outer)
    cached = cache.load(cache_name) if cache is not None and cache_name else _Cached({})
    entries = cached.entries
    unchanged = len(entries) == len(found) and all(
        entries.get(e.path, ("", ""))[0] == e.key for e in found
    )
    if unchanged and cached.digest is not None:
        return cached.digest, len(found), cached.size
    todo = [e for e in found if e.link is None and entries.get(e.path, ("", ""))[0] != e.key]
    if todo and progress is not None:
        size = sum(e.size for e in todo) >> 20
        progress(f"measuring {len(todo)} files ({size} MiB) of the environment once; cached")
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        paths = [e.path for e in todo]
        digests = dict(zip(paths, pool.map(_sha256_file, paths), strict=True))
    fresh: dict[str, tuple[str, str]] = {}
    listing: list[list[Any]] = []
    total = 0
    for e in sorted(found, key=lambda f: (f.root, f.rel)):
        if e.link is not None:
            listing.append([e.root, e.rel, "l", e.link])
            fresh[e.path] = (e.key, e.link)
            continue
        value = digests.get(e.path) or entries[e.path][1]
        fresh[e.path] = (e.key, value)
        listing.append([e.root, e.rel, "f", value])
        total += e.size
    digest = hashlib.sha384(canonical_json({"roots": outer, "files": listing})).hexdigest()
    if cache is not None and cache_name:
        cache.save(cache_name, _Cached(fresh, digest, total))
    return digest, len(listing), total


def measure_environment(
    program: str,
    *,
    cache: EnvironmentCache | None = None,
    progress: Progress | None = None,
) -> PythonEnvironment:
    """Probe the interpreter `program` and measure its environment (`cache` default: the
    user's cache directory)."""
    if cache is None:
        cache = EnvironmentCache(default_cache_dir())
    probe = probe_interpreter(program)
    prefix, version = probe.prefix, probe.version
    roots = list(dict.fromkeys(os.path.realpath(r) for r in probe.roots if os.path.exists(r)))
    real = os.path.realpath(program)
    name = hashlib.sha256(canonical_json([real, prefix, roots])).hexdigest()[:32]
    libraries = sorted(
        lib
        for lib in {os.path.realpath(p) for p in probe.libraries if os.path.isfile(p)}
        if not any(lib.startswith(r.rstrip("/") + "/") for r in roots)
    )
    digest, files, size = measure_directory(roots, cache=cache, cache_name=name, progress=progress)
    return PythonEnvironment(
        interpreter=real,
        interpreter_sha256=_sha256_file(real),
        prefix=os.path.realpath(prefix),
        base_prefix=os.path.realpath(probe.base_prefix),
        libraries=tuple((p, _sha256_file(p)) for p in libraries),
        version=version.split()[0],
        roots=tuple(roots),
        digest=digest,
        files=files,
        size=size,
    )
