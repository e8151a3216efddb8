"""The service keys a workspace makes on first use: token signing key and sim platform key."""

from __future__ import annotations

import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from ppml.crypto.passphrase import KdfParams
from ppml.workspace import Workspace

PASSPHRASE = b"service keys"


def test_service_keys_are_made_once_encrypted_and_private(tmp_path: Path) -> None:
    ws = Workspace.create(tmp_path / "ws", PASSPHRASE, kdf=KdfParams.for_testing())
    token_key = ws.token_signing_key()
    sim_key = ws.sim_platform_key()
    assert isinstance(token_key, ec.EllipticCurvePrivateKey)
    assert isinstance(token_key.curve, ec.SECP256R1)
    assert isinstance(sim_key, ed25519.Ed25519PrivateKey)
    again = Workspace.open(ws.path, PASSPHRASE)
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    pem = serialization.Encoding.PEM
    assert again.token_signing_key().public_key().public_bytes(
        pem, raw
    ) == token_key.public_key().public_bytes(pem, raw)
    assert again.sim_platform_key().public_key().public_bytes(
        pem, raw
    ) == sim_key.public_key().public_bytes(pem, raw)
    for name in ("attestation-token-key.pem", "sim-platform-key.pem"):
        path = ws.path / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert b"ENCRYPTED PRIVATE KEY" in path.read_bytes()
    assert "service-keys-password" in ws.secret_names()
