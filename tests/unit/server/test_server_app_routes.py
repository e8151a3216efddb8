"""The routers in process (no TLS): what each route answers, the refusal catalogue, the body
limit, bearer parsing, the order of the boundary's checks, and the administrator check (the
pinned certificate, or an injected authenticator)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from tests.support.asgi import AsgiClient

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
    pinned_certificates,
)
from ppml.server.boundary import SECURITY_HEADERS, Principal, Refused
from ppml.server.embedded import services_for
from ppml.server.errors import CATALOGUE, status_for
from ppml.server.tls import _client_auth_cert
from ppml.workspace import Workspace

M = "5e" * 32


async def _allow_all(scope: Any) -> Principal:
    return Principal("certificate", "test administrator")


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
    return AsgiClient(create_app(services, admin=_allow_all))


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
    # with the empty object the workload runtime sends, too
    assert anonymous.post("/attestation/v1/challenge", json={}).status_code == 200
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


MISSING_TOKENS = [
    {},
    {"Authorization": "Bearer"},
    {"Authorization": "Basic YTpi"},
    {"Authorization": "x"},
    {"Authorization": "Bearer not.a.token"},
]


def test_missing_tokens_are_refused_and_audited_sparingly(
    workspace: Workspace, tmp_path: Path
) -> None:
    """Every call without a token that verifies is 401; the audit log gets the first of each
    kind (client address, operation, reason) per window in full and a count of the others,
    so that a flood cannot bury it."""
    services = services_for(workspace)
    try:
        client = AsgiClient(create_app(services))
        before = services.keys.audit.entries(limit=1)[-1].seq
        for headers in MISSING_TOKENS * 3:
            r = client.post("/kms/v1/keys/sales/datakey", headers=headers)
            assert (r.status_code, r.json()) == (401, {"error": "unauthorized"})
        new = [e for e in services.keys.audit.entries() if e.seq > before]
        assert [(e.op, e.outcome, e.detail["reason"]) for e in new] == [
            ("release_datakey", "denied", "token_rejected")
        ]
        assert new[0].detail["client"] == "127.0.0.1"
        services.broker.flush()  # at shutdown: the count of those left out
        last = services.keys.audit.entries(limit=1)[-1]
        assert (last.op, last.detail["suppressed"], last.detail["client"]) == (
            "release_datakey",
            len(MISSING_TOKENS) * 3 - 1,
            "127.0.0.1",
        )
    finally:
        services.keys.close()


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


def _der(path: Path) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(Encoding.DER)


def test_the_admin_certificate_is_pinned(workspace: Workspace, tmp_path: Path) -> None:
    """Any certificate of the workspace CA with the client usage passes the TLS layer (serving
    clients hold such certificates); only the workspace's own client certificate administers."""
    import asyncio

    authenticate = pinned_certificates((_der(workspace.client_cert),))
    scope: dict[str, Any] = {"extensions": {PEER_CERT_EXTENSION: _der(workspace.client_cert)}}
    assert asyncio.run(authenticate(scope)).name == "administrator"
    other = Workspace.create(tmp_path / "other", b"pass", kdf=KdfParams.for_testing())
    for cert in (_der(other.client_cert), _der(workspace.server_cert), b"\x30\x00", b"", None):
        with pytest.raises(Refused) as caught:
            asyncio.run(authenticate({"extensions": {PEER_CERT_EXTENSION: cert}}))
        assert caught.value.status == 401
    with pytest.raises(Refused):
        asyncio.run(authenticate({}))
    with pytest.raises(Refused):
        asyncio.run(pinned_certificates(())(scope))  # no pin: no administrator


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
def test_invalid_bodies_are_400(
    admin: AsgiClient, workspace: Workspace, path: str, body: Any
) -> None:
    token, _ = _token(admin, workspace)
    r = admin.post(path, json=body, headers={"Authorization": f"Bearer {token}"})
    assert (r.status_code, r.json()) == (400, {"error": "bad request"})


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/kms/v1/keys/sales/unwrap"),
        ("POST", "/kms/v1/keys/sales/datakey"),
        ("POST", "/kms/v1/keys"),
        ("PUT", "/kms/v1/keys/sales/policy"),
    ],
)
@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b" " * (MAX_BODY_BYTES + 1)])
def test_an_unauthenticated_call_is_401_whatever_its_body(
    anonymous: AsgiClient, method: str, path: str, body: bytes
) -> None:
    """Authenticate first: a malformed or oversized body from nobody is 401, never 400 or 413
    (which would show that the body was read)."""
    r = anonymous.request(method, path, content=body, headers={"content-type": "application/json"})
    assert (r.status_code, r.json()) == (401, {"error": "unauthorized"})


def test_strict_types_in_policies(admin: AsgiClient) -> None:
    for debug_ok in ("true", 1, None):
        r = admin.put(
            "/kms/v1/keys/sales/policy",
            json={"rules": [{"tee": "sim", "measurement": M, "debug_ok": debug_ok}]},
        )
        assert r.status_code == 400, debug_ok


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/kms/v1/keys/sales/policy/"),
        ("GET", "/kms/v1/keys/"),
        ("POST", "/kms/v1/keys/sales/datakey/"),
        ("GET", "/kms/v1/audit/"),
    ],
)
def test_a_trailing_slash_is_never_redirected(
    anonymous: AsgiClient, method: str, path: str
) -> None:
    """A redirect would answer before authentication, with a Location built from the client's
    Host header (an open redirect that re-sends a PUT body or a token elsewhere)."""
    r = anonymous.request(method, path, headers={"host": "evil.example"}, json={"rules": []})
    assert r.status_code in (401, 404), (r.status_code, r.headers)
    assert "location" not in r.headers
    assert r.json()["error"] in ("unauthorized", "not found")


def test_unknown_route_and_method(anonymous: AsgiClient) -> None:
    assert anonymous.get("/nope").json() == {"error": "not found"}
    r = anonymous.get("/attestation/v1/attest")
    assert (r.status_code, r.json()) == (405, {"error": "method not allowed"})


# -- the body limit ----------------------------------------------------------------------------


@pytest.fixture
def bearer(anonymous: AsgiClient, workspace: Workspace) -> dict[str, str]:
    return {"Authorization": f"Bearer {_token(anonymous, workspace)[0]}"}


def test_body_at_the_limit_is_parsed(anonymous: AsgiClient, bearer: dict[str, str]) -> None:
    body = b'{"wrapped_key": "' + b"A" * (MAX_BODY_BYTES - 19) + b'"}'
    assert len(body) == MAX_BODY_BYTES
    r = anonymous.post("/kms/v1/keys/sales/unwrap", content=body, headers=bearer)
    assert r.status_code == 400  # parsed, and the field is too long: not 413


@pytest.mark.parametrize("chunked", [False, True])
def test_body_over_the_limit_is_413(
    anonymous: AsgiClient, bearer: dict[str, str], chunked: bool
) -> None:
    body = b" " * (MAX_BODY_BYTES + 1)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    content: Any = chunks() if chunked else body
    r = anonymous.post("/kms/v1/keys/sales/unwrap", content=content, headers=bearer)
    assert r.status_code == 413 and r.json()["error"] == "request too large"


def test_non_numeric_content_length_is_413(anonymous: AsgiClient, bearer: dict[str, str]) -> None:
    r = anonymous.post(
        "/kms/v1/keys/sales/unwrap", content=b"{}", headers={"content-length": "1e3", **bearer}
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
    async def boom(scope: Any) -> Principal:
        raise RuntimeError("secret detail")

    c = AsgiClient(create_app(services, admin=boom), raise_app_exceptions=False)
    r = c.get("/kms/v1/keys")
    assert (r.status_code, r.json()) == (500, {"error": "internal error"})
    assert "secret" not in r.text


def test_every_refusal_body_is_in_the_catalogue() -> None:
    assert set(CATALOGUE) >= {400, 401, 403, 404, 409, 413, 429, 500}


@pytest.mark.parametrize("path", ["/healthz", "/nope", "/kms/v1/keys", "/openapi.json"])
def test_every_answer_carries_the_security_headers(anonymous: AsgiClient, path: str) -> None:
    r = anonymous.get(path)
    for name, value in SECURITY_HEADERS:
        assert r.headers[name.decode()] == value.decode(), (path, name)
    assert "default-src 'none'" in r.headers["content-security-policy"]


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/docs/oauth2-redirect"])
def test_no_interactive_docs_load_third_party_script(anonymous: AsgiClient, path: str) -> None:
    r = anonymous.get(path)
    assert r.status_code == 404
    assert "cdn" not in r.text.lower() and "<script" not in r.text.lower()


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
