"""The routers in process (no TLS): what each route answers, the refusal catalogue, the body
limit, bearer parsing and the administrator check, which is injected here."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from fastapi import Request
from tests.asgi_client import AsgiClient

from ppml.attestation import SimPlatform, report_data_for
from ppml.crypto.hpke import generate_keypair
from ppml.crypto.passphrase import KdfParams
from ppml.errors import (
    AccessDenied,
    AttestationFailed,
    ConfigurationError,
    IntegrityError,
    KeyExists,
    KeyNotFound,
    PPMLError,
    UsageError,
)
from ppml.kms import ReleasedKey, open_released
from ppml.server.app import (
    MAX_BODY_BYTES,
    PEER_CERT_EXTENSION,
    Services,
    create_app,
    require_client_certificate,
)
from ppml.server.embedded import services_for
from ppml.server.errors import CATALOGUE, status_for
from ppml.server.tls import _client_auth_cert
from ppml.workspace import Workspace

M = "5e" * 32


def _allow_all(request: Request) -> None:
    return None


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return Workspace.create(
        tmp_path_factory.mktemp("routes") / "ws",
        b"unit test passphrase",
        dev=True,
        kdf=KdfParams.for_testing(),
    )


@pytest.fixture(scope="module")
def services(workspace: Workspace) -> Iterator[Services]:
    s = services_for(workspace)
    s.keys.create_key("sales")
    s.broker.set_policy(
        "sales", [{"tee": "sim", "measurement": M, "debug_ok": False, "min_tcb": "UpToDate"}]
    )
    yield s
    s.keys.close()


@pytest.fixture
def admin(services: Services) -> AsgiClient:
    return AsgiClient(create_app(services, admin_check=_allow_all))


@pytest.fixture
def anonymous(services: Services) -> AsgiClient:
    return AsgiClient(create_app(services))


def _token(client: AsgiClient, workspace: Workspace, measurement: str = M) -> tuple[str, Any]:
    nonce = base64.b64decode(client.post("/attestation/v1/challenge").json()["nonce"])
    private, public = generate_keypair()
    evidence = SimPlatform(workspace.sim_platform_key()).quote(
        measurement, report_data_for(nonce, public)
    )
    r = client.post(
        "/attestation/v1/attest",
        json={
            "tee": "sim",
            "evidence": base64.b64encode(evidence).decode(),
            "nonce": base64.b64encode(nonce).decode(),
            "public_key": base64.b64encode(public).decode(),
        },
    )
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"token", "expires_at"}
    return r.json()["token"], private


def test_healthz(anonymous: AsgiClient) -> None:
    assert anonymous.get("/healthz").json() == {"status": "ok"}


def test_challenge_is_fresh_base64(anonymous: AsgiClient) -> None:
    a, b = (anonymous.post("/attestation/v1/challenge").json() for _ in range(2))
    assert len(base64.b64decode(a["nonce"])) == 32 and a["nonce"] != b["nonce"]
    assert a["expires_at"].endswith("+00:00")


def test_release_round_trip_in_process(anonymous: AsgiClient, workspace: Workspace) -> None:
    token, private = _token(anonymous, workspace)
    r = anonymous.post("/kms/v1/keys/sales/datakey", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    released = ReleasedKey.from_dict(r.json())
    key = open_released(released, private, purpose="datakey")
    r = anonymous.post(
        "/kms/v1/keys/sales/unwrap",
        json={"wrapped_key": released.wrapped.to_text()},
        # The scheme is case-insensitive (RFC 7235).
        headers={"Authorization": f"bearer {token}"},
    )
    assert r.status_code == 200, r.text
    assert open_released(ReleasedKey.from_dict(r.json()), private).plaintext == key.plaintext


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer"}, {"Authorization": "Basic YTpi"}, {"Authorization": "x"}],
)
def test_missing_token_is_refused_and_audited(
    anonymous: AsgiClient, services: Services, headers: dict[str, str]
) -> None:
    before = services.keys.audit.entries(limit=1)[-1].seq
    r = anonymous.post("/kms/v1/keys/sales/datakey", headers=headers)
    assert (r.status_code, r.json()) == (401, {"error": "unauthorized"})
    new = [e for e in services.keys.audit.entries() if e.seq > before]
    assert [(e.op, e.outcome, e.detail["reason"]) for e in new] == [
        ("release_datakey", "denied", "token_rejected")
    ]


def test_admin_routes_refused_without_a_peer_certificate(anonymous: AsgiClient) -> None:
    for method, path in (
        ("GET", "/kms/v1/keys"),
        ("POST", "/kms/v1/keys"),
        ("GET", "/kms/v1/keys/sales/policy"),
        ("PUT", "/kms/v1/keys/sales/policy"),
        ("GET", "/kms/v1/audit"),
    ):
        r = anonymous.request(method, path, json={"name": "x"} if method == "POST" else None)
        assert (r.status_code, r.json()) == (401, {"error": "unauthorized"}), path


def test_require_client_certificate_reads_the_scope() -> None:
    def request(extensions: dict[str, Any]) -> Request:
        return Request({"type": "http", "extensions": extensions, "headers": []})

    require_client_certificate(request({PEER_CERT_EXTENSION: b"\x30\x00"}))
    for ext in ({}, {PEER_CERT_EXTENSION: None}, {PEER_CERT_EXTENSION: b""}):
        with pytest.raises(AttestationFailed):
            require_client_certificate(request(ext))


def test_admin_routes_with_injected_check(admin: AsgiClient) -> None:
    r = admin.post("/kms/v1/keys", json={"name": "routes-new"})
    assert r.status_code == 200 and r.json()["current_version"] == 1
    assert admin.post("/kms/v1/keys", json={"name": "routes-new"}).status_code == 409
    rule = {"tee": "sim", "measurement": M, "debug_ok": False, "min_tcb": "UpToDate"}
    r = admin.put(
        "/kms/v1/keys/routes-new/policy", json={"rules": [{"tee": "sim", "measurement": M}]}
    )
    assert r.json() == {"key": "routes-new", "rules": [rule]}
    assert admin.get("/kms/v1/keys/routes-new/policy").json()["rules"] == [rule]
    assert admin.put("/kms/v1/keys/routes-new/policy", json={"rules": []}).json()["rules"] == []
    assert admin.get("/kms/v1/keys/nope/policy").status_code == 404
    assert "routes-new" in {k["name"] for k in admin.get("/kms/v1/keys").json()}
    audit = admin.get("/kms/v1/audit", params={"limit": 1}).json()
    assert len(audit) == 1 and audit[0]["op"] == "policy_set"
    assert len(admin.get("/kms/v1/audit", params={"limit": -5}).json()) == 1
    assert admin.get("/kms/v1/audit", params={"limit": "many"}).status_code == 400


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/attestation/v1/attest", {"tee": "sim"}),
        ("/attestation/v1/attest", {"tee": "sim", "evidence": 1, "nonce": "", "public_key": ""}),
        (
            "/attestation/v1/attest",
            {"tee": "x" * 17, "evidence": "", "nonce": "", "public_key": ""},
        ),
        ("/kms/v1/keys/sales/unwrap", {"wrapped_key": "a", "extra": 1}),
        ("/kms/v1/keys/sales/unwrap", {"wrapped_key": "x" * 8193}),
        ("/kms/v1/keys/sales/unwrap", [1, 2]),
        ("/kms/v1/keys", {"name": True}),
    ],
)
def test_invalid_bodies_are_400(admin: AsgiClient, path: str, body: Any) -> None:
    r = admin.post(path, json=body)
    assert (r.status_code, r.json()) == (400, {"error": "bad request"})


def test_strict_types_in_policies(admin: AsgiClient) -> None:
    for debug_ok in ("true", 1, None):
        r = admin.put(
            "/kms/v1/keys/sales/policy",
            json={"rules": [{"tee": "sim", "measurement": M, "debug_ok": debug_ok}]},
        )
        assert r.status_code == 400, debug_ok


def test_unknown_route_and_method(anonymous: AsgiClient) -> None:
    assert anonymous.get("/nope").json() == {"error": "not found"}
    r = anonymous.get("/attestation/v1/attest")
    assert (r.status_code, r.json()) == (405, {"error": "method not allowed"})


# -- the body limit ----------------------------------------------------------------------------


def test_body_at_the_limit_is_parsed(anonymous: AsgiClient) -> None:
    body = b'{"wrapped_key": "' + b"A" * (MAX_BODY_BYTES - 19) + b'"}'
    assert len(body) == MAX_BODY_BYTES
    r = anonymous.post("/kms/v1/keys/sales/unwrap", content=body)
    assert r.status_code == 400  # parsed, and the field is too long: not 413


@pytest.mark.parametrize("chunked", [False, True])
def test_body_over_the_limit_is_413(anonymous: AsgiClient, chunked: bool) -> None:
    body = b" " * (MAX_BODY_BYTES + 1)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    content: Any = chunks() if chunked else body
    r = anonymous.post("/kms/v1/keys/sales/unwrap", content=content)
    assert (r.status_code, r.json()) == (413, {"error": "request too large"})


def test_non_numeric_content_length_is_413(anonymous: AsgiClient) -> None:
    r = anonymous.post(
        "/kms/v1/keys/sales/unwrap", content=b"{}", headers={"content-length": "1e3"}
    )
    assert r.status_code in (400, 413)


# -- the catalogue -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (AttestationFailed("x"), 401),
        (AccessDenied("x"), 403),
        (KeyNotFound("x"), 404),
        (KeyExists("x"), 409),
        (UsageError("x"), 400),
        (IntegrityError(), 400),
        (ConfigurationError("x"), 403),
        (PPMLError("x"), 403),
    ],
)
def test_status_for(exc: PPMLError, status: int) -> None:
    assert status_for(exc) == status


def test_unexpected_exception_is_500_with_a_fixed_body(services: Services) -> None:
    def boom(request: Request) -> None:
        raise RuntimeError("secret detail")

    c = AsgiClient(create_app(services, admin_check=boom), raise_app_exceptions=False)
    r = c.get("/kms/v1/keys")
    assert (r.status_code, r.json()) == (500, {"error": "internal error"})
    assert "secret" not in r.text


def test_every_refusal_body_is_in_the_catalogue() -> None:
    assert set(CATALOGUE) >= {400, 401, 403, 404, 409, 413, 500}


def test_openapi_describes_every_route(anonymous: AsgiClient) -> None:
    spec = anonymous.get("/openapi.json").json()
    ops = {(m.upper(), p) for p, item in spec["paths"].items() for m in item}
    assert ops == {
        ("GET", "/healthz"),
        ("POST", "/attestation/v1/challenge"),
        ("POST", "/attestation/v1/attest"),
        ("POST", "/kms/v1/keys/{name}/datakey"),
        ("POST", "/kms/v1/keys/{name}/unwrap"),
        ("POST", "/kms/v1/keys"),
        ("GET", "/kms/v1/keys"),
        ("PUT", "/kms/v1/keys/{name}/policy"),
        ("GET", "/kms/v1/keys/{name}/policy"),
        ("GET", "/kms/v1/audit"),
    }
    assert "attestationToken" in spec["components"]["securitySchemes"]
    datakey = spec["paths"]["/kms/v1/keys/{name}/datakey"]["post"]
    assert {"200", "401", "403"} <= set(datakey["responses"])


# -- the peer certificate ----------------------------------------------------------------------


def test_client_auth_cert_needs_the_client_auth_usage(workspace: Workspace) -> None:
    def der(path: Path) -> bytes:
        from cryptography.hazmat.primitives.serialization import Encoding

        return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(Encoding.DER)

    client = der(workspace.client_cert)
    assert _client_auth_cert(client) == client
    assert _client_auth_cert(der(workspace.server_cert)) is None
    assert _client_auth_cert(der(workspace.ca_cert)) is None
    assert _client_auth_cert(None) is None
    assert _client_auth_cert(b"not a certificate") is None
