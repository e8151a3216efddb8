"""The workspace's certificates: chain, SANs, key usages, real TLS handshakes; the enclave key."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from ppml.errors import UsageError
from ppml.workspace import Workspace
from ppml.workspace.pki import normalize_hosts


def _cert(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_ca_certificate(shared_ws: Workspace) -> None:
    ca = _cert(shared_ws.ca_cert)
    assert ca.subject == ca.issuer
    ca.verify_directly_issued_by(ca)
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert 3650 <= lifetime.days <= 3653


def test_ca_key_is_encrypted_with_the_sealed_password(shared_ws: Workspace) -> None:
    pem = shared_ws.ca_key.read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" in pem
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(pem, None)
    key = serialization.load_pem_private_key(pem, shared_ws.secret("ca-key-password").encode())
    assert key.public_key() == _cert(shared_ws.ca_cert).public_key()


@pytest.mark.parametrize(
    ("kind", "usage"),
    [("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)],
)
def test_leaf_certificates(shared_ws: Workspace, extra_hosts, kind: str, usage) -> None:
    ca = _cert(shared_ws.ca_cert)
    cert = _cert(getattr(shared_ws, f"{kind}_cert"))
    cert.verify_directly_issued_by(ca)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [usage]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(san.get_values_for_type(x509.DNSName))
    ips = set(san.get_values_for_type(x509.IPAddress))
    assert dns == {"localhost", "ppml.example.org"}
    assert ips == {ipaddress.ip_address(h) for h in ("127.0.0.1", "::1", "10.1.2.3", "2001:db8::7")}
    assert 729 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 732
    key = serialization.load_pem_private_key(
        getattr(shared_ws, f"{kind}_key").read_bytes(), shared_ws.tls_key_password().encode()
    )
    assert key.public_key() == cert.public_key()
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"


@contextmanager
def _tls_server(ctx: ssl.SSLContext) -> Iterator[tuple[int, dict[str, object]]]:
    """Accept one TLS connection on loopback, echo one message, record what happened."""
    result: dict[str, object] = {}
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(10)
            with ctx.wrap_socket(conn, server_side=True) as tls:
                result["peer"] = tls.getpeercert()
                tls.sendall(tls.recv(100))
        except (OSError, ssl.SSLError) as exc:
            result["error"] = exc

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], result
    finally:
        thread.join(timeout=10)
        listener.close()
    assert not thread.is_alive()


def _server_context(ws: Workspace, *, mutual: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(ws.server_cert, ws.server_key, password=ws.tls_key_password())
    if mutual:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=ws.ca_cert)
    return ctx


def _client_context(ws: Workspace, *, with_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ws.ca_cert))
    if with_cert:
        ctx.load_cert_chain(ws.client_cert, ws.client_key, password=ws.tls_key_password())
    return ctx


def _exchange(
    server: ssl.SSLContext, client: ssl.SSLContext, server_name: str
) -> tuple[bytes, dict[str, object]]:
    """One TLS connection over loopback: send a message, return the echo and the server's view."""
    with (
        _tls_server(server) as (port, result),
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        client.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        tls.sendall(b"ping")
        return tls.recv(100), result


@pytest.mark.parametrize("server_name", ["localhost", "127.0.0.1", "ppml.example.org"])
def test_tls_handshake(shared_ws: Workspace, server_name: str) -> None:
    server = _server_context(shared_ws, mutual=False)
    client = _client_context(shared_ws, with_cert=False)
    reply, result = _exchange(server, client, server_name)
    assert reply == b"ping"
    assert "error" not in result


def test_tls_rejects_an_unlisted_name(shared_ws: Workspace) -> None:
    server = _server_context(shared_ws, mutual=False)
    client = _client_context(shared_ws, with_cert=False)
    with pytest.raises(ssl.SSLCertVerificationError):
        _exchange(server, client, "other.example.com")


def test_mutual_tls_handshake(shared_ws: Workspace) -> None:
    server = _server_context(shared_ws, mutual=True)
    client = _client_context(shared_ws, with_cert=True)
    reply, result = _exchange(server, client, "localhost")
    assert reply == b"ping"
    assert "error" not in result
    peer = result["peer"]
    assert isinstance(peer, dict)
    assert (("commonName", "ppml client"),) in peer["subject"]


def test_mutual_tls_refuses_a_client_without_certificate(shared_ws: Workspace) -> None:
    server = _server_context(shared_ws, mutual=True)
    client = _client_context(shared_ws, with_cert=False)
    with pytest.raises((ssl.SSLError, OSError)):
        _exchange(server, client, "localhost")


def test_enclave_signing_key(shared_ws: Workspace) -> None:
    key = serialization.load_pem_private_key(shared_ws.enclave_key_path.read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == 3072
    assert key.public_key().public_numbers().e == 3
    facts = shared_ws.describe()["enclave_signing_key"]
    assert facts["algorithm"] == "RSA-3072" and facts["public_exponent"] == 3
    assert len(facts["mrsigner"]) == 64


@pytest.mark.parametrize(
    "host",
    [
        "",
        " host",
        "host name",
        "-bad.example",
        "bad-.example",
        "a..b",
        "under_score.example",
        "999.1.1.1",
        "fe80::1%eth0",
        "x" * 64 + ".example",
        "bücher.example",
        "*.example.com",
        "http://example.com",
    ],
)
def test_invalid_host_rejected(tmp_path, kdf, passphrase: bytes, host: str) -> None:
    with pytest.raises(UsageError, match="invalid host"):
        Workspace.create(tmp_path / "ws", passphrase, hosts=[host], kdf=kdf)
    assert not (tmp_path / "ws").exists()


def test_hosts_given_as_one_string_rejected(tmp_path, kdf, passphrase: bytes) -> None:
    with pytest.raises(UsageError):
        Workspace.create(tmp_path / "ws", passphrase, hosts="example.com", kdf=kdf)


def test_hosts_are_normalized() -> None:
    assert normalize_hosts(["Example.COM", "example.com", "localhost", "::1", "[2001:db8::1]"]) == (
        "example.com",
        "2001:db8::1",
    )
