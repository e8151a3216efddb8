"""What ppml's two SGX LibOSes (Gramine, `ppml.tee.gramine`; Occlum, `ppml.tee.occlum`) share:
the enclave's options, this host's facts about a workload (its interpreter's library paths, its
data directories, its variables), the rule that data directories hold no code, the signing
key's checks, running a LibOS tool, and MRENCLAVE from a SIGSTRUCT.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sysconfig
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ppml.errors import ConfigurationError, UsageError
from ppml.tee.manifest import WorkloadManifest

__all__ = [
    "DEFAULT_ENCLAVE_SIZE",
    "DEFAULT_MAX_THREADS",
    "SIGSTRUCT_BYTES",
    "EnclaveHost",
    "EnclaveOptions",
    "check_data_dirs",
    "check_signing_key",
    "covered",
    "enclave_size_bytes",
    "host_for",
    "interpreter_paths",
    "mrenclave_from_sigstruct",
    "outermost",
    "python_variables",
    "run_tool",
    "tool_env",
]

# Python with pyarrow and duckdb needs well over Gramine's 256M default; without EDMM the whole
# size is committed when the enclave starts.
DEFAULT_ENCLAVE_SIZE = "4G"
# Python's, pyarrow's and duckdb's thread pools, plus Gramine's own helper threads.
DEFAULT_MAX_THREADS = 128

# SIGSTRUCT (Intel SDM vol. 3D, 38.13): 1808 bytes; two fixed headers; ENCLAVEHASH at 960.
SIGSTRUCT_BYTES = 1808
_HEADER1 = bytes.fromhex("06000000e10000000000010000000000")
_HEADER2 = bytes.fromhex("01010000600000006000000001000000")
_HEADER2_OFFSET = 24
_ENCLAVEHASH_OFFSET = 960

_SIZE = re.compile(r"([1-9][0-9]*)([KMG])")
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
PYCACHE_DIR = "/tmp/ppml-pycache"  # noqa: S108 -- the enclave's own /tmp, not the host's
_STDERR_TAIL = 2000
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def enclave_size_bytes(size: str) -> int:
    """`4G`, `512M`, ... in bytes; `UsageError` for anything else."""
    match = _SIZE.fullmatch(size)
    if match is None:
        raise UsageError(f"enclave size {size!r}: expected a number and K, M or G")
    return int(match.group(1)) * _UNITS[match.group(2)]


@dataclass(frozen=True, slots=True)
class EnclaveOptions:
    """The enclave's resources and mode. `debug=True` makes a debug enclave, whose memory the
    host can read: development only."""

    enclave_size: str = DEFAULT_ENCLAVE_SIZE
    max_threads: int = DEFAULT_MAX_THREADS
    edmm: bool = False
    debug: bool = False

    def __post_init__(self) -> None:
        size = enclave_size_bytes(self.enclave_size)
        if size & (size - 1):
            raise UsageError(f"enclave size {self.enclave_size}: SGX needs a power of two")
        if not 4 <= self.max_threads <= 4096:
            raise UsageError("max threads: from 4 (Gramine's own threads need 3) to 4096")


@dataclass(frozen=True, slots=True)
class EnclaveHost:
    """What the manifest needs to know about this host: the interpreter's library directories
    (standard library) and `sys.path` additions (site-packages), the multiarch library
    directory, the directory to start in, the directories holding data, the workspace CA that
    the workload must find on the KMS (public), and the workload's variables with their values
    (fixed in the manifest, so measured in MRENCLAVE)."""

    python_lib: tuple[str, ...]
    python_path: tuple[str, ...]
    arch_libdir: str
    start_dir: str
    data_dirs: tuple[str, ...]
    ca_pem: str
    env: tuple[tuple[str, str], ...] = field(default=())


def covered(path: str, dirs: Iterable[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


def outermost(paths: Iterable[str]) -> list[str]:
    """The paths not inside another one of them, in order, without repeats."""
    unique = list(dict.fromkeys(p.rstrip("/") or "/" for p in paths))
    return [p for p in unique if not covered(p, [d for d in unique if d != p])]


_CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".so", ".pth", ".pyd", ".jar", ".class", ".sh")


def check_data_dirs(workload: WorkloadManifest, host: EnclaveHost) -> None:
    """Data directories are allowed files (not integrity-checked): they may hold no code, and
    may not overlap the workload's code or the directories Python imports from."""
    code = [str(workload.base_dir / f.path) for f in workload.trusted_files]
    libraries = [*host.python_lib, *host.python_path, str(workload.base_dir)]
    for data in host.data_dirs:
        clash = next((p for p in code if covered(p, [data])), None) or next(
            (d for d in libraries if covered(d, [data]) or covered(data, [d])), None
        )
        if clash is not None:
            raise UsageError(
                f"data directory {data} overlaps the workload's code ({clash}): allowed files "
                "are not integrity-checked in the enclave, so keep data and code in separate "
                "directories (--data DIR)"
            )
        for root, _dirs, files in os.walk(data):
            found = next((f for f in files if f.endswith(_CODE_SUFFIXES)), None)
            if found is not None:
                raise UsageError(
                    f"data directory {data} holds code ({os.path.join(root, found)}): the "
                    "enclave would load it unchecked; move it out or measure it with --trusted"
                )


# -- the host ----------------------------------------------------------------------------------

_PATHS_SCRIPT = (
    "import json, sys, sysconfig; "
    "print(json.dumps([sysconfig.get_config_var('LIBDIR') or sys.base_prefix + '/lib', "
    "sysconfig.get_path('stdlib'), sysconfig.get_path('platstdlib'), sys.path]))"
)


def interpreter_paths(interpreter: str) -> tuple[list[str], list[str]]:
    """Where a Python interpreter loads code from: its library directories (the standard
    library, a shared libpython) and the rest of its `sys.path` (site-packages and the like;
    the current directory and the script's are left to the manifest)."""
    try:
        out = subprocess.run(  # noqa: S603 -- the workload's own interpreter, measured
            [interpreter, "-c", _PATHS_SCRIPT],
            capture_output=True,
            check=True,
            timeout=60,
            env={"PATH": os.defpath},
        ).stdout
        libdir, stdlib, platstdlib, path = json.loads(out)
        lib = [str(libdir), str(stdlib), str(platstdlib)]
        rest = [str(p) for p in path]
    except (OSError, subprocess.SubprocessError, ValueError, TypeError):
        raise ConfigurationError(
            f"cannot ask {interpreter} for its library paths (is it a Python interpreter?)"
        ) from None
    libs = outermost(d for d in lib if d and Path(d).is_dir())
    extra = [d for d in dict.fromkeys(rest) if d and not covered(d, libs) and Path(d).is_dir()]
    return libs, extra


def host_for(
    workload: WorkloadManifest,
    *,
    ca_pem: str,
    data_dirs: Sequence[Path] = (),
    start_dir: Path | None = None,
    python_paths: Callable[[str], tuple[list[str], list[str]]] = interpreter_paths,
) -> EnclaveHost:
    """This host's facts for `workload`'s manifest."""
    is_python = workload.entry is not None or Path(workload.interpreter).name.startswith("python")
    lib, path = python_paths(workload.interpreter) if is_python else ([], [])
    multiarch = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    data: list[str] = []
    for d in data_dirs:
        if not Path(d).is_dir():
            raise UsageError(f"data directory {d} does not exist")
        data.append(str(Path(d).resolve()))
    for name, _ in workload.env:
        if not _ENV_NAME.fullmatch(name):
            raise UsageError(f"environment variable {name!r} cannot be passed into an enclave")
    # The workload's variables with their values, except ppml's own (the launcher sets those),
    # and PATH and TMPDIR, which name host locations (temporary files stay in the enclave's
    # tmpfs).
    env = tuple(
        (n, v) for n, v in workload.env if n not in ("PATH", "TMPDIR") and not n.startswith("PPML_")
    )
    return EnclaveHost(
        python_lib=tuple(lib),
        python_path=tuple(path),
        arch_libdir=f"/lib/{multiarch}",
        start_dir=str((start_dir or Path.cwd()).resolve()),
        data_dirs=tuple(data),
        ca_pem=ca_pem,
        env=env,
    )


def python_variables(host: EnclaveHost) -> list[tuple[str, str]]:
    """The Python variables fixed in an enclave (hence measured): its `sys.path` additions, no
    user site, and byte code only in the enclave's /tmp, never a host-side .pyc."""
    if not (host.python_lib or host.python_path):
        return []
    return [
        ("PYTHONPATH", ":".join(host.python_path)),
        ("PYTHONNOUSERSITE", "1"),
        ("PYTHONDONTWRITEBYTECODE", "1"),
        ("PYTHONPYCACHEPREFIX", PYCACHE_DIR),
    ]


# -- the SIGSTRUCT -----------------------------------------------------------------------------


def mrenclave_from_sigstruct(sigstruct: bytes) -> str:
    """MRENCLAVE (ENCLAVEHASH) from a SIGSTRUCT (the `.sig` file), lowercase hex."""
    if len(sigstruct) != SIGSTRUCT_BYTES:
        raise ConfigurationError(
            f"the enclave signature is {len(sigstruct)} bytes, not a {SIGSTRUCT_BYTES}-byte "
            "SIGSTRUCT"
        )
    if (
        sigstruct[: len(_HEADER1)] != _HEADER1
        or sigstruct[_HEADER2_OFFSET : _HEADER2_OFFSET + len(_HEADER2)] != _HEADER2
    ):
        raise ConfigurationError("the enclave signature does not have SIGSTRUCT's headers")
    return sigstruct[_ENCLAVEHASH_OFFSET : _ENCLAVEHASH_OFFSET + 32].hex()


# -- LibOS tools and the signing key --------------------------------------------------------


def tool_env() -> dict[str, str]:
    """A LibOS's tools get the launcher's environment minus every ppml variable."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PPML_")}


def run_tool(
    tool: str, args: list[str], *, hint: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run a LibOS tool found on PATH (`hint` says how to install it) with `tool_env`; a failure
    is a `ConfigurationError` carrying the end of the tool's stderr."""
    path = shutil.which(tool)
    if path is None:
        raise ConfigurationError(f"{tool} not found on PATH ({hint})")
    try:
        proc = subprocess.run(  # noqa: S603 -- the LibOS's tool, found on PATH; no secret in argv
            [path, *args], capture_output=True, env=tool_env(), cwd=cwd, check=False, timeout=3600
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise ConfigurationError(f"cannot run {tool}: {exc}") from None
    if proc.returncode != 0:
        detail = proc.stderr.decode("utf-8", "replace").strip()[-_STDERR_TAIL:]
        raise ConfigurationError(
            f"{tool} failed (exit {proc.returncode})" + (f": {detail}" if detail else "")
        )
    return proc


def check_signing_key(key: Path) -> None:
    try:
        st = key.stat()
    except OSError:
        raise ConfigurationError("the enclave signing key is missing", path=key) from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigurationError(
            "the enclave signing key is readable by others (it must be 0600)", path=key
        )
