"""File modes of a workspace, and its sealed secrets: never in plaintext, bound to their names."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from ppml.errors import IntegrityError, KeyAccessError, SecretNotFound, UsageError
from ppml.workspace import Workspace

EXPECTED_MODES = {
    "config.toml": 0o644,
    "master-key.sealed": 0o600,
    "secrets.sealed.json": 0o600,
    "enclave-signing-key.pem": 0o600,
    "tls": 0o700,
    "tls/ca.pem": 0o644,
    "tls/ca-key.pem": 0o600,
    "tls/server.pem": 0o644,
    "tls/server-key.pem": 0o600,
    "tls/client.pem": 0o644,
    "tls/client-key.pem": 0o600,
    "tls/keystore.p12": 0o600,
    "tls/truststore.p12": 0o644,
}


def test_every_file_has_the_expected_mode(shared_ws: Workspace) -> None:
    root = shared_ws.path
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    found = {str(p.relative_to(root)): stat.S_IMODE(os.stat(p).st_mode) for p in root.rglob("*")}
    assert found == EXPECTED_MODES


def test_modes_do_not_depend_on_the_umask(tmp_path: Path, make_workspace) -> None:
    old = os.umask(0o077)
    try:
        ws = make_workspace()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(ws.ca_cert).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(ws.server_key).st_mode) == 0o600


def test_no_secret_appears_in_plaintext(shared_ws: Workspace) -> None:
    values = [shared_ws.secret(n) for n in shared_ws.secret_names()]
    values.append(shared_ws._master_key.hex())
    needles = [v.encode() for v in values]
    needles += [base64.b64encode(v.encode()) for v in values]
    needles.append(shared_ws._master_key)
    assert len(values) == 5
    for path in shared_ws.path.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for needle in needles:
                assert needle not in data, f"a secret is readable in {path}"


def test_initial_secrets(shared_ws: Workspace) -> None:
    assert shared_ws.secret_names() == [
        "ca-key-password",
        "keystore-password",
        "spark-auth-secret",
        "tls-key-password",
    ]
    spark = shared_ws.secret("spark-auth-secret")
    assert len(bytes.fromhex(spark)) == 32
    assert len(shared_ws.secret("keystore-password")) >= 32
    assert shared_ws.secret("keystore-password") != shared_ws.secret("ca-key-password")


def test_set_and_get_secret_persists(make_workspace, passphrase: bytes) -> None:
    ws = make_workspace()
    ws.set_secret("serving-queue-password", "s3cret-value")
    assert ws.secret("serving-queue-password") == "s3cret-value"
    again = Workspace.open(ws.path, passphrase)
    assert again.secret("serving-queue-password") == "s3cret-value"
    assert "serving-queue-password" in again.secret_names()
    ws.set_secret("serving-queue-password", "replaced")
    assert again.secret("serving-queue-password") == "replaced"
    assert stat.S_IMODE(os.stat(ws.secrets_path).st_mode) == 0o600
    assert b"replaced" not in ws.secrets_path.read_bytes()


def test_unknown_secret_lists_the_known_names(shared_ws: Workspace) -> None:
    with pytest.raises(SecretNotFound) as info:
        shared_ws.secret("no-such-secret")
    assert isinstance(info.value, KeyAccessError)
    message = str(info.value)
    assert "no-such-secret" in message
    for name in shared_ws.secret_names():
        assert name in message
        assert shared_ws.secret(name) not in message


@pytest.mark.parametrize("name", ["", "UPPER", "-dash", "a b", "x" * 65, "../etc"])
def test_invalid_secret_name(make_workspace, name: str) -> None:
    ws = make_workspace()
    with pytest.raises(UsageError, match="invalid secret name"):
        ws.set_secret(name, "value")


def test_empty_secret_value_refused(make_workspace) -> None:
    ws = make_workspace()
    with pytest.raises(UsageError):
        ws.set_secret("empty", "")


def test_secrets_are_bound_to_their_names(make_workspace) -> None:
    ws = make_workspace()
    doc = json.loads(ws.secrets_path.read_bytes())
    entries = doc["secrets"]
    entries["ca-key-password"], entries["keystore-password"] = (
        entries["keystore-password"],
        entries["ca-key-password"],
    )
    ws.secrets_path.write_text(json.dumps(doc))
    with pytest.raises(IntegrityError) as info:
        ws.secret("keystore-password")
    assert "integrity check failed" in str(info.value)


def test_secrets_are_bound_to_the_master_key(make_workspace, passphrase: bytes) -> None:
    a = make_workspace("a")
    b = make_workspace("b")
    b.secrets_path.write_bytes(a.secrets_path.read_bytes())
    with pytest.raises(IntegrityError):
        Workspace.open(b.path, passphrase).secret("spark-auth-secret")
