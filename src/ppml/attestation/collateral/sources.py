"""Where a hardware verifier gets collateral for one piece of evidence, behind one protocol.

`CollateralSource` answers ``intel(evidence, at)`` (PCS collateral for a quote) and
``snp(evidence, at)`` (the VCEK of a report), None when it has none. `DirectorySource` reads a
collateral directory and keeps what it read until a file changes; `RemoteSource` fetches from a
PCCS / Intel PCS and AMD KDS (`ppml.attestation.collateral.fetch`); `FirstOf` asks sources in
order. `collateral_source` builds the one a configuration names (the CLI, the workspace).
"""

from __future__ import annotations

import datetime as _dt
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

from ppml.attestation.collateral.directory import (
    DirectoryState,
    collateral_dir,
    read_intel_dir,
    read_snp_dir,
)
from ppml.attestation.collateral.fetch import AmdKdsSource, IntelCollateralSource, snp_product
from ppml.attestation.collateral.models import Collateral, SnpCollateral
from ppml.errors import ConfigurationError, EvidenceError

__all__ = [
    "CollateralSource",
    "DirectorySource",
    "FirstOf",
    "RemoteSource",
    "collateral_source",
]


_T = TypeVar("_T")


@runtime_checkable
class CollateralSource(Protocol):
    """Collateral for one piece of evidence, verified at time `at`; None when there is none.
    Raises `EvidenceError` when what it holds is malformed, `ConfigurationError` when a server
    cannot be reached."""

    def intel(self, evidence: bytes, at: _dt.datetime) -> Collateral | None: ...

    def snp(self, evidence: bytes, at: _dt.datetime) -> SnpCollateral | None: ...


class DirectorySource:
    """A collateral directory. Each kind (Intel, SEV-SNP) is read when first asked for and
    again only when one of the directory's collateral files changed (`DirectoryState`; files
    written in the last two seconds are read every time), not for every piece of evidence.
    ``reads`` counts the reads."""

    def __init__(self, path: str | Path) -> None:
        self.path = collateral_dir(path)
        self._lock = threading.Lock()
        self._intel: tuple[DirectoryState | None, Collateral | None] = (None, None)
        self._snp: tuple[DirectoryState | None, SnpCollateral | None] = (None, None)
        self.reads = 0

    def _read(
        self,
        slot: tuple[DirectoryState | None, _T],
        reader: Callable[[Path], _T],
    ) -> tuple[DirectoryState | None, _T]:
        """`slot` as it is, or read again when a file changed since it was read."""
        state = DirectoryState.of(self.path)
        if state == slot[0]:
            return slot
        found = reader(self.path)
        self.reads += 1
        # A file that changed while it was read, or was written so recently that a change
        # could keep its timestamps, is read again next time.
        unchanged = DirectoryState.of(self.path) == state
        return (state if unchanged and state.settled(time.time_ns()) else None), found

    def intel(self, evidence: bytes, at: _dt.datetime) -> Collateral | None:
        with self._lock:
            self._intel = self._read(self._intel, read_intel_dir)
            return self._intel[1]

    def snp(self, evidence: bytes, at: _dt.datetime) -> SnpCollateral | None:
        with self._lock:
            self._snp = self._read(self._snp, read_snp_dir)
            return self._snp[1]


class RemoteSource:
    """Fetches (and caches on disk) Intel collateral from a PCCS or Intel PCS and SEV-SNP
    VCEKs (and ASK/ARK) from AMD KDS. Either may be None: that kind of evidence then has no
    collateral from here."""

    def __init__(self, intel: IntelCollateralSource | None, amd: AmdKdsSource | None) -> None:
        self._intel = intel
        self._amd = amd
        self._product: str | None = None

    @property
    def has_amd(self) -> bool:
        return self._amd is not None

    def with_product(self, product: str | None) -> RemoteSource:
        """The SEV-SNP product to ask KDS for (default: from the report's CPUID)."""
        self._product = product
        return self

    def intel(self, evidence: bytes, at: _dt.datetime) -> Collateral | None:
        return None if self._intel is None else self._intel.fetch_for(evidence, at=at)

    def snp(self, evidence: bytes, at: _dt.datetime) -> SnpCollateral | None:
        if self._amd is None:
            return None
        product = snp_product(evidence, self._product)
        vcek, ask_ark = self._amd.fetch_for(evidence, product, at=at)
        return SnpCollateral.of(vcek, ask_ark)


class FirstOf:
    """Asks `sources` in order; the first answer that is not None wins."""

    def __init__(self, *sources: CollateralSource) -> None:
        self.sources = sources

    @property
    def has_amd(self) -> bool:
        return any(getattr(s, "has_amd", False) for s in self.sources)

    def intel(self, evidence: bytes, at: _dt.datetime) -> Collateral | None:
        for source in self.sources:
            found = source.intel(evidence, at)
            if found is not None:
                return found
        return None

    def snp(self, evidence: bytes, at: _dt.datetime) -> SnpCollateral | None:
        for source in self.sources:
            found = source.snp(evidence, at)
            if found is not None:
                return found
        return None


def collateral_source(
    *,
    directory: str | Path | None = None,
    pccs_url: str | None = None,
    kds_url: str | None = None,
    fetch_ca: str | os.PathLike[str] | None = None,
    cache_dir: str | Path | None = None,
    product: str | None = None,
) -> CollateralSource | None:
    """The source a configuration names: the collateral `directory` first, then what
    `pccs_url` / `kds_url` serve (TLS checked with `fetch_ca`, or the system's CAs; fetched
    documents kept in `cache_dir`); None when it names none."""
    sources: list[CollateralSource] = []
    if directory is not None:
        try:
            sources.append(DirectorySource(directory))
        except EvidenceError as exc:
            raise ConfigurationError(f"collateral: {exc}") from None
    if pccs_url is not None or kds_url is not None:
        verify: bool | str = str(fetch_ca) if fetch_ca is not None else True
        intel = amd = None
        if pccs_url is not None:
            intel = IntelCollateralSource(pccs_url, cache_dir=cache_dir, verify=verify)
        if kds_url is not None:
            amd = AmdKdsSource(kds_url, cache_dir=cache_dir, verify=verify)
        sources.append(RemoteSource(intel, amd).with_product(product))
    if not sources:
        return None
    return sources[0] if len(sources) == 1 else FirstOf(*sources)
