"""HTTPS for every ppml service (`ppml serve`, the serving front end), with uvicorn.

TLS uses the workspace's server certificate (its key encrypted at rest, opened with the
password given in `TlsFiles`); client certificates are optional at the handshake (workloads
use tokens, health probes use nothing) but, when presented, must chain to the workspace CA.
uvicorn does not pass the peer certificate to the application, so a small protocol subclass
(over httptools when installed, else h11) puts the verified peer certificate (DER) into each
request's scope, where the boundary (`ppml.server.boundary`) authenticates it.
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
from ppml.server.boundary import PEER_CERT_EXTENSION

__all__ = ["ServerHandle", "TlsFiles", "run_https", "serve_forever", "serving"]

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


def _peer_cert_protocol(base: type) -> type:
    """`base` (a uvicorn HTTP protocol) putting the verified client certificate (DER, only when
    meant for client authentication) into each request's scope."""

    class PeerCertProtocol(base):  # type: ignore[misc]
        app: Any

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            ssl_object = transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            peer = _client_auth_cert(der)
            inner = self.app

            async def app(scope: Any, receive: Any, send: Any) -> None:
                scope["extensions"] = {**(scope.get("extensions") or {}), PEER_CERT_EXTENSION: peer}
                await inner(scope, receive, send)

            self.app = app

    PeerCertProtocol.__name__ = f"PeerCert{base.__name__}"
    return PeerCertProtocol


def _http_protocol() -> type:
    """The fastest HTTP/1.1 protocol installed (httptools, else h11), with peer certificates."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools is optional (the `serving` extra has it)
        return _peer_cert_protocol(H11Protocol)
    return _peer_cert_protocol(HttpToolsProtocol)


def _config(
    app: Any, tls: TlsFiles, host: str | None, port: int | None, log_level: str
) -> uvicorn.Config:
    for p in (tls.cert, tls.key, tls.ca):
        if not p.is_file():
            raise ConfigurationError("TLS file missing", path=p)
    return uvicorn.Config(
        app,
        host=host or "127.0.0.1",
        port=port or 0,
        http=_http_protocol(),
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


def run_https(
    app: Any,
    tls: TlsFiles,
    *,
    sock: socket.socket | None = None,
    host: str | None = None,
    port: int | None = None,
    log_level: str = "warning",
) -> None:
    """Serve `app` over HTTPS until SIGINT or SIGTERM: on the listening `sock`, else on
    `host`:`port`. Client certificates are optional at the handshake and, when presented,
    verified against `tls.ca` (the boundary decides which routes need one)."""
    server = uvicorn.Server(_config(app, tls, host, port, log_level))
    server.run(sockets=[sock] if sock is not None else None)


def serve_forever(
    app: Any, tls: TlsFiles, *, host: str, port: int, log_level: str = "info"
) -> None:
    """Run the server in the foreground until interrupted (`ppml serve`)."""
    run_https(app, tls, host=host, port=port, log_level=log_level)


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
