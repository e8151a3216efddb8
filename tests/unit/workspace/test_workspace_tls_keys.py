"""The TLS server and client keys are encrypted at rest: the key file alone authenticates no one."""

from __future__ import annotations

import json
import socket
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from tests.unit.workspace.conftest import PASSPHRASE

from ppml.workspace import Workspace


def _plain(ws: Workspace, path: Path) -> bytes:
    key = serialization.load_pem_private_key(path.read_bytes(), ws.tls_key_password().encode())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.mark.parametrize("field", ["server_key", "client_key"])
def test_the_keys_are_encrypted_pkcs8(shared_ws: Workspace, field: str) -> None:
    path = getattr(shared_ws, field)
    data = path.read_bytes()
    assert data.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    with pytest.raises(TypeError, match="encrypted"):
        serialization.load_pem_private_key(data, None)
    with pytest.raises(ValueError):
        serialization.load_pem_private_key(data, b"a guess")
    assert _plain(shared_ws, path).startswith(b"-----BEGIN PRIVATE KEY-----")


def test_the_client_key_file_alone_cannot_make_a_tls_client(shared_ws: Workspace) -> None:
    """What an attacker holding tls/client-key.pem (but no passphrase) would try first."""
    ctx = ssl.create_default_context(cafile=str(shared_ws.ca_cert))
    with pytest.raises(ssl.SSLError):
        ctx.load_cert_chain(shared_ws.client_cert, shared_ws.client_key, password=b"")
    with pytest.raises(ssl.SSLError):
        ctx.load_cert_chain(shared_ws.client_cert, shared_ws.client_key, password=b"password")


def test_mutual_tls_works_with_the_workspace_contexts(shared_ws: Workspace) -> None:
    server_ctx = shared_ws.server_ssl_context()
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = shared_ws.client_ssl_context()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: list[dict[str, object]] = []

    def accept() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            seen.append(tls.getpeercert() or {})
            tls.sendall(b"ok")

    thread = threading.Thread(target=accept)
    thread.start()
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        client_ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.recv(2) == b"ok"
    thread.join(10)
    listener.close()
    subject = dict(x[0] for x in seen[0]["subject"])  # type: ignore[index, misc]
    assert "client" in str(subject.get("commonName", "")).lower()


def _make_old(ws: Workspace) -> dict[str, bytes]:
    """Turn `ws` into a workspace of an older ppml: keys in the clear, no TLS key password."""
    plain = {f: _plain(ws, getattr(ws, f)) for f in ("server_key", "client_key")}
    for field, data in plain.items():
        getattr(ws, field).write_bytes(data)
    doc = json.loads(ws.secrets_path.read_text())
    del doc["secrets"]["tls-key-password"]
    ws.secrets_path.write_text(json.dumps(doc))
    return plain


def test_an_older_workspace_s_keys_are_encrypted_on_open(make_workspace) -> None:
    ws = make_workspace()
    plain = _make_old(ws)
    again = Workspace.open(ws.path, PASSPHRASE)
    for field, data in plain.items():
        path = getattr(again, field)
        assert path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        assert _plain(again, path) == data  # the same key, now encrypted
        assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert "tls-key-password" in again.secret_names()
    again.client_ssl_context()
    again.server_ssl_context()


def test_concurrent_openers_of_an_older_workspace_agree(make_workspace) -> None:
    ws = make_workspace()
    _make_old(ws)
    with ThreadPoolExecutor(max_workers=6) as pool:
        opened = list(pool.map(lambda _: Workspace.open(ws.path, PASSPHRASE), range(6)))
    passwords = {o.tls_key_password() for o in opened}
    assert len(passwords) == 1
    for o in opened:
        o.client_ssl_context()
        o.server_ssl_context()
