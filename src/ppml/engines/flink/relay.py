"""How a Flink job's operators get data keys: a key relay run by the job's client.

Flink runs a job's Python operators inside TaskManagers (or the mini-cluster's JVM) that hold no
workspace and no passphrase, and are not the attested process. The process that submits the job
holds the key provider (the workspace's KMS for ``ppml flink run``, the attested key provider
under ``--tee``) and serves it to the job's operators while the job runs:

- over HTTPS (TLS 1.3) with a certificate made for this run and never stored; an operator trusts
  exactly that certificate (pinned, it travels with the job), nothing else;
- each request carries a 256-bit token made for this run; without it the relay answers 401;
- it answers two questions, as a `DataKeyProvider` does: a fresh data key of a named key, and the
  plaintext of a wrapped data key. What the client's provider refuses (the KMS's release policy
  under ``--tee``), the relay refuses.

The relay's address, certificate and token (a `RelayTicket`) reach the job through a 0600 file
named by ``$PPML_FLINK_RELAY``; the job's operators carry the ticket (inside Flink's job graph,
which travels over the cluster's mutual TLS). Never in argv, the environment, job parameters or
logs: a ticket's repr hides the token.
"""

from __future__ import annotations

import base64
import datetime as dt
import hmac
import http.client
import http.server
import ipaddress
import json
import logging
import os
import secrets
import ssl
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ppml._internal.fs import memory_files, write_private
from ppml.crypto.envelope import DataKey, DataKeyProvider, WrappedKey
from ppml.errors import (
    AccessDenied,
    ConfigurationError,
    IntegrityError,
    KeyAccessError,
    KeyNotFound,
    PPMLError,
)

__all__ = [
    "RELAY_ENV",
    "KeyRelay",
    "RelayKeys",
    "RelayTicket",
    "check_key",
    "one_line_errors",
    "ticket_from_environment",
]

RELAY_ENV = "PPML_FLINK_RELAY"
_MAX_BODY = 16 * 1024
_TIMEOUT = 30.0
_log = logging.getLogger("ppml.flink")


@dataclass(frozen=True, slots=True)
class RelayTicket:
    """What an operator needs to reach the relay: its address, its certificate, the token."""

    host: str
    port: int
    cert_pem: str
    token: str = field(repr=False)

    def to_json(self) -> str:
        return json.dumps(
            {"host": self.host, "port": self.port, "cert": self.cert_pem, "token": self.token}
        )

    @classmethod
    def from_json(cls, text: str) -> RelayTicket:
        try:
            raw = json.loads(text)
            return cls(str(raw["host"]), int(raw["port"]), str(raw["cert"]), str(raw["token"]))
        except (ValueError, KeyError, TypeError):
            raise ConfigurationError("the key relay's ticket is damaged") from None

    def provider(self) -> RelayKeys:
        return RelayKeys(self)


def ticket_from_environment(env: Mapping[str, str] = os.environ) -> RelayTicket:
    """The ticket `ppml flink run` left for this job (``$PPML_FLINK_RELAY``)."""
    path = env.get(RELAY_ENV)
    if not path:
        raise ConfigurationError(
            "no keys for this Flink job: run it with `ppml flink run` (which serves the keys "
            "to its operators)"
        )
    try:
        return RelayTicket.from_json(Path(path).read_text())
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read the key relay's ticket: {exc.strerror}", path=path
        ) from None


def check_key(ticket: RelayTicket, key: str) -> None:
    """Fail while a job is being built, not after it started, when its operators could not
    have `key` (`KeyNotFound` naming it, `AccessDenied`): one data key asked for and dropped."""
    keys = ticket.provider()
    try:
        keys.generate_data_key(key)
    finally:
        keys.close()


def one_line_errors(
    kind: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    """``sys.excepthook`` for a job's client: an uncaught ppml error (a missing key, a refused
    one) as one line, as the `ppml` commands print theirs; anything else as Python prints it."""
    if isinstance(exc, PPMLError):
        sys.stderr.write(f"ppml: {exc.diagnostics()}\n")
        sys.stderr.flush()
        return
    sys.__excepthook__(kind, exc, tb)


class RelayKeys:
    """A `DataKeyProvider` in an operator: asks the relay; keeps unwrapped keys in memory."""

    def __init__(self, ticket: RelayTicket) -> None:
        self._ticket = ticket
        self._context = ssl.create_default_context(cadata=ticket.cert_pem)
        self._context.minimum_version = ssl.TLSVersion.TLSv1_3
        self._keys: dict[WrappedKey, bytes] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RelayKeys({self._ticket.host}:{self._ticket.port})"

    def generate_data_key(self, key_name: str) -> DataKey:
        missing = f"no such key {key_name!r}: create it with `ppml key create {key_name}`"
        reply = self._ask("/datakey", {"key": key_name}, missing)
        wrapped = WrappedKey.from_text(str(reply["wrapped"]))
        return DataKey(base64.b64decode(reply["plaintext"]), wrapped)

    def unwrap(self, wrapped: WrappedKey) -> bytes:
        with self._lock:
            known = self._keys.get(wrapped)
        if known is not None:
            return known
        missing = f"no such key {wrapped.key_name!r} (version {wrapped.version})"
        reply = self._ask("/unwrap", {"wrapped": wrapped.to_text()}, missing)
        key = base64.b64decode(reply["plaintext"])
        with self._lock:
            self._keys[wrapped] = key
        return key

    def close(self) -> None:
        with self._lock:
            self._keys.clear()

    def _ask(self, path: str, body: Mapping[str, str], missing: str) -> dict[str, Any]:
        """The relay's answer to `path`; `missing` is what a 404 says (the operator names the
        key it asked for: the relay's answer names nothing)."""
        ticket = self._ticket
        conn = http.client.HTTPSConnection(
            ticket.host, ticket.port, context=self._context, timeout=_TIMEOUT
        )
        try:
            conn.request(
                "POST",
                path,
                body=json.dumps(dict(body)),
                headers={
                    "Authorization": f"Bearer {ticket.token}",
                    "Content-Type": "application/json",
                },
            )
            response = conn.getresponse()
            data = response.read(_MAX_BODY + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise KeyAccessError(
                f"cannot reach the job's key relay: {type(exc).__name__}"
            ) from None
        finally:
            conn.close()
        if response.status == 200:
            return dict(json.loads(data))
        if response.status == 404:
            raise KeyNotFound(missing)
        raise _REFUSALS.get(response.status, KeyAccessError)(
            _MESSAGES.get(response.status, f"the job's key relay answered {response.status}")
        )


_REFUSALS: dict[int, type[PPMLError]] = {
    400: IntegrityError,
    403: AccessDenied,
}
_MESSAGES = {
    400: "integrity check failed",
    401: "the job's key relay refused this operator",
    403: "access denied: the key's release policy does not allow this workload",
}


def _status_for(exc: PPMLError) -> int:
    if isinstance(exc, IntegrityError):
        return 400
    if isinstance(exc, AccessDenied):
        return 403
    if isinstance(exc, KeyNotFound):
        return 404
    return 502


def _self_signed(host: str) -> tuple[bytes, bytes]:
    """A P-256 key and a certificate for `host`, valid for a day, made for one run."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ppml flink key relay")])
    try:
        alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        alt = x509.DNSName(host)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _RelayServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        _log.debug("key relay: " + format, *args)

    def do_POST(self) -> None:
        relay = self.server.relay
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {relay.token}".encode()):
            self._reply(401, {"error": "unauthorized"})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
            if not 0 < length <= _MAX_BODY:
                raise ValueError
            body = json.loads(self.rfile.read(length))
            reply = relay.answer(self.path, body)
        except (ValueError, TypeError, KeyError):
            self._reply(400, {"error": "bad request"})
            return
        except PPMLError as exc:
            _log.info("key relay refused %s: %s", self.path, type(exc).__name__)
            self._reply(_status_for(exc), {"error": type(exc).__name__})
            return
        self._reply(200, reply)

    def _reply(self, status: int, body: Mapping[str, Any]) -> None:
        data = json.dumps(dict(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _RelayServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], relay: KeyRelay) -> None:
        self.relay = relay
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A peer that drops the connection or fails the handshake: logged, never printed.
        _log.debug("key relay: connection from %s failed", client_address, exc_info=True)


class KeyRelay:
    """Serves `provider` to a job's operators while the block runs (see the module)."""

    def __init__(self, provider: DataKeyProvider, host: str = "127.0.0.1", port: int = 0) -> None:
        self._provider = provider
        self.token = secrets.token_urlsafe(32)
        key_pem, self._cert_pem = _self_signed(host)
        self._server = _RelayServer((host, port), self)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        with memory_files(key_pem, self._cert_pem) as (key_file, cert_file):
            context.load_cert_chain(cert_file, key_file)
        # The handshake happens in the request's own thread, so a slow peer holds up no other.
        self._server.socket = context.wrap_socket(
            self._server.socket, server_side=True, do_handshake_on_connect=False
        )
        self._host = host
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"KeyRelay({self._host}:{self.port})"

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def ticket(self) -> RelayTicket:
        return RelayTicket(self._host, self.port, self._cert_pem.decode(), self.token)

    def write_ticket(self, path: Path) -> Path:
        write_private(path, self.ticket().to_json().encode())
        return path

    def answer(self, path: str, body: Mapping[str, Any]) -> dict[str, str]:
        if path == "/datakey":
            key = self._provider.generate_data_key(str(body["key"]))
            return {
                "plaintext": base64.b64encode(key.plaintext).decode(),
                "wrapped": key.wrapped.to_text(),
            }
        if path == "/unwrap":
            wrapped = WrappedKey.from_text(str(body["wrapped"]))
            return {"plaintext": base64.b64encode(self._provider.unwrap(wrapped)).decode()}
        raise KeyError(path)

    def __enter__(self) -> KeyRelay:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="ppml-key-relay", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
