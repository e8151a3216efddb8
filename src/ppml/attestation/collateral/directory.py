"""The collateral directory: read it (Intel `Collateral`, `SnpCollateral`), write it atomically,
and tell whether it changed since it was read (`DirectoryState`)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from ppml._internal.fs import PRIVATE_DIR_MODE, atomic_output
from ppml.attestation.collateral.models import (
    INTEL_FILES,
    MAX_CERT_FILE,
    SNP_FILES,
    Collateral,
    SnpCollateral,
    certificates_from,
)
from ppml.errors import ConfigurationError, EvidenceError

__all__ = [
    "DirectoryState",
    "collateral_dir",
    "read_intel_dir",
    "read_snp_dir",
    "write_collateral_dir",
]


def collateral_dir(path: object) -> Path:
    """`path` as an existing directory; `EvidenceError` otherwise."""
    if not isinstance(path, str | Path):
        raise EvidenceError("collateral: must be a Collateral or a directory path")
    directory = Path(path)
    if not directory.is_dir():
        raise EvidenceError(f"collateral directory {str(directory)[:200]!r} does not exist")
    return directory


def read_intel_dir(path: str | Path) -> Collateral | None:
    """The Intel collateral of a directory, parsed; None when it holds none."""
    loaded = Collateral.from_dir(collateral_dir(path))
    return None if loaded.empty else loaded


def _cert_file(path: Path, what: str) -> list[x509.Certificate]:
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_CERT_FILE + 1)
    except OSError as exc:
        raise EvidenceError(f"{what}: cannot read {path.name} ({exc.strerror})") from None
    return certificates_from(data, f"{what} ({path.name})")


def read_snp_dir(path: str | Path) -> SnpCollateral | None:
    """The VCEK (``vcek.der`` or ``vcek.pem``) and ASK/ARK chain (``ask_ark.pem``, optional) of a
    directory; None when it holds no VCEK."""
    directory = collateral_dir(path)
    found = [directory / n for n in SNP_FILES["vcek"] if (directory / n).exists()]
    if not found:
        return None
    vcek = _cert_file(found[0], "VCEK")
    chain_file = directory / SNP_FILES["ask_ark"][0]
    chain = _cert_file(chain_file, "ASK/ARK") if chain_file.exists() else None
    return SnpCollateral.of(vcek, chain)


@dataclass(frozen=True, slots=True)
class DirectoryState:
    """What the collateral files of a directory are now: each one's name, size, mtime (ns),
    ctime (ns) and inode. Two equal states mean no collateral file was replaced or written
    in between (a write changes mtime and ctime; a rename changes the inode), provided the
    files were not written within the file system's timestamp granularity of the moment the
    state was taken: see `settled`."""

    entries: tuple[tuple[str, int, int, int, int], ...]

    def settled(self, now_ns: int, margin_ns: int = 2_000_000_000) -> bool:
        """Whether every file was last written more than `margin_ns` before `now_ns`, so that
        a later write cannot leave the same timestamps (on file systems that keep them to the
        second, or coarser)."""
        return all(e[2] < now_ns - margin_ns for e in self.entries)

    @classmethod
    def of(cls, path: str | Path) -> DirectoryState:
        directory = Path(path)
        entries = []
        for names in (*INTEL_FILES.values(), *SNP_FILES.values()):
            for name in names:
                try:
                    st = os.stat(directory / name)
                except FileNotFoundError:
                    continue
                entries.append((name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
        return cls(tuple(entries))


def write_collateral_dir(
    collateral: Collateral, dest: str | Path, *, replace: bool = False
) -> Path:
    """Write `collateral` as a collateral directory at `dest` (files 0600, directory 0700): built
    in a temporary sibling directory and renamed into place, so `dest` is either absent, the
    old directory or the complete new one. CRLs must be DER. An existing `dest` is replaced
    only when `replace` is true."""
    dest = Path(dest)
    if dest.exists() and not replace:
        raise ConfigurationError(f"collateral directory {str(dest)[:200]!r} exists already")
    parent = dest.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{dest.name}.{secrets.token_hex(6)}.tmp"
    os.mkdir(tmp, PRIVATE_DIR_MODE)
    old: Path | None = None
    try:
        os.chmod(tmp, PRIVATE_DIR_MODE)
        for field_name, names in INTEL_FILES.items():
            file_name, data = names[0], getattr(collateral, field_name)
            if data is None:
                continue
            if field_name.endswith("crl") and data.lstrip().startswith(b"-----BEGIN"):
                raise ConfigurationError(f"collateral directory: {file_name} must be DER")
            with atomic_output(tmp / file_name) as fh:
                fh.write(data)
        Collateral.from_dir(tmp)  # what a reader will load, checked before it is visible
        if dest.exists():
            old = parent / f".{dest.name}.{secrets.token_hex(6)}.old"
            os.rename(dest, old)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not dest.exists():
            with contextlib.suppress(OSError):
                os.rename(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest
