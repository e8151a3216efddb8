"""Collateral: what a verifier needs besides the evidence (Intel PCS documents and CRLs, AMD
VCEKs and their chains), as typed values (`Collateral`, `SnpCollateral`), the directory they are
kept in, and the sources a verifier asks for them (`CollateralSource`)."""

from __future__ import annotations

from ppml.attestation.collateral.directory import (
    DirectoryState,
    read_intel_dir,
    read_snp_dir,
    write_collateral_dir,
)
from ppml.attestation.collateral.models import Collateral, SnpCollateral
from ppml.attestation.collateral.sources import (
    CollateralSource,
    DirectorySource,
    FirstOf,
    RemoteSource,
    collateral_source,
)

__all__ = [
    "Collateral",
    "CollateralSource",
    "DirectorySource",
    "DirectoryState",
    "FirstOf",
    "RemoteSource",
    "SnpCollateral",
    "collateral_source",
    "read_intel_dir",
    "read_snp_dir",
    "write_collateral_dir",
]
