"""Running a workload in a Gramine-SGX enclave: its manifest, its signature, its MRENCLAVE.

`render_manifest_template` writes a Gramine manifest template (TOML, with Gramine's own Jinja
helpers for its install paths) from a workload manifest: the interpreter as entrypoint, the
arguments fixed in the manifest, the workload's trusted files with the SHA-256 digests ppml
computed, the interpreter's libraries as trusted directories, data directories as allowed files
(ppml's file format authenticates them itself), DCAP remote attestation, and no secret at all.
`enclave_build` runs `gramine-manifest` and `gramine-sgx-sign` in a private temporary directory
and reads MRENCLAVE from the SIGSTRUCT; `launch_command` is the argv that starts the enclave.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
import sysconfig
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
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
    "SignedEnclave",
    "enclave_build",
    "host_for",
    "interpreter_paths",
    "launch_command",
    "mrenclave_from_sigstruct",
    "render_manifest_template",
]

# Python with pyarrow and duckdb needs well over Gramine's 256M default; without EDMM the whole
# size is committed when the enclave starts.
DEFAULT_ENCLAVE_SIZE = "4G"
# Python's, pyarrow's and duckdb's thread pools, plus Gramine's own helper threads.
DEFAULT_MAX_THREADS = 128
APP_NAME = "workload"
PYCACHE_DIR = "/tmp/ppml-pycache"  # noqa: S108 -- a tmpfs inside the enclave, not the host's /tmp

# SIGSTRUCT (Intel SDM vol. 3D, 38.13): 1808 bytes; two fixed headers; ENCLAVEHASH at 960.
SIGSTRUCT_BYTES = 1808
_HEADER1 = bytes.fromhex("06000000e10000000000010000000000")
_HEADER2 = bytes.fromhex("01010000600000006000000001000000")
_HEADER2_OFFSET = 24
_ENCLAVEHASH_OFFSET = 960

_SIZE = re.compile(r"([1-9][0-9]*)([KMG])")
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_JINJA = ("{{", "}}", "{%", "%}", "{#", "#}")
_STDERR_TAIL = 2000
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class EnclaveOptions:
    """The enclave's resources and mode. `debug=True` makes a debug enclave, whose memory the
    host can read: development only."""

    enclave_size: str = DEFAULT_ENCLAVE_SIZE
    max_threads: int = DEFAULT_MAX_THREADS
    edmm: bool = False
    debug: bool = False

    def __post_init__(self) -> None:
        match = _SIZE.fullmatch(self.enclave_size)
        if match is None:
            raise UsageError(f"enclave size {self.enclave_size!r}: expected a number and K, M or G")
        size = int(match.group(1)) * _UNITS[match.group(2)]
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


@dataclass(frozen=True, slots=True)
class SignedEnclave:
    """A signed enclave: `gramine-sgx <prefix>` starts it."""

    directory: Path
    mrenclave: str

    @property
    def prefix(self) -> Path:
        return self.directory / APP_NAME


# -- the manifest ------------------------------------------------------------------------------


def _q(value: str) -> str:
    """A TOML basic string. Values never carry Jinja markup: gramine-manifest would run it."""
    if any(marker in value for marker in _JINJA):
        raise UsageError(
            f"{value[:60]!r} contains template markup ({{{{, {{% or {{#}}), "
            "which the Gramine manifest cannot carry"
        )
    return json.dumps(value, ensure_ascii=False)


def _covered(path: str, dirs: Iterable[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


def _outermost(paths: Iterable[str]) -> list[str]:
    """The paths not inside another one of them, in order, without repeats."""
    unique = list(dict.fromkeys(p.rstrip("/") or "/" for p in paths))
    return [p for p in unique if not _covered(p, [d for d in unique if d != p])]


_CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".so", ".pth", ".pyd", ".jar", ".class", ".sh")


def _check_data_dirs(workload: WorkloadManifest, host: EnclaveHost) -> None:
    """Data directories are allowed files (not integrity-checked): they may hold no code, and
    may not overlap the workload's code or the directories Python imports from."""
    code = [str(workload.base_dir / f.path) for f in workload.trusted_files]
    libraries = [*host.python_lib, *host.python_path, str(workload.base_dir)]
    for data in host.data_dirs:
        clash = next((p for p in code if _covered(p, [data])), None) or next(
            (d for d in libraries if _covered(d, [data]) or _covered(data, [d])), None
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


def render_manifest_template(
    workload: WorkloadManifest, options: EnclaveOptions, host: EnclaveHost
) -> str:
    """The Gramine manifest template (TOML + Gramine's Jinja helpers) for `workload`."""
    entry = str(Path(workload.interpreter).resolve())
    python = _outermost([*host.python_lib, *host.python_path])
    _check_data_dirs(workload, host)
    trusted = [str(workload.base_dir / f.path) for f in workload.trusted_files]
    lines = [
        "# Gramine manifest template of a ppml workload (rendered by gramine-manifest).",
        f"# ppml workload measurement: {workload.measurement()}",
        "",
        *_loader_section(workload, host, entry, python),
        "",
        *_mounts_section(workload, host, entry, python, trusted),
        "",
        *_sgx_section(workload, options, host, entry, python, trusted),
    ]
    return "\n".join(lines) + "\n"


def _loader_section(
    workload: WorkloadManifest, host: EnclaveHost, entry: str, python: list[str]
) -> list[str]:
    """The entry point, argv and environment: all fixed, hence measured, but the KMS URL."""
    arch = host.arch_libdir
    argv = [entry, *workload.args]
    library_path = ":".join(["/lib", arch, "/usr" + arch, *host.python_lib])
    lines = [
        f"libos.entrypoint = {_q(entry)}",
        'loader.entrypoint = "file:{{ gramine.libos }}"',
        'loader.log_level = "error"',
        f"loader.argv = [{', '.join(_q(a) for a in argv)}]",
        "",
        "# Fixed values are measured; only the KMS URL (chosen at start) passes through.",
        f"loader.env.LD_LIBRARY_PATH = {_q(library_path)}",
    ]
    if python:
        lines += [
            f"loader.env.PYTHONPATH = {_q(':'.join(host.python_path))}",
            'loader.env.PYTHONNOUSERSITE = "1"',
            'loader.env.PYTHONDONTWRITEBYTECODE = "1"',
            # Byte code only from the enclave's tmpfs: never a host-side .pyc.
            f"loader.env.PYTHONPYCACHEPREFIX = {_q(PYCACHE_DIR)}",
        ]
    lines += [
        'loader.env.PPML_TEE = "sgx"',
        f"loader.env.PPML_KMS_CA_PEM = {_q(host.ca_pem)}",
        "loader.env.PPML_KMS_URL = { passthrough = true }",
    ]
    lines += [f"loader.env.{name} = {_q(value)}" for name, value in host.env]
    return lines


def _mounts_section(
    workload: WorkloadManifest,
    host: EnclaveHost,
    entry: str,
    python: list[str],
    trusted: list[str],
) -> list[str]:
    """The enclave's file system: the runtime, the code and data directories, a private /tmp."""
    arch = host.arch_libdir
    usr_arch = "/usr" + arch
    mounts = [
        '  { path = "/lib", uri = "file:{{ gramine.runtimedir() }}" },',
        f"  {{ path = {_q(arch)}, uri = {_q('file:' + arch)} }},",
        f"  {{ path = {_q(usr_arch)}, uri = {_q('file:' + usr_arch)} }},",
        f"  {{ path = {_q(entry)}, uri = {_q('file:' + entry)} }},",
    ]
    code_dirs = _outermost([*python, str(workload.base_dir)])
    directories = _outermost([*code_dirs, *host.data_dirs, host.start_dir])
    for d in directories:
        mounts.append(f"  {{ path = {_q(d)}, uri = {_q('file:' + d)} }},")
    for path in trusted:
        if not _covered(path, directories):  # a --trusted file outside those directories
            mounts.append(f"  {{ path = {_q(path)}, uri = {_q('file:' + path)} }},")
    mounts.append('  { type = "tmpfs", path = "/tmp" },')
    return [f"fs.start_dir = {_q(host.start_dir)}", "fs.mounts = [", *mounts, "]"]


def _sgx_section(
    workload: WorkloadManifest,
    options: EnclaveOptions,
    host: EnclaveHost,
    entry: str,
    python: list[str],
    trusted: list[str],
) -> list[str]:
    """The enclave's settings, the measured (trusted) files and the data it may read unmeasured."""
    arch = host.arch_libdir
    lines = [
        f"sgx.debug = {'true' if options.debug else 'false'}",
        f"sgx.edmm_enable = {'true' if options.edmm else 'false'}",
        f"sgx.enclave_size = {_q(options.enclave_size)}",
        f"sgx.max_threads = {options.max_threads}",
        'sgx.remote_attestation = "dcap"',
        'sgx.file_check_policy = "strict"',
        "",
        "sgx.trusted_files = [",
        '  "file:{{ gramine.libos }}",',
        '  "file:{{ gramine.runtimedir() }}/",',
        f"  {_q('file:' + arch + '/')},",
        f"  {_q('file:/usr' + arch + '/')},",
        f"  {{ uri = {_q('file:' + entry)}, sha256 = {_q(workload.interpreter_sha256)} }},",
    ]
    lines += [f"  {_q('file:' + d + '/')}," for d in python]
    for path, f in zip(trusted, workload.trusted_files, strict=True):
        if not _covered(path, python):
            lines.append(f"  {{ uri = {_q('file:' + path)}, sha256 = {_q(f.sha256)} }},")
    lines.append("]")
    if host.data_dirs:
        lines += [
            "",
            "# ppml-encrypted data: ppml authenticates these files itself.",
            "sgx.allowed_files = [",
            *(f"  {_q('file:' + d + '/')}," for d in _outermost(host.data_dirs)),
            "]",
        ]
    return lines


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
    libs = _outermost(d for d in lib if d and Path(d).is_dir())
    extra = [d for d in dict.fromkeys(rest) if d and not _covered(d, libs) and Path(d).is_dir()]
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


# -- building and launching --------------------------------------------------------------------


def _tool_env() -> dict[str, str]:
    """Gramine's tools get the launcher's environment minus every ppml variable."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PPML_")}


def _run_tool(tool: str, args: list[str]) -> None:
    path = shutil.which(tool)
    if path is None:
        from ppml.tee.attester import GRAMINE_INSTALL_HINT

        raise ConfigurationError(f"{tool} not found on PATH ({GRAMINE_INSTALL_HINT})")
    try:
        proc = subprocess.run(  # noqa: S603 -- Gramine's tool, found on PATH; no secret in argv
            [path, *args], capture_output=True, env=_tool_env(), check=False, timeout=3600
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise ConfigurationError(f"cannot run {tool}: {exc}") from None
    if proc.returncode != 0:
        detail = proc.stderr.decode("utf-8", "replace").strip()[-_STDERR_TAIL:]
        raise ConfigurationError(
            f"{tool} failed (exit {proc.returncode})" + (f": {detail}" if detail else "")
        )


def _check_key(key: Path) -> None:
    try:
        st = key.stat()
    except OSError:
        raise ConfigurationError("the enclave signing key is missing", path=key) from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigurationError(
            "the enclave signing key is readable by others (it must be 0600)", path=key
        )


@contextlib.contextmanager
def enclave_build(
    template: str, signing_key: Path, *, parent: Path | None = None
) -> Iterator[SignedEnclave]:
    """Render, expand and sign `template` in a private temporary directory (under `parent`),
    yield the signed enclave, and remove the directory afterwards, whatever happens.

    The signing key is passed to gramine-sgx-sign by path: it is a private (0600) file in the
    workspace, so it never appears in argv, the environment or a new file."""
    _check_key(signing_key)
    directory = Path(tempfile.mkdtemp(prefix="ppml-sgx-", dir=parent))
    try:
        os.chmod(directory, 0o700)
        source = directory / f"{APP_NAME}.manifest.template"
        manifest = directory / f"{APP_NAME}.manifest"
        sig = directory / f"{APP_NAME}.sig"
        fd = os.open(source, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(template)
        _run_tool("gramine-manifest", [str(source), str(manifest)])
        _run_tool(
            "gramine-sgx-sign",
            [
                "--key",
                str(signing_key),
                "--manifest",
                str(manifest),
                "--output",
                str(directory / f"{APP_NAME}.manifest.sgx"),
                "--sigfile",
                str(sig),
            ],
        )
        try:
            sigstruct = sig.read_bytes()
        except OSError:
            raise ConfigurationError("gramine-sgx-sign wrote no enclave signature") from None
        yield SignedEnclave(directory, mrenclave_from_sigstruct(sigstruct))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def launch_command(enclave: SignedEnclave) -> list[str]:
    """The argv that starts the signed enclave."""
    path = shutil.which("gramine-sgx")
    if path is None:
        from ppml.tee.attester import GRAMINE_INSTALL_HINT

        raise ConfigurationError(f"gramine-sgx not found on PATH ({GRAMINE_INSTALL_HINT})")
    return [path, str(enclave.prefix)]
