"""Running a workload in an Occlum SGX enclave: its instance, its `Occlum.json`, its MRENCLAVE.

Occlum measures an instance's image (`image/`) as a whole: `occlum build` turns it into an
integrity-protected file system whose root MAC goes, with `Occlum.json`, into the enclave that
the workspace's key signs. So everything the workload runs is copied into the image: the
interpreter (with the shared libraries it needs, by Occlum's `copy_bom`), the directories Python
imports from, the workload's measured files (their SHA-256 checked again as they are copied)
and a start script, the enclave's only entry point. Occlum takes a program's arguments from the
host at `occlum run`; the start script ignores them and starts the measured command, with its
arguments fixed in the image, in the directory it was measured from. Data directories are
mounted from the host (`hostfs`, unmeasured: ppml's file format authenticates them itself) and
may hold no code; /tmp is the enclave's own. The variables are fixed in `Occlum.json`, hence
measured, but the KMS URL, chosen when the workload starts. Nothing secret is written anywhere.
Inside, quotes come from Occlum's `/dev/sgx` (`ppml.tee.attester.OcclumAttester`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ppml.errors import ConfigurationError, UsageError
from ppml.tee.manifest import WorkloadManifest
from ppml.tee.sgx import (
    SIGSTRUCT_BYTES,
    EnclaveHost,
    EnclaveOptions,
    check_data_dirs,
    check_signing_key,
    enclave_size_bytes,
    mrenclave_from_sigstruct,
    outermost,
    python_variables,
    run_tool,
)
from ppml.tee.workload_env import CA_PEM_ENV, KMS_URL_ENV, LIBOS_ENV, TEE_ENV

__all__ = [
    "INSTANCE",
    "SIGNED_ENCLAVE",
    "START",
    "OcclumEnclave",
    "image_directories",
    "launch_command",
    "mrenclave_from_signed_enclave",
    "occlum_build",
    "render_bom",
    "render_occlum_json",
    "start_script",
]

INSTANCE = "instance"
START = "/ppml/start"  # the enclave's only entry point
SIGNED_ENCLAVE = "build/lib/libocclum-libos.signed.so"
_KERNEL_HEAP = "64MB"
_EDMM_INITIAL = 256 << 20  # with EDMM, user space committed at start; the rest on demand
_SHEBANG_MAX = 127  # Occlum reads a script's interpreter from its first 127 bytes
_CHUNK = 1 << 20
# The SGX SDK's ELF note with the enclave's metadata, whose SIGSTRUCT is at offset 64 of the
# descriptor (after magic, version, size, five 32-bit fields, enclave size and attributes).
_META_SECTION = b".note.sgxmeta"
_META_NAME = b"sgx_metadata\0"
_META_CSS_OFFSET = 64


@dataclass(frozen=True, slots=True)
class OcclumEnclave:
    """A built and signed Occlum instance: `occlum run` in `directory` starts it."""

    directory: Path
    mrenclave: str


# -- what goes into the instance ---------------------------------------------------------------


def _require_python(workload: WorkloadManifest) -> None:
    if workload.command.kind != "python":
        raise UsageError(
            "--libos occlum runs Python workloads (a measured start script in the image starts "
            "them); run other programs with --libos gramine"
        )


def _occlum_size(size: int) -> str:
    for unit, shift in (("GB", 30), ("MB", 20), ("KB", 10)):
        if size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return f"{size}B"  # pragma: no cover -- sizes are whole kilobytes


def image_directories(workload: WorkloadManifest, host: EnclaveHost) -> list[str]:
    """The directories copied whole into the image: those Python imports from (the measured
    environment's roots, else the interpreter's library and path directories)."""
    roots = workload.environment.roots if workload.environment is not None else ()
    dirs = [d for d in (roots or (*host.python_lib, *host.python_path)) if Path(d).is_dir()]
    return outermost(dirs)


def render_occlum_json(
    workload: WorkloadManifest, options: EnclaveOptions, host: EnclaveHost
) -> str:
    """`Occlum.json` for `workload` (the image's MAC is filled in by `occlum build`)."""
    _require_python(workload)
    check_data_dirs(workload, host)
    size = enclave_size_bytes(options.enclave_size)
    limits: dict[str, Any] = {
        "user_space_size": _occlum_size(min(size, _EDMM_INITIAL) if options.edmm else size),
        "kernel_space_heap_size": _KERNEL_HEAP,
        "kernel_space_stack_size": "1MB",
        "max_num_of_threads": options.max_threads,
    }
    if options.edmm:
        limits["user_space_max_size"] = _occlum_size(size)
    arch = host.arch_libdir
    library_path = ":".join(["/opt/occlum/glibc/lib", arch, "/usr" + arch, *host.python_lib])
    variables = [
        ("LD_LIBRARY_PATH", library_path),
        *python_variables(host),
        (TEE_ENV, "sgx"),
        (LIBOS_ENV, "occlum"),
        (CA_PEM_ENV, host.ca_pem),
        *host.env,
    ]
    config = {
        "resource_limits": limits,
        "process": {
            "default_stack_size": "8MB",
            "default_heap_size": "64MB",
            "default_mmap_size": "100MB",
        },
        "entry_points": [START],
        "env": {
            "default": [f"{name}={value}" for name, value in variables],
            # Captured from the host at start; the only variable not measured.
            "untrusted": [KMS_URL_ENV],
        },
        "metadata": {
            "product_id": 0,
            "version_number": 0,
            "debuggable": options.debug,
            "enable_kss": False,
            "family_id": {"high": "0x0", "low": "0x0"},
            "ext_prod_id": {"high": "0x0", "low": "0x0"},
        },
        "feature": {
            "amx": 0,
            "pkru": 0,
            "io_uring": 0,
            "enable_edmm": options.edmm,
            "enable_posix_shm": False,
        },
        "mount": [
            {
                "target": "/",
                "type": "unionfs",
                "options": {
                    "layers": [
                        {
                            "target": "/",
                            "type": "sefs",
                            "source": "./build/mount/__ROOT",
                            "options": {"MAC": ""},
                        },
                        {"target": "/", "type": "sefs", "source": "./run/mount/__ROOT"},
                    ]
                },
            },
            {"target": "/proc", "type": "procfs"},
            {"target": "/dev", "type": "devfs"},
            {"target": "/tmp", "type": "ramfs"},  # noqa: S108 -- the enclave's own
            *({"target": d, "type": "hostfs", "source": d} for d in outermost(host.data_dirs)),
        ],
    }
    return json.dumps(config, indent=4, ensure_ascii=False) + "\n"


def start_script(workload: WorkloadManifest, host: EnclaveHost) -> str:
    """The enclave's entry point: starts the measured command (its arguments fixed here) in its
    start directory, whatever arguments `occlum run` was given, and exits with its status."""
    _require_python(workload)
    entry = str(Path(workload.interpreter).resolve())
    shebang = f"#!{entry}"
    if len(shebang.encode()) >= _SHEBANG_MAX or any(c in entry for c in " \t\n"):
        raise UsageError(
            f"the interpreter's path {entry!r} cannot start an Occlum script (at most "
            f"{_SHEBANG_MAX - 3} bytes, no blanks)"
        )
    argv = [entry, *workload.args]
    return (
        f"{shebang}\n"
        "# ppml: the enclave's only entry point; the host's arguments are ignored.\n"
        "import os\n"
        "import sys\n"
        "\n"
        f"os.chdir({host.start_dir!r})\n"
        f"argv = {argv!r}\n"
        "pid = os.posix_spawn(argv[0], argv, os.environ)\n"
        "sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n"
    )


def render_bom(workload: WorkloadManifest, host: EnclaveHost) -> str:
    """The `copy_bom` file (JSON, which is YAML) that copies the interpreter, checked against
    its measured SHA-256, with the shared libraries it needs, and the import directories, each
    to its own path in the image."""
    entry = Path(workload.interpreter).resolve()
    targets = [
        {
            "target": str(entry.parent),
            "copy": [
                {"files": [{"name": str(entry), "hash": workload.interpreter_sha256.upper()}]}
            ],
        }
    ]
    for d in image_directories(workload, host):
        targets.append({"target": str(Path(d).parent), "copy": [{"dirs": [d]}]})
    targets.append({"target": "/", "mkdirs": ["proc", "dev", "tmp"]})
    return json.dumps({"targets": targets}, indent=2) + "\n"


# -- building ----------------------------------------------------------------------------------


def _in_image(image: Path, path: str) -> Path:
    return image / path.lstrip("/")


def _copy_measured(source: Path, target: Path, sha256: str) -> None:
    """Copy `source` to `target`, refusing it unless the bytes copied have the measured digest."""
    h = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        target.unlink()
    try:
        with open(source, "rb") as src, open(target, "xb") as dst:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                dst.write(chunk)
    except OSError as exc:
        raise ConfigurationError(f"cannot copy {source} into the Occlum image: {exc}") from None
    if h.hexdigest() != sha256:
        raise UsageError(f"{source} changed since it was measured: run again")


def _check_measured(path: Path, sha256: str, what: str) -> None:
    try:
        with open(path, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError:
        raise ConfigurationError(f"copy_bom did not copy {what} into the Occlum image") from None
    if digest != sha256:
        raise UsageError(f"{what} in the Occlum image is not the one measured")


def _write_private(path: Path, text: str, mode: int = 0o600) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(path, mode)


def _fill_image(instance: Path, workload: WorkloadManifest, host: EnclaveHost) -> None:
    """The measured files, the start script and the start directory, into `instance/image`."""
    image = instance / "image"
    for f in workload.trusted_files:
        path = Path(f.source) if f.source else workload.base_dir / f.path
        _copy_measured(path, _in_image(image, str(path)), f.sha256)
    _in_image(image, host.start_dir).mkdir(parents=True, exist_ok=True)
    for d in host.data_dirs:  # the mount points of the data directories
        _in_image(image, d).mkdir(parents=True, exist_ok=True)
    start = _in_image(image, START)
    start.parent.mkdir(parents=True, exist_ok=True)
    _write_private(start, start_script(workload, host), 0o755)


@contextlib.contextmanager
def occlum_build(
    workload: WorkloadManifest,
    options: EnclaveOptions,
    host: EnclaveHost,
    signing_key: Path,
    *,
    parent: Path | None = None,
) -> Iterator[OcclumEnclave]:
    """Make, fill, build and sign an Occlum instance in a private temporary directory (under
    `parent`), yield it, and remove it afterwards, whatever happens.

    The signing key goes to `occlum build --sign-key` by path: a private (0600) file in the
    workspace, so it never appears in argv, the environment or a new file."""
    from ppml.tee.attester import OCCLUM_DIR, OCCLUM_INSTALL_HINT

    check_signing_key(signing_key)
    config = render_occlum_json(workload, options, host)  # refusals before anything runs
    bom = render_bom(workload, host)
    directory = Path(tempfile.mkdtemp(prefix="ppml-occlum-", dir=parent))
    try:
        os.chmod(directory, 0o700)
        instance = directory / INSTANCE
        run_tool("occlum", ["new", str(instance)], hint=OCCLUM_INSTALL_HINT, cwd=directory)
        _write_private(instance / "Occlum.json", config)
        _write_private(directory / "bom.yaml", bom)
        run_tool(
            "copy_bom",
            [
                "--file",
                str(directory / "bom.yaml"),
                "--root",
                str(instance / "image"),
                "--include-dir",
                str(OCCLUM_DIR / "etc" / "template"),
            ],
            hint=OCCLUM_INSTALL_HINT,
            cwd=directory,
        )
        entry = str(Path(workload.interpreter).resolve())
        _check_measured(_in_image(instance / "image", entry), workload.interpreter_sha256, entry)
        _fill_image(instance, workload, host)
        build = ["build", "--sign-key", str(signing_key)]
        if options.edmm:
            build += ["--enable-edmm", "Y"]
        run_tool("occlum", build, hint=OCCLUM_INSTALL_HINT, cwd=instance)
        try:
            signed = (instance / SIGNED_ENCLAVE).read_bytes()
        except OSError:
            raise ConfigurationError(f"occlum build wrote no {SIGNED_ENCLAVE}") from None
        yield OcclumEnclave(instance, mrenclave_from_signed_enclave(signed))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def launch_command(enclave: OcclumEnclave) -> list[str]:
    """The argv that starts the signed instance (run in `enclave.directory`); `occlum run`
    passes its arguments on, which the start script ignores."""
    from ppml.tee.attester import OCCLUM_INSTALL_HINT

    path = shutil.which("occlum")
    if path is None:
        raise ConfigurationError(f"occlum not found on PATH ({OCCLUM_INSTALL_HINT})")
    return [path, "run", START]


# -- MRENCLAVE from the signed enclave ---------------------------------------------------------


def _section(elf: bytes, name: bytes) -> bytes:
    """The contents of the ELF64 (little-endian) section called `name`."""
    if elf[:4] != b"\x7fELF" or elf[4:6] != b"\x02\x01" or len(elf) < 64:
        raise ConfigurationError("the signed Occlum enclave is not a 64-bit ELF file")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    try:
        headers = [struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize) for i in range(shnum)]
        names = headers[shstrndx]
        for sh_name, _type, _flags, _addr, offset, size in headers:
            start = names[4] + sh_name
            if elf[start : elf.index(b"\0", start)] == name and offset + size <= len(elf):
                return elf[offset : offset + size]
    except (struct.error, IndexError, ValueError):
        raise ConfigurationError("the signed Occlum enclave's section table is damaged") from None
    raise ConfigurationError(f"the signed Occlum enclave has no {name.decode()} section")


def mrenclave_from_signed_enclave(elf: bytes) -> str:
    """MRENCLAVE from the SIGSTRUCT in a signed enclave's `.note.sgxmeta`, lowercase hex."""
    note = _section(elf, _META_SECTION)
    if len(note) < 12:
        raise ConfigurationError("the signed Occlum enclave's metadata note is truncated")
    namesz, descsz, _type = struct.unpack_from("<III", note)
    # The SGX SDK writes the descriptor right after the 13-byte name, unpadded.
    if note[12 : 12 + namesz] != _META_NAME or len(note) < 12 + namesz + descsz:
        raise ConfigurationError("the signed Occlum enclave has no SGX metadata")
    css = 12 + namesz + _META_CSS_OFFSET
    return mrenclave_from_sigstruct(note[css : css + SIGSTRUCT_BYTES])
