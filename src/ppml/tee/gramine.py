"""Running a workload in a Gramine-SGX enclave: its manifest, its signature, its MRENCLAVE.

`render_manifest_template` writes a Gramine manifest template (TOML, with Gramine's own Jinja
helpers for its install paths) from a workload manifest: the interpreter as entrypoint, the
arguments fixed in the manifest, the workload's trusted files with the SHA-256 digests ppml
computed, the interpreter's libraries as trusted directories, data directories as allowed files
(ppml's file format authenticates them itself), DCAP remote attestation, and no secret at all.
`enclave_build` runs `gramine-manifest` and `gramine-sgx-sign` in a private temporary directory
and reads MRENCLAVE from the SIGSTRUCT; `launch_command` is the argv that starts the enclave.
What Gramine shares with Occlum (options, host facts, checks, tools) is in `ppml.tee.sgx`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ppml.errors import ConfigurationError, UsageError
from ppml.tee.manifest import WorkloadManifest
from ppml.tee.sgx import (
    DEFAULT_ENCLAVE_SIZE,
    DEFAULT_MAX_THREADS,
    SIGSTRUCT_BYTES,
    EnclaveHost,
    EnclaveOptions,
    check_data_dirs,
    check_signing_key,
    covered,
    host_for,
    interpreter_paths,
    mrenclave_from_sigstruct,
    outermost,
    python_variables,
    run_tool,
)

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

APP_NAME = "workload"

_JINJA = ("{{", "}}", "{%", "%}", "{#", "#}")


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


def render_manifest_template(
    workload: WorkloadManifest, options: EnclaveOptions, host: EnclaveHost
) -> str:
    """The Gramine manifest template (TOML + Gramine's Jinja helpers) for `workload`."""
    entry = str(Path(workload.interpreter).resolve())
    python = outermost([*host.python_lib, *host.python_path])
    check_data_dirs(workload, host)
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
    lines += [f"loader.env.{name} = {_q(value)}" for name, value in python_variables(host)]
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
    code_dirs = outermost([*python, str(workload.base_dir)])
    directories = outermost([*code_dirs, *host.data_dirs, host.start_dir])
    for d in directories:
        mounts.append(f"  {{ path = {_q(d)}, uri = {_q('file:' + d)} }},")
    for path in trusted:
        if not covered(path, directories):  # a --trusted file outside those directories
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
        if not covered(path, python):
            lines.append(f"  {{ uri = {_q('file:' + path)}, sha256 = {_q(f.sha256)} }},")
    lines.append("]")
    if host.data_dirs:
        lines += [
            "",
            "# ppml-encrypted data: ppml authenticates these files itself.",
            "sgx.allowed_files = [",
            *(f"  {_q('file:' + d + '/')}," for d in outermost(host.data_dirs)),
            "]",
        ]
    return lines


# -- building and launching --------------------------------------------------------------------


@contextlib.contextmanager
def enclave_build(
    template: str, signing_key: Path, *, parent: Path | None = None
) -> Iterator[SignedEnclave]:
    """Render, expand and sign `template` in a private temporary directory (under `parent`),
    yield the signed enclave, and remove the directory afterwards, whatever happens.

    The signing key is passed to gramine-sgx-sign by path: it is a private (0600) file in the
    workspace, so it never appears in argv, the environment or a new file."""
    from ppml.tee.attester import GRAMINE_INSTALL_HINT

    check_signing_key(signing_key)
    directory = Path(tempfile.mkdtemp(prefix="ppml-sgx-", dir=parent))
    try:
        os.chmod(directory, 0o700)
        source = directory / f"{APP_NAME}.manifest.template"
        manifest = directory / f"{APP_NAME}.manifest"
        sig = directory / f"{APP_NAME}.sig"
        fd = os.open(source, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(template)
        run_tool("gramine-manifest", [str(source), str(manifest)], hint=GRAMINE_INSTALL_HINT)
        run_tool(
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
            hint=GRAMINE_INSTALL_HINT,
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
