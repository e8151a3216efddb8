"""The attester side of a hardware TEE: evidence, and the checks `ppml run` makes before
starting anything on one.

An `Attester` turns 64 bytes of report data into evidence of one TEE type. Inside a Gramine-SGX
enclave the workload is its own attester (`GramineAttester`, through Gramine's
`/dev/attestation` pseudo-files), inside an Occlum enclave too (`OcclumAttester`, through the
DCAP ioctls of Occlum's `/dev/sgx`); in a TDX or SEV-SNP confidential VM the launcher produces
reports through configfs-tsm (`TsmAttester`) and hands them to the workload over the evidence
channel, exactly as for the sim backend. `evidence_source` picks the workload's side.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from ppml.errors import AttestationFailed, ConfigurationError, UsageError
from ppml.tee.channel import request_evidence
from ppml.tee.tsm import TSM_REPORT_DIR, TsmClient
from ppml.tee.workload_env import LIBOS_ENV, TEE_ENV, Evidence

__all__ = [
    "ATTESTATION_DIR",
    "GRAMINE_INSTALL_HINT",
    "GRAMINE_TOOLS",
    "OCCLUM_DEVICE",
    "OCCLUM_DIR",
    "OCCLUM_INSTALL_HINT",
    "OCCLUM_TOOLS",
    "SGX_DEVICE",
    "Attester",
    "GramineAttester",
    "OcclumAttester",
    "TsmAttester",
    "evidence_source",
    "require_gramine",
    "require_occlum",
    "require_sgx_device",
    "require_tsm_guest",
]

SGX_DEVICE = Path("/dev/sgx_enclave")
ATTESTATION_DIR = Path("/dev/attestation")
GRAMINE_TOOLS = ("gramine-manifest", "gramine-sgx-sign", "gramine-sgx")
GRAMINE_INSTALL_HINT = "install Gramine: https://gramine.readthedocs.io/en/stable/installation.html"
OCCLUM_DIR = Path("/opt/occlum")
OCCLUM_TOOLS = ("occlum", "copy_bom")
OCCLUM_INSTALL_HINT = "install Occlum: https://occlum.readthedocs.io/en/latest/installation.html"
# Occlum's SGX device inside the enclave (not the host's /dev/sgx_enclave) and its DCAP ioctls
# (src/libos/src/fs/dev_fs/dev_sgx: _IOR('s', 7, u32) and _IOWR('s', 8, 24-byte argument)).
OCCLUM_DEVICE = Path("/dev/sgx")
SGXIOC_GET_DCAP_QUOTE_SIZE = 0x80047307
SGXIOC_GEN_DCAP_QUOTE = 0xC0187308
_REPORT_DATA_BYTES = 64
# An SGX ECDSA quote (v3): a 48-byte header, then the enclave's 384-byte report body, whose
# report data are its last 64 bytes; then the signature data.
_SGX_QUOTE_HEADER = 48
_SGX_REPORT_DATA_OFFSET = _SGX_QUOTE_HEADER + 320
_SGX_MIN_QUOTE = _SGX_QUOTE_HEADER + 384 + 4
_MAX_QUOTE = 1 << 20


class Attester(Protocol):
    """Evidence of one TEE type over 64 bytes of report data."""

    @property
    def tee(self) -> str: ...

    def evidence(self, report_data: bytes) -> bytes: ...


def _check_report_data(report_data: bytes) -> None:
    if not isinstance(report_data, bytes) or len(report_data) != _REPORT_DATA_BYTES:
        raise UsageError(f"report data must be {_REPORT_DATA_BYTES} bytes")


def _bound_quote(quote: bytes, report_data: bytes, libos: str) -> bytes:
    """`quote` once it is long enough for an SGX quote and binds `report_data`."""
    if len(quote) < _SGX_MIN_QUOTE:
        raise AttestationFailed(f"{libos} returned a {len(quote)}-byte quote: too short")
    bound = quote[_SGX_REPORT_DATA_OFFSET : _SGX_REPORT_DATA_OFFSET + _REPORT_DATA_BYTES]
    if bound != report_data:
        raise AttestationFailed(f"{libos} returned a quote over other report data")
    return quote


class GramineAttester:
    """SGX DCAP quotes from inside a Gramine-SGX enclave: write the report data to
    `user_report_data`, read `quote`. The two steps share per-process state, hence the lock."""

    tee = "sgx"
    _lock = threading.Lock()

    def __init__(self, root: Path = ATTESTATION_DIR) -> None:
        self._root = Path(root)

    def evidence(self, report_data: bytes) -> bytes:
        _check_report_data(report_data)
        if not self._root.is_dir():
            raise AttestationFailed(
                f"{self._root} not present: not running inside a Gramine-SGX enclave"
            )
        with self._lock:
            kind = self._read("attestation_type", 64).decode("ascii", "replace").strip()
            if kind != "dcap":
                raise AttestationFailed(
                    f"Gramine attestation type is {kind!r}, not 'dcap': the enclave's manifest "
                    'needs sgx.remote_attestation = "dcap"'
                )
            try:
                with open(self._root / "user_report_data", "wb", buffering=0) as fh:
                    written = fh.write(report_data)
            except OSError as exc:
                raise AttestationFailed(
                    f"cannot write Gramine's user_report_data: {exc.strerror or exc}"
                ) from None
            if written != len(report_data):
                raise AttestationFailed("short write to Gramine's user_report_data")
            quote = self._read("quote", _MAX_QUOTE)
        return _bound_quote(quote, report_data, "Gramine")

    def _read(self, name: str, limit: int) -> bytes:
        try:
            with open(self._root / name, "rb") as fh:
                return fh.read(limit)
        except OSError as exc:
            raise AttestationFailed(
                f"cannot read Gramine's {name}: {exc.strerror or exc}"
            ) from None


class _GenQuoteArg(ctypes.Structure):
    """Occlum's `IoctlGenDCAPQuoteArg`: three pointers (report data in, size in/out, quote out)."""

    _fields_ = (
        ("report_data", ctypes.c_void_p),
        ("quote_size", ctypes.c_void_p),
        ("quote_buf", ctypes.c_void_p),
    )


Ioctl = Callable[[int, int, Any], Any]


class OcclumAttester:
    """SGX DCAP quotes from inside an Occlum enclave: ask Occlum's `/dev/sgx` for the quote's
    size, then for a quote over the report data (the LibOS asks the host's quoting enclave).
    `ioctl` is `fcntl.ioctl`; a test passes a fake that serves the same two requests."""

    tee = "sgx"
    _lock = threading.Lock()

    def __init__(self, device: Path = OCCLUM_DEVICE, ioctl: Ioctl = fcntl.ioctl) -> None:
        self._device = Path(device)
        self._ioctl = ioctl

    def evidence(self, report_data: bytes) -> bytes:
        _check_report_data(report_data)
        if not self._device.exists():
            raise AttestationFailed(f"{self._device} not present: not running inside Occlum")
        with self._lock:
            try:
                fd = os.open(self._device, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise AttestationFailed(
                    f"cannot open {self._device}: {exc.strerror or exc}"
                ) from None
            try:
                quote = self._quote(fd, report_data)
            finally:
                os.close(fd)
        return _bound_quote(quote, report_data, "Occlum")

    def _quote(self, fd: int, report_data: bytes) -> bytes:
        size_arg = ctypes.c_uint32(0)
        self._call(fd, SGXIOC_GET_DCAP_QUOTE_SIZE, size_arg, "quote size")
        size = size_arg.value
        if not _SGX_MIN_QUOTE <= size <= _MAX_QUOTE:
            raise AttestationFailed(f"Occlum's DCAP quote size is {size} bytes: not a quote")
        data = ctypes.create_string_buffer(report_data, _REPORT_DATA_BYTES)
        quote_size = ctypes.c_uint32(size)
        quote = ctypes.create_string_buffer(size)
        arg = _GenQuoteArg(
            ctypes.addressof(data), ctypes.addressof(quote_size), ctypes.addressof(quote)
        )
        self._call(fd, SGXIOC_GEN_DCAP_QUOTE, arg, "quote")
        return quote.raw[: min(quote_size.value, size)]

    def _call(
        self, fd: int, request: int, arg: ctypes.Structure | ctypes.c_uint32, what: str
    ) -> None:
        try:
            self._ioctl(fd, request, arg)
        except OSError as exc:
            raise AttestationFailed(
                f"Occlum's /dev/sgx refused the DCAP {what}: {exc.strerror or exc} (is the "
                "enclave built with DCAP and the host's quote provider library installed?)"
            ) from None


class TsmAttester:
    """TDX quotes or SEV-SNP reports through configfs-tsm (see `ppml.tee.tsm`). The evidence is
    the report itself (`outblob`)."""

    def __init__(self, client: TsmClient) -> None:
        self._client = client

    @property
    def tee(self) -> str:
        return self._client.tee

    def evidence(self, report_data: bytes) -> bytes:
        return self._client.report(report_data).outblob


def evidence_source(env: Mapping[str, str] = os.environ) -> Evidence:
    """The workload's way to get evidence: its own quotes inside an SGX enclave (Gramine's or,
    when the enclave's measured variables say so, Occlum's), else the launcher's evidence
    channel (sim, tdx, snp)."""
    if env.get(TEE_ENV) == "sgx":
        attester: Attester = (
            OcclumAttester() if env.get(LIBOS_ENV) == "occlum" else GramineAttester()
        )
        return lambda report_data: (attester.tee, attester.evidence(report_data))
    return request_evidence


# -- what `ppml run` checks before starting anything -------------------------------------------


def require_gramine(
    tools: tuple[str, ...] = GRAMINE_TOOLS, which: Callable[[str], str | None] = shutil.which
) -> dict[str, str]:
    """The full paths of Gramine's tools; `ConfigurationError` naming the first one missing."""
    return require_tools(tools, GRAMINE_INSTALL_HINT, which)


def require_tools(
    tools: tuple[str, ...], hint: str, which: Callable[[str], str | None] = shutil.which
) -> dict[str, str]:
    """The full paths of `tools`; `ConfigurationError` naming the first one missing."""
    found: dict[str, str] = {}
    for tool in tools:
        path = which(tool)
        if path is None:
            raise ConfigurationError(f"{tool} not found on PATH ({hint})")
        found[tool] = path
    return found


def require_occlum(
    tools: tuple[str, ...] = OCCLUM_TOOLS,
    which: Callable[[str], str | None] = shutil.which,
    home: Path | None = None,
) -> dict[str, str]:
    """The full paths of Occlum's tools once its installation is there; `ConfigurationError`
    naming the first thing missing."""
    found = require_tools(tools, OCCLUM_INSTALL_HINT, which)
    home = OCCLUM_DIR if home is None else home
    if not home.is_dir():
        raise ConfigurationError(f"{home} not present ({OCCLUM_INSTALL_HINT})")
    return found


def require_sgx_device(device: Path | None = None) -> None:
    """`ConfigurationError` unless the SGX enclave device is present."""
    device = SGX_DEVICE if device is None else device
    if not device.exists():
        raise ConfigurationError(f"{device} not present: this machine has no SGX")


def require_tsm_guest(tee: str, base: Path | None = None) -> TsmClient:
    """A report client for `tee`, once the interface is there and its provider is `tee`'s."""
    client = TsmClient(tee, base=TSM_REPORT_DIR if base is None else base)
    client.check()
    return client
