"""The attack table, against the real server: a dev workspace, its services, uvicorn over TLS on
loopback, and httpx clients that verify the workspace CA.

Each row is one configuration x policy x presented credential -> the status the catalogue
prescribes. Every refusal releases nothing and, where the request reaches the KMS, leaves an
audit record that is not `ok`. The positive rows show that the right workload and the
administrator do get what they ask for. After the table: the audit chain verifies, and no token,
data key or passphrase ever reached the server's log.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import ssl
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ppml.attestation import (
    EvidenceClaims,
    SimPlatform,
    TcbStatus,
    TeeType,
    TokenIssuer,
    report_data_for,
)
from ppml.crypto.envelope import DataKey, WrappedKey
from ppml.crypto.hpke import generate_keypair
from ppml.crypto.passphrase import KdfParams
from ppml.errors import IntegrityError
from ppml.kms import ReleasedKey, open_released
from ppml.server.app import MAX_BODY_BYTES, create_app
from ppml.server.embedded import services_for, tls_files_for
from ppml.server.errors import CATALOGUE
from ppml.server.tls import ServerHandle, serving
from ppml.tee.manifest import build_manifest
from ppml.workspace import Workspace

PASSPHRASE = "server attack table passphrase 7"
M_ALPHA = "a1" * 48  # the measurement alpha's policy names
M_BETA = "b2" * 32  # the measurement beta's policy names
M_OTHER = "c3" * 32  # named by no policy
TLS_REFUSED = 0  # the "status" of a row whose TLS handshake fails


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class Workload:
    """An attested workload: its token and the private key its data keys are sealed to."""

    token: str
    private: X25519PrivateKey


@dataclass
class Harness:
    """The servers, their clients and what the rows share."""

    ws: Workspace
    services: Any
    client: httpx.Client  # a workload: no client certificate
    admin: httpx.Client  # the administrator: the workspace's client certificate
    prod: httpx.Client  # a workload talking to a NON-dev workspace's server
    foreign_admin: httpx.Client  # a client certificate from another workspace's CA
    server_cert_admin: httpx.Client  # the workspace's own server certificate as client cert
    serving_client_admin: httpx.Client  # a serving client's certificate (the workspace CA's)
    platform: SimPlatform
    workdir: Path
    url: str
    wrapped_alpha: WrappedKey = field(init=False)
    wrapped_beta: WrappedKey = field(init=False)
    secrets: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    # -- attestation ---------------------------------------------------------------------------

    def nonce(self, client: httpx.Client | None = None) -> bytes:
        r = (client or self.client).post("/attestation/v1/challenge")
        assert r.status_code == 200, r.text
        return base64.b64decode(r.json()["nonce"])

    def attest_body(
        self,
        measurement: str,
        *,
        debug: bool = False,
        nonce: bytes | None = None,
        bind_nonce: bytes | None = None,
        bind_key: bytes | None = None,
        platform: SimPlatform | None = None,
        client: httpx.Client | None = None,
    ) -> tuple[dict[str, str], X25519PrivateKey]:
        """An attest request body for sim evidence of `measurement`; `bind_*` makes the evidence
        bind another nonce or public key than the one presented."""
        private, public = generate_keypair()
        nonce = nonce if nonce is not None else self.nonce(client)
        report_data = report_data_for(
            bind_nonce if bind_nonce is not None else nonce,
            bind_key if bind_key is not None else public,
        )
        evidence = (platform or self.platform).quote(measurement, report_data, debug=debug)
        body = {
            "tee": "sim",
            "evidence": _b64(evidence),
            "nonce": _b64(nonce),
            "public_key": _b64(public),
        }
        return body, private

    def attest(self, measurement: str, *, debug: bool = False) -> Workload:
        body, private = self.attest_body(measurement, debug=debug)
        r = self.client.post("/attestation/v1/attest", json=body)
        assert r.status_code == 200, r.text
        token = r.json()["token"]
        self.secrets.append(token)
        return Workload(token, private)

    def forged_token(self, signing_key: ec.EllipticCurvePrivateKey, *, at: dt.datetime) -> str:
        """A well-formed token for M_ALPHA, signed by `signing_key` at time `at`."""
        _, public = generate_keypair()
        issuer = TokenIssuer(signing_key, clock=lambda: at)
        claims = EvidenceClaims(
            tee=TeeType.SIM,
            measurements={"measurement": M_ALPHA},
            debug=False,
            tcb_status=TcbStatus.UP_TO_DATE,
            report_data=bytes(64),
        )
        token = issuer.issue(claims, public, ["alpha"])
        self.secrets.append(token)
        return token

    # -- key release ---------------------------------------------------------------------------

    def datakey(self, key: str, token: str | None) -> httpx.Response:
        return self.client.post(f"/kms/v1/keys/{key}/datakey", headers=_bearer(token))

    def unwrap(self, key: str, wrapped: WrappedKey | str, token: str | None) -> httpx.Response:
        text = wrapped if isinstance(wrapped, str) else wrapped.to_text()
        return self.client.post(
            f"/kms/v1/keys/{key}/unwrap", json={"wrapped_key": text}, headers=_bearer(token)
        )

    def remember(self, key: DataKey | bytes) -> None:
        plaintext = key.plaintext if isinstance(key, DataKey) else key
        self.secrets += [
            plaintext.hex(),
            _b64(plaintext),
            base64.urlsafe_b64encode(plaintext).decode(),
        ]

    def audit_seq(self) -> int:
        entries = self.services.keys.audit.entries(limit=1)
        return entries[-1].seq if entries else 0


def _bearer(token: str | None) -> dict[str, str]:
    return {} if token is None else {"Authorization": f"Bearer {token}"}


def _context(
    ca: Path, cert: Path | None = None, key: Path | None = None, password: str | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None and key is not None:
        context.load_cert_chain(str(cert), str(key), password=password)
    return context


def _serving_client_context(ws: Workspace, directory: Path) -> ssl.SSLContext:
    """A serving client's certificate (issued by the workspace CA, client usage)."""
    from cryptography.hazmat.primitives import serialization

    from ppml.workspace import pki

    issued = pki.issue_serving_client(
        ws.certificate_authority(), "mallory", dt.datetime.now(dt.UTC), dt.timedelta(days=1)
    )
    (directory / "mallory.pem").write_bytes(issued.cert.public_bytes(serialization.Encoding.PEM))
    (directory / "mallory-key.pem").write_bytes(pki.private_key_pem(issued.key))
    return _context(ws.ca_cert, directory / "mallory.pem", directory / "mallory-key.pem")


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    d = tmp_path_factory.mktemp("server-attacks")
    kdf = KdfParams.for_testing()
    ws = Workspace.create(d / "dev", PASSPHRASE.encode(), dev=True, kdf=kdf)
    prod_ws = Workspace.create(d / "prod", PASSPHRASE.encode(), dev=False, kdf=kdf)
    # Every refusal audited in full (no sparse window): each row checks its own record.
    services = services_for(ws, actor="server", refusal_audit_window_s=0.0)
    prod_services = services_for(prod_ws, actor="server", refusal_audit_window_s=0.0)
    for name, measurement in (("alpha", M_ALPHA), ("beta", M_BETA)):
        services.keys.create_key(name)
        services.broker.set_policy(
            name,
            [{"tee": "sim", "measurement": measurement, "debug_ok": False, "min_tcb": "UpToDate"}],
        )
    with (
        serving(create_app(services), tls_files_for(ws)) as server,
        serving(create_app(prod_services), tls_files_for(prod_ws)) as prod_server,
    ):

        def client(handle: ServerHandle, context: ssl.SSLContext) -> httpx.Client:
            return httpx.Client(base_url=handle.url, verify=context, timeout=30.0)

        h = Harness(
            ws=ws,
            services=services,
            client=client(server, _context(ws.ca_cert)),
            admin=client(server, ws.client_ssl_context()),
            prod=client(prod_server, _context(prod_ws.ca_cert)),
            foreign_admin=client(
                server,
                _context(
                    ws.ca_cert, prod_ws.client_cert, prod_ws.client_key, prod_ws.tls_key_password()
                ),
            ),
            server_cert_admin=client(
                server,
                _context(ws.ca_cert, ws.server_cert, ws.server_key, ws.tls_key_password()),
            ),
            serving_client_admin=client(server, _serving_client_context(ws, d)),
            platform=SimPlatform(ws.sim_platform_key()),
            workdir=d,
            url=server.url,
        )
        alpha, beta = (
            services.keys.generate_data_key("alpha"),
            services.keys.generate_data_key("beta"),
        )
        h.remember(alpha)
        h.remember(beta)
        h.wrapped_alpha, h.wrapped_beta = alpha.wrapped, beta.wrapped
        _administrator_setup(h)
        h.secrets.append(PASSPHRASE)
        try:
            yield h
        finally:
            for c in (
                h.client,
                h.admin,
                h.prod,
                h.foreign_admin,
                h.server_cert_admin,
                h.serving_client_admin,
            ):
                c.close()
    services.keys.close()
    prod_services.keys.close()


@pytest.fixture(autouse=True)
def server_log(
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[None]:
    """Capture everything "ppml" and "uvicorn" log during each test, for the final check.
    (uvicorn's loggers do not propagate to the root, where caplog listens, unless told to.)"""
    h: Harness = request.getfixturevalue("harness")
    for name in ("uvicorn", "uvicorn.access"):
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)
    caplog.set_level(logging.DEBUG, logger="ppml")
    caplog.set_level(logging.DEBUG, logger="uvicorn")
    yield
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    for when in ("setup", "call"):
        h.log += [formatter.format(r) for r in caplog.get_records(when)]


def _administrator_setup(h: Harness) -> None:
    """Through the admin API: key delta for M_ALPHA too (the relabelling row), and key
    job-output for a reviewed job (the row that changes the job afterwards)."""
    script = h.workdir / "job.py"
    script.write_text("print('the reviewed job')\n")
    reviewed = build_manifest([sys.executable, str(script)]).measurement()
    for name, measurement in (("delta", M_ALPHA), ("job-output", reviewed)):
        r = h.admin.post("/kms/v1/keys", json={"name": name})
        assert r.status_code == 200, r.text
        rules = [{"tee": "sim", "measurement": measurement}]
        r = h.admin.put(f"/kms/v1/keys/{name}/policy", json={"rules": rules})
        assert r.status_code == 200, r.text


# -- the table ---------------------------------------------------------------------------------

Attack = Callable[[Harness], httpx.Response]


@dataclass(frozen=True)
class Row:
    case: str
    attack: Attack
    status: int
    audit: str | None  # the outcome of the KMS's audit record(s); None: the KMS is not reached
    why: str  # what the server's log says (the client is told only the catalogue text)


def _valid_token_then(make: Callable[[Harness, Workload], httpx.Response]) -> Attack:
    return lambda h: make(h, h.attest(M_ALPHA))


def _attest(**kwargs: Any) -> Attack:
    def attack(h: Harness) -> httpx.Response:
        body, _ = h.attest_body(M_ALPHA, **kwargs)
        return h.client.post("/attestation/v1/attest", json=body)

    return attack


def _evidence_for_another_nonce(h: Harness) -> httpx.Response:
    presented, bound = h.nonce(), h.nonce()
    body, _ = h.attest_body(M_ALPHA, nonce=presented, bind_nonce=bound)
    return h.client.post("/attestation/v1/attest", json=body)


def _nonce_used_twice(h: Harness) -> httpx.Response:
    body, _ = h.attest_body(M_ALPHA)
    first = h.client.post("/attestation/v1/attest", json=body)
    assert first.status_code == 200
    h.secrets.append(first.json()["token"])
    return h.client.post("/attestation/v1/attest", json=body)


def _report_data_for_another_key(h: Harness) -> httpx.Response:
    _, other_public = generate_keypair()
    body, _ = h.attest_body(M_ALPHA, bind_key=other_public)
    return h.client.post("/attestation/v1/attest", json=body)


def _workload_changed_after_policy(h: Harness) -> httpx.Response:
    script = h.workdir / "job.py"
    script.write_text("print('the reviewed job'); import os; os.system('exfiltrate')\n")
    changed = build_manifest([sys.executable, str(script)]).measurement()
    return h.datakey("job-output", h.attest(changed).token)


def _sim_in_prod(h: Harness) -> httpx.Response:
    # Evidence signed with the prod workspace's own sim platform key: still refused.
    platform = SimPlatform(
        Workspace.open(h.workdir / "prod", PASSPHRASE.encode()).sim_platform_key()
    )
    body, _ = h.attest_body(M_ALPHA, platform=platform, client=h.prod)
    return h.prod.post("/attestation/v1/attest", json=body)


def _tee(name: str) -> Attack:
    def attack(h: Harness) -> httpx.Response:
        body, _ = h.attest_body(M_ALPHA)
        return h.client.post("/attestation/v1/attest", json={**body, "tee": name})

    return attack


def _raw(path: str, content: bytes, *, admin: bool = False, token: bool = False) -> Attack:
    """POST `content` as is (`token`: with a valid workload's token)."""

    def attack(h: Harness) -> httpx.Response:
        client = h.admin if admin else h.client
        headers = {"Content-Type": "application/json"}
        if token:
            headers.update(_bearer(h.attest(M_ALPHA).token))
        return client.post(path, content=content, headers=headers)

    return attack


def _json(
    method: str, path: str, body: Any, *, client: str = "client", token: bool = False
) -> Attack:
    def attack(h: Harness) -> httpx.Response:
        c: httpx.Client = getattr(h, client)
        headers = _bearer(h.attest(M_ALPHA).token) if token else {}
        return c.request(method, path, json=body, headers=headers)

    return attack


def _chunked_oversized(h: Harness) -> httpx.Response:
    def chunks() -> Iterator[bytes]:
        yield b'{"wrapped_key": "'
        for _ in range(MAX_BODY_BYTES // 1024 + 8):
            yield b"A" * 1024
        yield b'"}'

    return h.client.post(
        "/kms/v1/keys/alpha/unwrap",
        content=chunks(),
        headers={"Content-Type": "application/json", **_bearer(h.attest(M_ALPHA).token)},
    )


def _relabelled(h: Harness, w: Workload) -> httpx.Response:
    # alpha's wrapped data key renamed to delta, whose policy the token satisfies too.
    return h.unwrap("delta", WrappedKey("delta", 1, h.wrapped_alpha.blob), w.token)


def _admin_tls(client: str) -> Attack:
    return lambda h: getattr(h, client).get("/kms/v1/keys")


ATTESTATION_ROWS = [
    Row("evidence for another nonce", _evidence_for_another_nonce, 401, None, "report data"),
    Row("nonce used twice", _nonce_used_twice, 401, None, "already used challenge"),
    Row("nonce never issued", _attest(nonce=bytes(32)), 401, None, "unknown or already used"),
    Row("report data binds another key", _report_data_for_another_key, 401, None, "report data"),
    Row(
        "evidence from another sim platform",
        _attest(platform=SimPlatform.generate()),
        401,
        None,
        "another sim platform key",
    ),
    Row("sim evidence, non-dev workspace", _sim_in_prod, 401, None, "sim evidence is not accepted"),
    Row("unknown TEE type", _tee("tpm"), 401, None, "unknown TEE type"),
    # SGX and TDX have verifiers by default; SEV-SNP needs a VCEK the workspace does not have.
    Row("TEE type without a verifier (snp)", _tee("snp"), 401, None, "no verifier"),
    Row(
        "attest: evidence not base64",
        _json(
            "POST",
            "/attestation/v1/attest",
            {"tee": "sim", "evidence": "!!", "nonce": "AA==", "public_key": "AA=="},
        ),
        400,
        None,
        "not base64",
    ),
    Row(
        "attest: malformed JSON",
        _raw("/attestation/v1/attest", b'{"tee": "sim",'),
        400,
        None,
        "invalid request body",
    ),
    Row(
        "attest: wrong types",
        _json(
            "POST",
            "/attestation/v1/attest",
            {"tee": 5, "evidence": [], "nonce": None, "public_key": True},
        ),
        400,
        None,
        "invalid request body",
    ),
    Row(
        "attest: extra field",
        _json(
            "POST",
            "/attestation/v1/attest",
            {"tee": "sim", "evidence": "", "nonce": "", "public_key": "", "debug": False},
        ),
        400,
        None,
        "invalid request body",
    ),
    Row(
        "attest: oversized body",
        _raw("/attestation/v1/attest", b" " * (MAX_BODY_BYTES + 1)),
        413,
        None,
        "413 too_large",
    ),
]

TOKEN_ROWS = [
    Row("no token", lambda h: h.datakey("alpha", None), 401, "denied", "token_rejected"),
    Row(
        "garbage token",
        lambda h: h.datakey("alpha", "not.a.token"),
        401,
        "denied",
        "not a compact JWS",
    ),
    Row(
        "not a bearer credential",
        lambda h: h.client.post(
            "/kms/v1/keys/alpha/datakey", headers={"Authorization": "Basic YTpi"}
        ),
        401,
        "denied",
        "token_rejected",
    ),
    Row(
        "expired token (workspace key)",
        lambda h: h.datakey(
            "alpha",
            h.forged_token(
                h.ws.token_signing_key(), at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
            ),
        ),
        401,
        "denied",
        "expired",
    ),
    Row(
        "token signed by another key",
        lambda h: h.datakey(
            "alpha",
            h.forged_token(ec.generate_private_key(ec.SECP256R1()), at=dt.datetime.now(dt.UTC)),
        ),
        401,
        "denied",
        "unknown key (kid)",
    ),
    Row(
        "token payload spliced",
        lambda h: h.datakey("alpha", _spliced(h)),
        401,
        "denied",
        "signature does not verify",
    ),
    Row(
        "unwrap without token",
        lambda h: h.unwrap("alpha", h.wrapped_alpha, None),
        401,
        "denied",
        "token_rejected",
    ),
]

POLICY_ROWS = [
    Row(
        "measurement the policy does not name",
        lambda h: h.datakey("alpha", h.attest(M_OTHER).token),
        403,
        "denied",
        "measurement_mismatch",
    ),
    Row(
        "another key's measurement",
        lambda h: h.datakey("alpha", h.attest(M_BETA).token),
        403,
        "denied",
        "measurement_mismatch",
    ),
    Row(
        "workload changed after the policy was set",
        _workload_changed_after_policy,
        403,
        "denied",
        "measurement_mismatch",
    ),
    Row(
        "debug evidence, debug not allowed",
        lambda h: h.datakey("alpha", h.attest(M_ALPHA, debug=True).token),
        403,
        "denied",
        "debug_not_allowed",
    ),
    Row(
        "unwrap: measurement the policy does not name",
        lambda h: h.unwrap("alpha", h.wrapped_alpha, h.attest(M_OTHER).token),
        403,
        "denied",
        "measurement_mismatch",
    ),
    Row(
        "unknown key (datakey)",
        _valid_token_then(lambda h, w: h.datakey("nosuch", w.token)),
        403,
        "denied",
        "unknown_key",
    ),
    Row(
        "unknown key (unwrap)",
        _valid_token_then(
            lambda h, w: h.unwrap("nosuch", WrappedKey("nosuch", 1, h.wrapped_alpha.blob), w.token)
        ),
        403,
        "denied",
        "unknown_key",
    ),
    Row(
        "unknown key version",
        _valid_token_then(
            lambda h, w: h.unwrap("alpha", WrappedKey("alpha", 7, h.wrapped_alpha.blob), w.token)
        ),
        403,
        "denied",
        "unknown_version",
    ),
    Row(
        "wrapped key of A on B's unwrap route",
        _valid_token_then(lambda h, w: h.unwrap("beta", h.wrapped_alpha, w.token)),
        400,
        None,
        "belongs to another key",
    ),
    Row(
        "wrapped key of A relabelled as B",
        _valid_token_then(_relabelled),
        400,
        "error",
        "failed authentication",
    ),
    Row(
        "wrapped key altered",
        _valid_token_then(
            lambda h, w: h.unwrap(
                "alpha",
                WrappedKey(
                    "alpha", 1, bytes([h.wrapped_alpha.blob[0] ^ 1]) + h.wrapped_alpha.blob[1:]
                ),
                w.token,
            )
        ),
        400,
        "error",
        "failed authentication",
    ),
    Row(
        "wrapped key not in text form",
        _valid_token_then(lambda h, w: h.unwrap("alpha", "ppml1:alpha:x:AAAA", w.token)),
        400,
        None,
        "integrity check failed",
    ),
    Row(
        "invalid key name",
        _valid_token_then(lambda h, w: h.datakey("-bad", w.token)),
        400,
        None,
        "invalid key name",
    ),
    Row(
        "unwrap: malformed JSON",
        _raw("/kms/v1/keys/alpha/unwrap", b'{"wrapped_key"', token=True),
        400,
        None,
        "invalid request body",
    ),
    Row(
        "unwrap: wrong type",
        _json("POST", "/kms/v1/keys/alpha/unwrap", {"wrapped_key": 5}, token=True),
        400,
        None,
        "invalid request body",
    ),
    Row(
        "unwrap: extra field",
        _json(
            "POST",
            "/kms/v1/keys/alpha/unwrap",
            {"wrapped_key": "ppml1:alpha:1:AAAA", "version": 2},
            token=True,
        ),
        400,
        None,
        "invalid request body",
    ),
    Row(
        "unwrap: oversized body (declared)",
        _raw("/kms/v1/keys/alpha/unwrap", b"[" * (MAX_BODY_BYTES + 1), token=True),
        413,
        None,
        "413 too_large",
    ),
    Row("unwrap: oversized body (chunked)", _chunked_oversized, 413, None, "413 too_large"),
    # Authenticate first: from nobody, a malformed or oversized body is 401 (never 400 or 413,
    # which would show the body was read).
    Row(
        "unwrap: malformed JSON without a token",
        _raw("/kms/v1/keys/alpha/unwrap", b'{"wrapped_key"'),
        401,
        "denied",
        "token_rejected",
    ),
    Row(
        "unwrap: oversized body without a token",
        _raw("/kms/v1/keys/alpha/unwrap", b"[" * (MAX_BODY_BYTES + 1)),
        401,
        "denied",
        "token_rejected",
    ),
]

ADMIN_ROWS = [
    Row(
        "admin: list keys without client cert",
        _json("GET", "/kms/v1/keys", None),
        401,
        None,
        "401 no_admin_certificate",
    ),
    Row(
        "admin: create key without client cert",
        _json("POST", "/kms/v1/keys", {"name": "intruder"}),
        401,
        None,
        "401 no_admin_certificate",
    ),
    Row(
        "admin: set policy without client cert",
        _json(
            "PUT", "/kms/v1/keys/alpha/policy", {"rules": [{"tee": "sim", "measurement": M_OTHER}]}
        ),
        401,
        None,
        "401 no_admin_certificate",
    ),
    Row(
        "admin: read policy without client cert",
        _json("GET", "/kms/v1/keys/alpha/policy", None),
        401,
        None,
        "401 no_admin_certificate",
    ),
    Row(
        "admin: read audit without client cert",
        _json("GET", "/kms/v1/audit", None),
        401,
        None,
        "401 no_admin_certificate",
    ),
    Row(
        "admin: malformed body without client cert",
        _raw("/kms/v1/keys", b'{"name": '),
        401,
        None,
        "401 no_admin_certificate",
    ),
    Row(
        "admin: oversized body without client cert",
        _raw("/kms/v1/keys", b" " * (MAX_BODY_BYTES * 2)),
        401,
        None,
        "401 no_admin_certificate",
    ),
    Row(
        "admin: a serving client's certificate (same CA)",
        _admin_tls("serving_client_admin"),
        401,
        None,
        "401 no_admin_certificate",
    ),
    Row("admin: interactive docs (a CDN's script)", _json("GET", "/docs", None), 404, None, ""),
    Row("admin: client cert from another CA", _admin_tls("foreign_admin"), TLS_REFUSED, None, ""),
    Row(
        "admin: server cert as client cert", _admin_tls("server_cert_admin"), TLS_REFUSED, None, ""
    ),
    Row(
        "admin: policy rule of wrong type",
        _json(
            "PUT",
            "/kms/v1/keys/alpha/policy",
            {"rules": [{"tee": "sim", "measurement": M_OTHER, "debug_ok": "yes"}]},
            client="admin",
        ),
        400,
        None,
        "invalid request body",
    ),
    Row(
        "admin: policy rule with extra field",
        _json(
            "PUT",
            "/kms/v1/keys/alpha/policy",
            {"rules": [{"tee": "sim", "measurement": M_OTHER, "pcr": 1}]},
            client="admin",
        ),
        400,
        None,
        "invalid request body",
    ),
    Row(
        "admin: policy for unknown key",
        _json(
            "PUT",
            "/kms/v1/keys/nosuch/policy",
            {"rules": [{"tee": "sim", "measurement": M_OTHER}]},
            client="admin",
        ),
        404,
        "denied",
        "unknown_key",
    ),
    Row(
        "admin: policy with bad measurement",
        _json(
            "PUT",
            "/kms/v1/keys/alpha/policy",
            {"rules": [{"tee": "sim", "measurement": "zz"}]},
            client="admin",
        ),
        400,
        None,
        "invalid measurement",
    ),
    Row(
        "admin: create existing key",
        _json("POST", "/kms/v1/keys", {"name": "alpha"}, client="admin"),
        409,
        "denied",
        "key exists",
    ),
    Row(
        "admin: oversized body",
        _raw("/kms/v1/keys", b" " * (MAX_BODY_BYTES * 2), admin=True),
        413,
        None,
        "413 too_large",
    ),
]

ROWS = ATTESTATION_ROWS + TOKEN_ROWS + POLICY_ROWS + ADMIN_ROWS


def _spliced(h: Harness) -> str:
    """The header and signature of a valid token around another token's payload."""
    a, b = h.attest(M_OTHER).token, h.attest(M_ALPHA).token
    header, _, signature = a.split(".")
    spliced = ".".join((header, b.split(".")[1], signature))
    h.secrets.append(spliced)
    return spliced


@pytest.mark.parametrize("row", ROWS, ids=[r.case for r in ROWS])
def test_attack_is_refused(harness: Harness, row: Row, caplog: pytest.LogCaptureFixture) -> None:
    before = harness.audit_seq()
    keys_before = {k.name for k in harness.services.keys.list_keys()}
    if row.status == TLS_REFUSED:
        with pytest.raises(httpx.TransportError):
            row.attack(harness)
        return
    response = row.attack(harness)
    assert response.status_code == row.status, (row.case, response.status_code, response.text)
    assert response.json() == {"error": CATALOGUE[row.status]}
    assert "sealed_key" not in response.text
    assert row.why in caplog.text, caplog.text
    new = [e for e in harness.services.keys.audit.entries() if e.seq > before]
    if row.audit is None:
        assert [e for e in new if e.op.startswith("release")] == []
    else:
        assert new, f"{row.case}: no audit record"
        assert all(e.outcome == row.audit for e in new), [e.to_dict() for e in new]
    assert {k.name for k in harness.services.keys.list_keys()} == keys_before


# -- the positive rows -------------------------------------------------------------------------


def test_allowed_workload_gets_a_data_key_and_unwraps_it(harness: Harness) -> None:
    w = harness.attest(M_ALPHA)
    before = harness.audit_seq()
    r = harness.datakey("alpha", w.token)
    assert r.status_code == 200, r.text
    released = ReleasedKey.from_dict(r.json())
    assert released.purpose == "datakey" and released.wrapped.key_name == "alpha"
    key = open_released(released, w.private, purpose="datakey")
    harness.remember(key)
    assert harness.services.keys.unwrap(released.wrapped) == key.plaintext
    # The same wrapped key back through unwrap: the same data key, sealed afresh.
    r = harness.unwrap("alpha", released.wrapped, w.token)
    assert r.status_code == 200, r.text
    again = ReleasedKey.from_dict(r.json())
    assert again.sealed_key != released.sealed_key
    unwrapped = open_released(again, w.private, purpose="unwrap", wrapped=released.wrapped)
    assert unwrapped.plaintext == key.plaintext
    ops = [(e.op, e.outcome) for e in harness.services.keys.audit.entries() if e.seq > before]
    assert ops == [("release_datakey", "ok"), ("unwrap", "ok"), ("release_unwrap", "ok")]


def test_allowed_workload_unwraps_the_owners_file_key(harness: Harness) -> None:
    w = harness.attest(M_ALPHA)
    r = harness.unwrap("alpha", harness.wrapped_alpha, w.token)
    assert r.status_code == 200, r.text
    plaintext = open_released(
        ReleasedKey.from_dict(r.json()), w.private, wrapped=harness.wrapped_alpha
    ).plaintext
    assert plaintext == harness.services.keys.unwrap(harness.wrapped_alpha)


def test_a_sealed_key_opens_only_with_the_workloads_private_key(harness: Harness) -> None:
    w, other = harness.attest(M_ALPHA), harness.attest(M_ALPHA)
    released = ReleasedKey.from_dict(harness.datakey("alpha", w.token).json())
    with pytest.raises(IntegrityError):
        open_released(released, other.private)


def test_unknown_key_looks_like_a_policy_denial(harness: Harness) -> None:
    allowed_elsewhere = harness.attest(M_BETA)
    denied = harness.datakey("alpha", allowed_elsewhere.token)
    unknown = harness.datakey("no-such-key", allowed_elsewhere.token)
    assert denied.status_code == unknown.status_code == 403
    assert denied.content == unknown.content
    assert {k: v for k, v in denied.headers.items() if k != "date"} == {
        k: v for k, v in unknown.headers.items() if k != "date"
    }


def test_administrator_manages_keys_policies_and_reads_the_audit(harness: Harness) -> None:
    admin = harness.admin
    r = admin.post("/kms/v1/keys", json={"name": "gamma"})
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "gamma" and r.json()["current_version"] == 1
    rules = [{"tee": "sim", "measurement": M_OTHER, "debug_ok": True, "min_tcb": "UpToDate"}]
    r = admin.put("/kms/v1/keys/gamma/policy", json={"rules": rules})
    assert r.status_code == 200, r.text
    assert r.json() == {"key": "gamma", "rules": rules}
    assert admin.get("/kms/v1/keys/gamma/policy").json() == {"key": "gamma", "rules": rules}
    names = [k["name"] for k in admin.get("/kms/v1/keys").json()]
    assert {"alpha", "beta", "gamma"} <= set(names)
    audit = admin.get("/kms/v1/audit", params={"limit": 2})
    assert audit.status_code == 200
    assert [(e["op"], e["key_name"], e["outcome"]) for e in audit.json()] == [
        ("create", "gamma", "ok"),
        ("policy_set", "gamma", "ok"),
    ]
    # The new policy is in force at once: the debug workload it names gets gamma's key.
    w = harness.attest(M_OTHER, debug=True)
    r = harness.datakey("gamma", w.token)
    assert r.status_code == 200, r.text
    harness.remember(open_released(ReleasedKey.from_dict(r.json()), w.private))


def test_health_and_openapi(harness: Harness) -> None:
    assert harness.client.get("/healthz").json() == {"status": "ok"}
    spec = harness.client.get("/openapi.json")
    assert spec.status_code == 200
    paths = spec.json()["paths"]
    assert set(paths) >= {
        "/healthz",
        "/attestation/v1/challenge",
        "/attestation/v1/attest",
        "/kms/v1/keys",
        "/kms/v1/keys/{name}/datakey",
        "/kms/v1/keys/{name}/unwrap",
        "/kms/v1/keys/{name}/policy",
        "/kms/v1/audit",
    }
    assert harness.client.get("/no/such/route").json() == {"error": "not found"}


# -- floods from one client ----------------------------------------------------------------------


def _from(h: Harness, address: str, url: str | None = None) -> httpx.Client:
    """A client whose connections come from `address` (any 127.x.y.z reaches loopback)."""
    context = _context(h.ws.ca_cert)
    transport = httpx.HTTPTransport(verify=context, local_address=address)
    return httpx.Client(base_url=url or h.url, transport=transport, timeout=30.0)


def test_a_challenge_flood_does_not_lock_out_other_workloads(harness: Harness) -> None:
    """The finding: 10,000 challenges from one client blocked every attestation for 60 s."""
    with _from(harness, "127.0.0.2") as attacker:
        statuses = [attacker.post("/attestation/v1/challenge") for _ in range(200)]
    codes = [r.status_code for r in statuses]
    assert codes[:64] == [200] * 64  # the per-client quota of outstanding challenges
    assert set(codes[64:]) == {429}
    assert statuses[-1].json() == {"error": "too many requests"}
    assert statuses[-1].headers["retry-after"] == "1"
    w = harness.attest(M_ALPHA)  # another client attests at once
    r = harness.datakey("alpha", w.token)
    assert r.status_code == 200, r.text
    harness.remember(open_released(ReleasedKey.from_dict(r.json()), w.private))


def test_refused_release_calls_hit_a_quota_and_are_audited_sparingly(harness: Harness) -> None:
    """The findings: ~230 audit rows/s from one unauthenticated client, burying real events.
    Against a server with the default sparse audit: one record (and a count), then 429s that
    never reach the broker; another client's release is audited in full."""
    services = services_for(harness.ws, actor="server")
    try:
        with serving(create_app(services), tls_files_for(harness.ws)) as server:
            before = harness.audit_seq()
            with _from(harness, "127.0.0.3", server.url) as attacker:
                codes = [
                    attacker.post(
                        "/kms/v1/keys/alpha/datakey", headers=_bearer("x.y.z")
                    ).status_code
                    for _ in range(120)
                ]
            assert codes[:50] == [401] * 50
            assert set(codes[50:]) == {429}
            flood = [e for e in services.keys.audit.entries() if e.seq > before]
            assert [(e.op, e.outcome, e.detail.get("client")) for e in flood] == [
                ("release_datakey", "denied", "127.0.0.3")
            ]
            w = harness.attest(M_ALPHA)
            with httpx.Client(
                base_url=server.url, verify=_context(harness.ws.ca_cert), timeout=30.0
            ) as workload:
                r = workload.post("/kms/v1/keys/alpha/datakey", headers=_bearer(w.token))
            assert r.status_code == 200, r.text
            harness.remember(open_released(ReleasedKey.from_dict(r.json()), w.private))
            last = services.keys.audit.entries(limit=1)[-1]
            assert (last.op, last.outcome) == ("release_datakey", "ok")
    finally:
        services.close()  # the refusals left out are counted in one record
    counted = services_for(harness.ws, actor="server")
    try:
        record = counted.keys.audit.entries(limit=1)[-1]
        assert record.detail["suppressed"] == 49 and record.detail["client"] == "127.0.0.3"
    finally:
        counted.close()


def test_every_answer_carries_the_security_headers(harness: Harness) -> None:
    for response in (
        harness.client.get("/healthz"),
        harness.client.get("/kms/v1/keys"),
        harness.admin.get("/kms/v1/keys"),
        harness.client.post("/attestation/v1/challenge"),
    ):
        assert response.headers["content-security-policy"] == (
            "default-src 'none'; frame-ancestors 'none'"
        )
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["cache-control"] == "no-store"


# -- after the whole table ---------------------------------------------------------------------


def test_zz_audit_intact_and_no_secret_in_the_log(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """Runs last (file order): the audit chain verifies, and the server's log -- everything
    "ppml" and "uvicorn" logged during the table -- holds no token, data key or passphrase."""
    verification = harness.services.keys.audit.verify()
    assert verification.ok, verification.reason
    entries = harness.services.keys.audit.entries()
    assert any(e.outcome == "denied" for e in entries)
    log = "\n".join(harness.log) + caplog.text
    assert "refused" in log  # the capture did see the server's log
    audit_text = json.dumps([e.to_dict() for e in entries])
    assert len(harness.secrets) > 20
    for secret in harness.secrets:
        assert secret not in log
        assert secret not in audit_text
