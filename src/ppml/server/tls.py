"""Serving the API over TLS with uvicorn, with the client certificate visible to the routes.

TLS uses the workspace's server certificate; client certificates are optional at the handshake
(workloads use tokens) but, when presented, must chain to the workspace CA. uvicorn does not pass
the peer certificate to the application, so a small protocol subclass puts the verified peer
certificate (DER) into each request's scope, where the administrator routes look for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from cryptography import x509
from uvicorn.protocols.http.h11_impl import H11Protocol

from ppml.errors import ConfigurationError
from ppml.server.app import PEER_CERT_EXTENSION

__all__ = ["ServerHandle", "TlsFiles", "serve_forever", "serving"]

_log = logging.getLogger("ppml.server")


@dataclass(frozen=True)
class TlsFiles:
    """The server's certificate, its key (encrypted PKCS#8 PEM under `password`) and the CA
    that client certificates must chain to."""

    cert: Path
    key: Path
    ca: Path
    password: str | None = field(default=None, repr=False)


def _client_auth_cert(der: bytes | None) -> bytes | None:
    """The peer certificate when it is meant for client authentication (EKU clientAuth)."""
    if not der:
        return None
    try:
        cert = x509.load_der_x509_certificate(der)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    return der if x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in eku else None


class _PeerCertProtocol(H11Protocol):
    """h11 protocol that exposes the verified client certificate to the ASGI app."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        peer = _client_auth_cert(der)
        inner = self.app

        async def app(scope: Any, receive: Any, send: Any) -> None:
            scope["extensions"] = {**(scope.get("extensions") or {}), PEER_CERT_EXTENSION: peer}
            await inner(scope, receive, send)

        self.app = app


def _config(app: Any, tls: TlsFiles, host: str, port: int, log_level: str) -> uvicorn.Config:
    for p in (tls.cert, tls.key, tls.ca):
        if not p.is_file():
            raise ConfigurationError("TLS file missing", path=p)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=_PeerCertProtocol,
        ssl_certfile=str(tls.cert),
        ssl_keyfile=str(tls.key),
        ssl_keyfile_password=tls.password,
        ssl_ca_certs=str(tls.ca),
        ssl_cert_reqs=ssl.CERT_OPTIONAL,
        log_level=log_level,
        access_log=False,
        server_header=False,
        lifespan="off",
        timeout_keep_alive=30,
    )


def serve_forever(
    app: Any, tls: TlsFiles, *, host: str, port: int, log_level: str = "info"
) -> None:
    """Run the server in the foreground until interrupted (`ppml serve`)."""
    uvicorn.Server(_config(app, tls, host, port, log_level)).run()


@dataclass
class ServerHandle:
    url: str
    port: int


@contextlib.contextmanager
def serving(app: Any, tls: TlsFiles, *, host: str = "127.0.0.1") -> Iterator[ServerHandle]:
    """Run the server in a background thread on an ephemeral loopback port for the block."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(_config(app, tls, host, port, "warning"))
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="ppml-server", daemon=True
    )
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise ConfigurationError("the embedded server failed to start")
            threading.Event().wait(0.01)
        yield ServerHandle(url=f"https://{host}:{port}", port=port)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
