"""The services of one workspace, composed: KMS, key broker, attestation service, TLS files.

`ppml serve` exposes them over HTTPS; `ppml run` serves them on loopback for the workload it
launches. Both build them here, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ppml.attestation import AttestationService, TeeType, TokenVerifier, Verifier
from ppml.attestation.collateral.sources import CollateralSource, collateral_source
from ppml.attestation.hardware_verifier import hardware_verifiers
from ppml.kms.broker import KeyBroker
from ppml.server.app import Services
from ppml.server.tls import TlsFiles
from ppml.server.tokens import CachedTokenVerifier
from ppml.workspace import Workspace

__all__ = ["services_for", "tls_files_for"]


def services_for(
    ws: Workspace,
    *,
    actor: str = "local",
    verifiers: Mapping[TeeType, Verifier] | None = None,
    refusal_audit_window_s: float = 10.0,
) -> Services:
    """The attestation service, the key broker and the KMS of `ws`. Sim evidence is accepted
    only in a development workspace (`ppml init --dev`). Hardware evidence is verified by
    `verifiers` when given, else as the workspace's ``[attestation]`` settings say: SGX and TDX
    quotes against the pinned Intel root, SEV-SNP reports with the VCEK of the collateral
    directory. Refusals of calls that no token authenticates are audited once per
    `refusal_audit_window_s` per client address, operation and reason, with a count of the
    others (`KeyBroker.authenticate`)."""
    settings = ws.config.attestation
    if verifiers is None:
        collateral = settings.collateral
        if collateral is not None and not Path(collateral).is_absolute():
            collateral = str(ws.path / collateral)  # relative to the workspace
        verifiers = hardware_verifiers(
            tuple(TeeType(t) for t in settings.tee_types),
            collateral=collateral,
            allow_outdated=settings.allow_outdated,
            source=_collateral_source(ws),
        )
    keys = ws.key_service(actor=actor)
    token_key = ws.token_signing_key()
    verifier = CachedTokenVerifier(TokenVerifier(token_key.public_key()).verify)
    broker = KeyBroker(keys, verifier, allow_sim=ws.dev, refusal_window_s=refusal_audit_window_s)
    attestation = AttestationService.for_keys(
        token_key,
        ws.sim_platform_key().public_key() if ws.dev else None,
        allow_sim=ws.dev,
        appraise=broker.matching_keys,
        verifiers=verifiers,
    )
    admin = x509.load_pem_x509_certificate(ws.client_cert.read_bytes())
    return Services(
        attestation=attestation,
        broker=broker,
        keys=keys,
        admin_certificates=(admin.public_bytes(serialization.Encoding.DER),),
    )


def _collateral_source(ws: Workspace) -> CollateralSource | None:
    """What the ``[attestation]`` settings say to fetch per piece of evidence, cached under
    ``<workspace>/attestation/cache`` (private)."""
    settings = ws.config.attestation
    fetch_ca = None
    if settings.fetch_ca is not None:
        ca = Path(settings.fetch_ca)
        fetch_ca = ca if ca.is_absolute() else ws.path / ca
    return collateral_source(
        pccs_url=settings.pccs_url,
        kds_url=settings.kds_url,
        fetch_ca=fetch_ca,
        cache_dir=ws.path / "attestation" / "cache",
    )


def tls_files_for(ws: Workspace) -> TlsFiles:
    return TlsFiles(
        cert=ws.server_cert, key=ws.server_key, ca=ws.ca_cert, password=ws.tls_key_password()
    )
