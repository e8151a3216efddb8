"""The attester side of a hardware TEE: evidence, and the checks `ppml run` makes before
starting anything on one.

An `Attester` turns 64 bytes of report data into evidence of one TEE type. Inside a Gramine-SGX
enclave the workload is its own attester (`GramineAttester`, through Gramine's
`/dev/attestation` pseudo-files); in a TDX or SEV-SNP confidential VM the launcher produces
reports through configfs-tsm (`TsmAttester`) and hands them to the workload over the evidence
channel, exactly as for the sim backend. `evidence_source` picks the workload's side.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from ppml.errors import AttestationFailed, ConfigurationError, UsageError
from ppml.tee.channel import request_evidence
from ppml.tee.tsm import TSM_REPORT_DIR, TsmClient
from ppml.tee.workload_env import TEE_ENV, Evidence

__all__ = [
    "ATTESTATION_DIR",
    "GRAMINE_INSTALL_HINT",
    "GRAMINE_TOOLS",
    "SGX_DEVICE",
    "Attester",
    "GramineAttester",
    "TsmAttester",
    "evidence_source",
    "require_gramine",
    "require_sgx_device",
    "require_tsm_guest",
]

SGX_DEVICE = Path("/dev/sgx_enclave")
ATTESTATION_DIR = Path("/dev/attestation")
GRAMINE_TOOLS = ("gramine-manifest", "gramine-sgx-sign", "gramine-sgx")
GRAMINE_INSTALL_HINT = "install Gramine: https://gramine.readthedocs.io/en/stable/installation.html"
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
        if len(quote) < _SGX_MIN_QUOTE:
            raise AttestationFailed(f"Gramine returned a {len(quote)}-byte quote: too short")
        bound = quote[_SGX_REPORT_DATA_OFFSET : _SGX_REPORT_DATA_OFFSET + _REPORT_DATA_BYTES]
        if bound != report_data:
            raise AttestationFailed("Gramine returned a quote over other report data")
        return quote

    def _read(self, name: str, limit: int) -> bytes:
        try:
            with open(self._root / name, "rb") as fh:
                return fh.read(limit)
        except OSError as exc:
            raise AttestationFailed(
                f"cannot read Gramine's {name}: {exc.strerror or exc}"
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
    """The workload's way to get evidence: its own quotes inside Gramine-SGX, else the
    launcher's evidence channel (sim, tdx, snp)."""
    if env.get(TEE_ENV) == "sgx":
        attester = GramineAttester()
        return lambda report_data: (attester.tee, attester.evidence(report_data))
    return request_evidence


# -- what `ppml run` checks before starting anything -------------------------------------------


def require_gramine(
    tools: tuple[str, ...] = GRAMINE_TOOLS, which: Callable[[str], str | None] = shutil.which
) -> dict[str, str]:
    """The full paths of Gramine's tools; `ConfigurationError` naming the first one missing."""
    found: dict[str, str] = {}
    for tool in tools:
        path = which(tool)
        if path is None:
            raise ConfigurationError(f"{tool} not found on PATH ({GRAMINE_INSTALL_HINT})")
        found[tool] = path
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
