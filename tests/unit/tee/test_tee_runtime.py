"""The workload-side key provider: lazy attestation, token reuse until expiry, key caching,
and refusals mapped to ppml errors (HTTP through an injected transport)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ppml.crypto.envelope import WrappedKey
from ppml.crypto.hpke import release_info, seal_to
from ppml.errors import AccessDenied, AttestationFailed
from ppml.kms.broker import ReleasedKey
from ppml.tee.runtime import AttestedKeyProvider

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _ca_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class FakeServices:
    """Challenge, attest and unwrap endpoints; counts calls; seals keys to the attested key."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.public_key = b""
        self.status = 200
        self.keys: dict[str, bytes] = {}

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.calls[path] = self.calls.get(path, 0) + 1
        if path == "/attestation/v1/challenge":
            return httpx.Response(200, json={"nonce": base64.b64encode(os.urandom(32)).decode()})
        if path == "/attestation/v1/attest":
            body = json.loads(request.content)
            self.public_key = base64.b64decode(body["public_key"])
            expires = NOW + dt.timedelta(minutes=5)
            return httpx.Response(200, json={"token": "tok", "expires_at": expires.isoformat()})
        if request.headers.get("authorization") != "Bearer tok":
            return httpx.Response(401, json={"error": "unauthorized"})
        if self.status != 200:
            return httpx.Response(self.status, json={"error": "refused"})
        wrapped = WrappedKey.from_text(json.loads(request.content)["wrapped_key"])
        dek = self.keys.setdefault(wrapped.blob.hex(), os.urandom(32))
        sealed = seal_to(self.public_key, dek, info=release_info(wrapped, "unwrap"))
        return httpx.Response(200, json=ReleasedKey(wrapped, sealed, "unwrap").to_dict())


@pytest.fixture
def setup() -> tuple[FakeServices, AttestedKeyProvider, list[dt.datetime]]:
    services = FakeServices()
    now = [NOW]
    provider = AttestedKeyProvider(
        "https://kms.test",
        _ca_pem(),
        evidence=lambda report_data: ("sim", b"evidence"),
        transport=httpx.MockTransport(services.handle),
        clock=lambda: now[0],
    )
    return services, provider, now


def _wrapped(tag: bytes) -> WrappedKey:
    return WrappedKey("sales", 1, tag * 60)


def test_attests_once_reuses_the_token_and_caches_keys(setup) -> None:  # type: ignore[no-untyped-def]
    services, provider, _ = setup
    assert services.calls == {}  # nothing happens before a key is needed
    first = provider.unwrap(_wrapped(b"a"))
    assert provider.unwrap(_wrapped(b"a")) == first == services.keys[_wrapped(b"a").blob.hex()]
    provider.unwrap(_wrapped(b"b"))
    assert services.calls["/attestation/v1/attest"] == 1
    assert services.calls["/kms/v1/keys/sales/unwrap"] == 2  # the repeated key came from memory


def test_attests_again_shortly_before_the_token_expires(setup) -> None:  # type: ignore[no-untyped-def]
    services, provider, now = setup
    provider.unwrap(_wrapped(b"a"))
    now[0] = NOW + dt.timedelta(minutes=4, seconds=31)  # within the refresh margin
    provider.unwrap(_wrapped(b"b"))
    assert services.calls["/attestation/v1/attest"] == 2


@pytest.mark.parametrize(
    ("status", "error"), [(403, AccessDenied), (404, AccessDenied), (401, AttestationFailed)]
)
def test_refusals_become_ppml_errors(setup, status: int, error: type[Exception]) -> None:  # type: ignore[no-untyped-def]
    services, provider, _ = setup
    services.status = status
    with pytest.raises(error):
        provider.unwrap(_wrapped(b"a"))
