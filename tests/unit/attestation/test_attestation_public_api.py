"""The public surface of ppml.attestation: every exported name exists, once."""

from __future__ import annotations

import importlib

import pytest

MODULES = [
    "ppml.attestation",
    "ppml.attestation.challenge",
    "ppml.attestation.claims",
    "ppml.attestation.evidence",
    "ppml.attestation.hardware_verifier",
    "ppml.attestation.service",
    "ppml.attestation.sim",
    "ppml.attestation.token",
    "ppml.attestation.verifier",
]


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist_and_are_unique(name: str) -> None:
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert len(exported) == len(set(exported))
    assert [n for n in exported if not hasattr(module, n)] == []
    assert module.__doc__


def test_package_reexports_the_main_api() -> None:
    package = importlib.import_module("ppml.attestation")
    for name in ("AttestationService", "TokenVerifier", "SimVerifier", "Verifier", "TeeType"):
        assert name in package.__all__
    for name in ("verify_evidence", "EvidenceVerification", "SgxVerifier", "TdxVerifier",
                 "SnpVerifier"):  # fmt: skip
        assert name in package.__all__
        assert getattr(package, name).__module__ in (
            "ppml.attestation.evidence",
            "ppml.attestation.hardware_verifier",
        )
