"""A client of the Linux configfs-tsm report interface (Linux 6.7+): TDX quotes and SEV-SNP
attestation reports from inside a confidential VM, over 64 bytes of report data.

One report takes one private entry directory under `/sys/kernel/config/tsm/report/`: write the
report data to `inblob`, read the report from `outblob` (and, for SEV-SNP, the certificate
table from `auxblob`), then remove the entry. The kernel bumps `generation` on every write to
the entry, so reading it before and after tells whether another writer interfered; the entry is
then discarded and the request retried with a fresh one.

The file operations go through `ConfigfsOps`, whose default does plain file I/O under the base
directory; the kernel gives them their side effects. Both the base directory and the operations
can be injected, so the client runs against an emulated tree in tests.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ppml.errors import AttestationFailed, ConfigurationError, UsageError

__all__ = [
    "MIN_REPORT_BYTES",
    "PROVIDERS",
    "TSM_REPORT_DIR",
    "ConfigfsOps",
    "TsmClient",
    "TsmReport",
]

TSM_REPORT_DIR = Path("/sys/kernel/config/tsm/report")
# The `provider` each TEE type's reports come from.
PROVIDERS = {"tdx": "tdx_guest", "snp": "sev_guest"}
_TEE_NAMES = {"tdx_guest": "an Intel TDX guest", "sev_guest": "an AMD SEV-SNP guest"}
_TEE_OF = {provider: tee for tee, provider in PROVIDERS.items()}
# Smallest well-formed outblob: a TDX quote's header (48) and TD report body (584); an SEV-SNP
# attestation report is 1184 bytes.
MIN_REPORT_BYTES = {"tdx": 48 + 584, "snp": 1184}
_SNP_REPORT_DATA_OFFSET = 0x50
_TDX_HEADER_BYTES = 48
_TDX_BODY_REPORT_DATA_OFFSET = 520  # after TCB SVN, MRSEAM ... MRTD, config ids, RTMR0-3
_REPORT_DATA_BYTES = 64
_MAX_BLOB = 1 << 20
_MAX_ATTR = 64
_DEFAULT_ATTEMPTS = 3

_log = logging.getLogger("ppml.tee")

_MISSING = (
    "{base} not present: not a TDX/SNP guest or configfs not mounted, "
    "or the kernel is older than 6.7"
)


class ConfigfsOps:
    """The file operations of one report; plain file I/O. The kernel's configfs gives them
    their meaning (creating a directory populates it, writing `inblob` bumps `generation`)."""

    def mkdir(self, path: Path) -> None:
        os.mkdir(path, 0o700)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def exists(self, path: Path) -> bool:
        return path.exists()

    def read(self, path: Path, limit: int) -> bytes:
        with open(path, "rb", buffering=0) as fh:
            return fh.read(limit + 1)

    def write(self, path: Path, data: bytes) -> None:
        # One write() call: configfs takes a binary attribute's value from a single write.
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            written = os.write(fd, data)
        finally:
            os.close(fd)
        if written != len(data):
            raise OSError(f"short write to {path.name}: {written} of {len(data)} bytes")


@dataclass(frozen=True, slots=True)
class TsmReport:
    """One report: its provider, the report itself, the SEV-SNP certificate table (when the
    host supplies one; empty otherwise, and always empty for TDX) and the entry's generation."""

    provider: str
    outblob: bytes
    auxblob: bytes
    generation: int

    @property
    def tee(self) -> str:
        return _TEE_OF[self.provider]


class _Skew(Exception):
    """Another writer touched the entry between our reads of `generation`."""


def _entry_name() -> str:
    return f"ppml-{os.getpid()}-{secrets.token_hex(8)}"


class TsmClient:
    """Reports for one TEE type (`tdx` or `snp`) from the configfs-tsm interface."""

    def __init__(
        self,
        tee: str,
        *,
        base: Path = TSM_REPORT_DIR,
        ops: ConfigfsOps | None = None,
        attempts: int = _DEFAULT_ATTEMPTS,
        privlevel: int | None = None,
        entry_name: Callable[[], str] = _entry_name,
    ) -> None:
        if tee not in PROVIDERS:
            raise UsageError(f"configfs-tsm serves tdx and snp reports, not {tee!r}")
        if attempts < 1:
            raise UsageError("attempts must be at least 1")
        if privlevel is not None and (tee != "snp" or not 0 <= privlevel <= 3):
            raise UsageError("privlevel is an SEV-SNP VMPL from 0 to 3")
        self.tee = tee
        self.provider = PROVIDERS[tee]
        self._base = Path(base)
        self._ops = ops or ConfigfsOps()
        self._attempts = attempts
        self._privlevel = privlevel
        self._entry_name = entry_name

    # -- checks ------------------------------------------------------------------------------

    def check_available(self) -> None:
        """Raise `ConfigurationError` naming what is missing if there is no report interface."""
        if not self._ops.exists(self._base):
            raise ConfigurationError(_MISSING.format(base=self._base))

    def check(self) -> None:
        """Check the interface is there and is this TEE's, with a throwaway entry (nothing is
        written to it, so no report is made)."""
        self.check_available()
        with self._entry() as entry:
            self._check_provider(entry)

    # -- reports -----------------------------------------------------------------------------

    def report(self, report_data: bytes) -> TsmReport:
        """A fresh report over `report_data` (64 bytes), from a private entry removed afterwards.
        Retried with a fresh entry when another writer interfered."""
        if not isinstance(report_data, bytes) or len(report_data) != _REPORT_DATA_BYTES:
            raise UsageError(f"report data must be {_REPORT_DATA_BYTES} bytes")
        self.check_available()
        for attempt in range(1, self._attempts + 1):
            try:
                with self._entry() as entry:
                    return self._report_once(entry, report_data)
            except _Skew as exc:
                _log.warning("configfs-tsm: attempt %d of %d: %s", attempt, self._attempts, exc)
        raise AttestationFailed(
            f"configfs-tsm: another writer changed the report entry during each of "
            f"{self._attempts} attempts (generation skew); no report was made"
        )

    def _report_once(self, entry: Path, report_data: bytes) -> TsmReport:
        self._check_provider(entry)
        before = self._generation(entry)
        writes = 0
        if self._privlevel is not None:
            self._write(entry / "privlevel", str(self._privlevel).encode())
            writes += 1
        self._write(entry / "inblob", report_data)
        writes += 1
        outblob = self._read_blob(entry / "outblob")
        auxblob = b""
        if self.tee == "snp" and self._ops.exists(entry / "auxblob"):
            auxblob = self._read_blob(entry / "auxblob")
        after = self._generation(entry)
        if after != before + writes:
            raise _Skew(f"generation went from {before} to {after} over {writes} write(s)")
        self._check_report(outblob, report_data)
        return TsmReport(self.provider, outblob, auxblob, after)

    def _check_report(self, outblob: bytes, report_data: bytes) -> None:
        minimum = MIN_REPORT_BYTES[self.tee]
        if len(outblob) < minimum:
            raise AttestationFailed(
                f"configfs-tsm returned a {len(outblob)}-byte report; "
                f"a {self.provider} report is at least {minimum} bytes"
            )
        offset = self._report_data_offset(outblob)
        if offset is not None and outblob[offset : offset + _REPORT_DATA_BYTES] != report_data:
            raise AttestationFailed("configfs-tsm returned a report over other report data")

    def _report_data_offset(self, outblob: bytes) -> int | None:
        if self.tee == "snp":
            return _SNP_REPORT_DATA_OFFSET
        version = int.from_bytes(outblob[0:2], "little")
        if version == 4:
            return _TDX_HEADER_BYTES + _TDX_BODY_REPORT_DATA_OFFSET
        if version == 5:  # a body type (2 bytes) and size (4 bytes) precede the body
            return _TDX_HEADER_BYTES + 6 + _TDX_BODY_REPORT_DATA_OFFSET
        return None  # another quote version: left to the verifier

    # -- the entry ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _entry(self) -> Iterator[Path]:
        entry = self._base / self._entry_name()
        try:
            self._ops.mkdir(entry)
        except FileNotFoundError:
            raise ConfigurationError(_MISSING.format(base=self._base)) from None
        except PermissionError:
            raise ConfigurationError(
                f"cannot create a report entry in {self._base}: permission denied "
                "(configfs-tsm reports need root, or write access to that directory)"
            ) from None
        except OSError as exc:
            raise ConfigurationError(
                f"cannot create a report entry in {self._base}: {exc.strerror or exc}"
            ) from None
        try:
            yield entry
        finally:
            try:
                self._ops.rmdir(entry)
            except OSError as exc:
                _log.warning("configfs-tsm: could not remove %s: %s", entry, exc.strerror or exc)

    def _check_provider(self, entry: Path) -> None:
        provider = self._read_attr(entry / "provider")
        if provider != self.provider:
            what = _TEE_NAMES.get(provider)
            hint = f": this is {what} (use --tee {_TEE_OF[provider]})" if what else ""
            raise ConfigurationError(
                f"configfs-tsm provider is {provider!r}, not {self.provider!r} "
                f"as --tee {self.tee} needs{hint}"
            )

    def _generation(self, entry: Path) -> int:
        text = self._read_attr(entry / "generation")
        if not text.isdigit():
            raise AttestationFailed(f"configfs-tsm: unreadable generation {text[:20]!r}")
        return int(text)

    def _read_attr(self, path: Path) -> str:
        data = self._read(path, _MAX_ATTR)
        return data.decode("ascii", "replace").strip()

    def _read_blob(self, path: Path) -> bytes:
        try:
            data = self._ops.read(path, _MAX_BLOB)
        except PermissionError:
            raise ConfigurationError(f"cannot read {path}: permission denied") from None
        except OSError as exc:
            # The kernel fails the read when the TEE could not make the report (for TDX, for
            # instance, when the host's quote generation service is unreachable).
            raise AttestationFailed(
                f"configfs-tsm could not produce a report ({path.name}: {exc.strerror or exc})"
            ) from None
        if len(data) > _MAX_BLOB:
            raise AttestationFailed(f"configfs-tsm: {path.name} is larger than {_MAX_BLOB} bytes")
        return data

    def _read(self, path: Path, limit: int) -> bytes:
        try:
            return self._ops.read(path, limit)[:limit]
        except PermissionError:
            raise ConfigurationError(f"cannot read {path}: permission denied") from None
        except OSError as exc:
            raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}") from None

    def _write(self, path: Path, data: bytes) -> None:
        try:
            self._ops.write(path, data)
        except PermissionError:
            raise ConfigurationError(f"cannot write {path}: permission denied") from None
        except OSError as exc:
            raise ConfigurationError(f"cannot write {path}: {exc.strerror or exc}") from None
