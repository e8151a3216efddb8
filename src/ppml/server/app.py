"""The HTTPS API: the attestation service and the KMS, as thin routers over the domain classes.

Workloads authenticate with attestation tokens (bearer); administrators with a client
certificate issued by the workspace CA (checked by the TLS layer, see `ppml.server.tls`). The
routers only translate: every decision is made by `AttestationService`, `KeyBroker` and
`KeyService`, the same objects that serve in-process use.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from ppml.attestation import AttestationService
from ppml.crypto.envelope import WrappedKey
from ppml.errors import AttestationFailed, UsageError
from ppml.kms import KeyService
from ppml.kms.broker import KeyBroker
from ppml.server.errors import CATALOGUE, install_error_handlers, refusal

__all__ = ["MAX_BODY_BYTES", "Services", "create_app"]

MAX_BODY_BYTES = 64 * 1024
PEER_CERT_EXTENSION = "ppml.peer_cert"

_log = logging.getLogger("ppml.server")

AdminCheck = Callable[[Request], None]
_bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="attestationToken",
    description="An attestation token from POST /attestation/v1/attest.",
)
# Module level: FastAPI resolves (string) annotations in the module's namespace.
Authorization = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer_scheme)]


@dataclass(frozen=True)
class Services:
    """What the server exposes. The same objects serve in-process callers."""

    attestation: AttestationService
    broker: KeyBroker
    keys: KeyService


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class AttestRequest(_Strict):
    tee: str = Field(max_length=16, description="TEE type: sim, sgx, tdx or snp")
    evidence: str = Field(max_length=48 * 1024, description="the TEE's evidence, base64")
    nonce: str = Field(max_length=128, description="the challenge nonce, base64")
    public_key: str = Field(max_length=128, description="raw X25519 public key (32 bytes), base64")


class UnwrapRequest(_Strict):
    wrapped_key: str = Field(
        max_length=8192, description="the file's wrapped data key, text form ppml1:NAME:VERSION:B64"
    )


class CreateKeyRequest(_Strict):
    name: str = Field(max_length=128)


class PolicyRule(_Strict):
    tee: str = Field(max_length=16)
    measurement: str = Field(max_length=96, description="64 or 96 lowercase hex digits")
    debug_ok: bool = False
    min_tcb: str = Field(default="UpToDate", max_length=64)
    # Optional reference values of the rule's TEE type (see ppml.kms.policy).
    mr_signer: str | None = Field(default=None, max_length=64)
    isv_prod_id: int | None = None
    min_isv_svn: int | None = None
    mr_seam: str | None = Field(default=None, max_length=96)
    rtmr0: str | None = Field(default=None, max_length=96)
    rtmr1: str | None = Field(default=None, max_length=96)
    rtmr2: str | None = Field(default=None, max_length=96)
    rtmr3: str | None = Field(default=None, max_length=96)
    migration_agent_ok: bool = True
    smt_ok: bool = True
    min_reported_tcb: dict[str, int] | None = Field(default=None, max_length=5)


class PolicyRequest(_Strict):
    rules: list[PolicyRule] = Field(max_length=256)


class ChallengeResponse(BaseModel):
    nonce: str = Field(description="32 random bytes, base64; single use")
    expires_at: str = Field(description="ISO 8601, UTC")


class AttestResponse(BaseModel):
    token: str = Field(description="ES256 JWT (see docs/api.md)")
    expires_at: str = Field(description="ISO 8601, UTC")


class ReleasedKeyResponse(BaseModel):
    wrapped_key: str = Field(description="the data key wrapped by the named key, text form")
    sealed_key: str = Field(description="HPKE-sealed data key, base64: enc (32) || ciphertext")
    purpose: str = Field(description="datakey or unwrap")


class KeyVersionResponse(BaseModel):
    version: int
    created_at: str


class KeyResponse(BaseModel):
    name: str
    created_at: str
    current_version: int
    versions: list[KeyVersionResponse]


class PolicyResponse(BaseModel):
    key: str
    rules: list[dict[str, Any]] = Field(
        description="rules as in PolicyRule; optional fields only when set"
    )


class AuditEntryResponse(BaseModel):
    seq: int
    ts: str
    actor: str
    op: str
    key_name: str | None
    version: int | None
    outcome: str
    detail: dict[str, Any]


class HealthResponse(BaseModel):
    status: str


class RefusalResponse(BaseModel):
    error: str = Field(description="one of the fixed catalogue texts")


def _rule_dict(rule: PolicyRule) -> dict[str, Any]:
    """A rule as `Rule.from_dict` reads it: the base fields always, optional ones when set."""
    base = {"tee", "measurement", "debug_ok", "min_tcb"}
    return {
        k: v
        for k, v in rule.model_dump().items()
        if k in base or k in rule.model_fields_set or v != PolicyRule.model_fields[k].default
    }


def _b64(field: str, value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"{field} is not base64") from None


def _bearer(credentials: HTTPAuthorizationCredentials | None) -> str:
    """The bearer token, or "" when there is none: the key broker refuses (and audits) that
    like any other token that does not verify."""
    return credentials.credentials.strip() if credentials is not None else ""


def require_client_certificate(request: Request) -> None:
    """Administrators: a client certificate verified against the workspace CA by the TLS layer."""
    cert = request.scope.get("extensions", {}).get(PEER_CERT_EXTENSION)
    if not cert:
        raise AttestationFailed("administrator route without a client certificate")


def _refusals(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the catalogue refusals a route can answer."""
    return {s: {"model": RefusalResponse, "description": CATALOGUE[s]} for s in statuses}


def create_app(
    services: Services, *, admin_check: AdminCheck = require_client_certificate
) -> FastAPI:
    """The FastAPI application over `services`."""
    app = FastAPI(
        title="ppml attestation service and KMS",
        version="1",
        description="Attestation-gated key release. See docs/api.md.",
    )
    install_error_handlers(app)
    app.add_middleware(_BodyLimit)

    @app.get("/healthz", response_model=HealthResponse)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    attestation = APIRouter(
        prefix="/attestation/v1", tags=["attestation"], responses=_refusals(400, 413)
    )

    @attestation.post("/challenge", response_model=ChallengeResponse, responses=_refusals(401))
    def challenge() -> dict[str, str]:
        c = services.attestation.challenge()
        return {
            "nonce": base64.b64encode(c.nonce).decode(),
            "expires_at": c.expires_at.isoformat(),
        }

    @attestation.post("/attest", response_model=AttestResponse, responses=_refusals(401))
    def attest(body: AttestRequest) -> dict[str, Any]:
        result = services.attestation.attest(
            body.tee,
            _b64("evidence", body.evidence),
            _b64("nonce", body.nonce),
            _b64("public_key", body.public_key),
        )
        return {"token": result.token, "expires_at": result.expires_at.isoformat()}

    kms = APIRouter(prefix="/kms/v1", tags=["kms"], responses=_refusals(400, 401, 403, 413))

    @kms.post("/keys/{name}/datakey", response_model=ReleasedKeyResponse)
    def datakey(name: str, authorization: Authorization = None) -> dict[str, Any]:
        return services.broker.datakey(name, _bearer(authorization)).to_dict()

    @kms.post("/keys/{name}/unwrap", response_model=ReleasedKeyResponse)
    def unwrap(
        name: str, body: UnwrapRequest, authorization: Authorization = None
    ) -> dict[str, Any]:
        wrapped = WrappedKey.from_text(body.wrapped_key)
        if wrapped.key_name != name:
            raise UsageError("the wrapped key belongs to another key")
        return services.broker.unwrap(wrapped, _bearer(authorization)).to_dict()

    admin = APIRouter(
        prefix="/kms/v1",
        tags=["administration"],
        dependencies=[Depends(admin_check)],
        responses=_refusals(400, 401, 404, 413),
    )

    @admin.post("/keys", response_model=KeyResponse, responses=_refusals(409))
    def create_key(body: CreateKeyRequest) -> dict[str, Any]:
        return services.keys.create_key(body.name).to_dict()

    @admin.get("/keys", response_model=list[KeyResponse])
    def list_keys() -> list[dict[str, Any]]:
        return [k.to_dict() for k in services.keys.list_keys()]

    @admin.put("/keys/{name}/policy", response_model=PolicyResponse)
    def set_policy(name: str, body: PolicyRequest) -> dict[str, Any]:
        rules = [_rule_dict(r) for r in body.rules]
        return services.broker.set_policy(name, rules)

    @admin.get("/keys/{name}/policy", response_model=PolicyResponse)
    def get_policy(name: str) -> dict[str, Any]:
        return services.broker.get_policy(name)

    @admin.get("/audit", response_model=list[AuditEntryResponse])
    def audit(limit: int = 100) -> list[dict[str, Any]]:
        return [e.to_dict() for e in services.keys.audit.entries(limit=max(1, min(limit, 10000)))]

    app.include_router(attestation)
    app.include_router(kms)
    app.include_router(admin)
    return app


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _BodyLimit:
    """Refuse bodies over MAX_BODY_BYTES with 413 before anything parses them.

    A declared Content-Length is checked first; a streamed (chunked) body is read here, up to
    the limit, and replayed to the application, so the route never sees a partial body and the
    refusal is 413 however the body was sent.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and (not value.isdigit() or int(value) > MAX_BODY_BYTES):
                await _too_large(scope, receive, send)
                return
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body = message.get("body", b"")
            seen += len(body)
            if seen > MAX_BODY_BYTES:
                await _too_large(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


async def _too_large(scope: Scope, receive: Receive, send: Send) -> None:
    _log.info(
        "refused %s %r: 413: body over %d bytes",
        scope.get("method"),
        scope.get("path"),
        MAX_BODY_BYTES,
    )
    await refusal(413)(scope, receive, send)
