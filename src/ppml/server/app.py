"""The HTTPS API: the attestation service and the KMS, as thin routers over the domain classes.

Workloads authenticate with attestation tokens (bearer); administrators with a client
certificate issued by the workspace CA (checked by the TLS layer, see `ppml.server.tls`). The
routers only translate: every decision is made by `AttestationService`, `KeyBroker` and
`KeyService`, the same objects that serve in-process use.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from pydantic import BaseModel, ConfigDict, Field

from ppml.attestation import AttestationService
from ppml.crypto.envelope import WrappedKey
from ppml.errors import AttestationFailed, UsageError
from ppml.kms import KeyService
from ppml.kms.broker import KeyBroker
from ppml.server.errors import install_error_handlers, refusal

__all__ = ["MAX_BODY_BYTES", "Services", "create_app"]

MAX_BODY_BYTES = 64 * 1024
PEER_CERT_EXTENSION = "ppml.peer_cert"

AdminCheck = Callable[[Request], None]
# Module level: FastAPI resolves (string) annotations in the module's namespace.
Authorization = Annotated[str | None, Header()]


@dataclass(frozen=True)
class Services:
    """What the server exposes. The same objects serve in-process callers."""

    attestation: AttestationService
    broker: KeyBroker
    keys: KeyService


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AttestRequest(_Strict):
    tee: str = Field(max_length=16)
    evidence: str = Field(max_length=48 * 1024, description="base64")
    nonce: str = Field(max_length=128, description="base64")
    public_key: str = Field(max_length=128, description="base64, raw X25519 public key")


class UnwrapRequest(_Strict):
    wrapped_key: str = Field(max_length=8192, description="the file's wrapped data key, text form")


class CreateKeyRequest(_Strict):
    name: str = Field(max_length=128)


class PolicyRule(_Strict):
    tee: str = Field(max_length=16)
    measurement: str = Field(max_length=96)
    debug_ok: bool = False
    min_tcb: str = Field(default="UpToDate", max_length=64)


class PolicyRequest(_Strict):
    rules: list[PolicyRule] = Field(max_length=256)


def _b64(field: str, value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"{field} is not base64") from None


def _bearer(authorization: str | None) -> str:
    if not authorization or not authorization.startswith("Bearer "):
        raise AttestationFailed("no bearer token")
    return authorization.removeprefix("Bearer ").strip()


def require_client_certificate(request: Request) -> None:
    """Administrators: a client certificate verified against the workspace CA by the TLS layer."""
    cert = request.scope.get("extensions", {}).get(PEER_CERT_EXTENSION)
    if not cert:
        raise AttestationFailed("administrator route without a client certificate")


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

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    attestation = APIRouter(prefix="/attestation/v1", tags=["attestation"])

    @attestation.post("/challenge")
    def challenge() -> dict[str, str]:
        c = services.attestation.challenge()
        return {
            "nonce": base64.b64encode(c.nonce).decode(),
            "expires_at": c.expires_at.isoformat(),
        }

    @attestation.post("/attest")
    def attest(body: AttestRequest) -> dict[str, Any]:
        result = services.attestation.attest(
            body.tee,
            _b64("evidence", body.evidence),
            _b64("nonce", body.nonce),
            _b64("public_key", body.public_key),
        )
        return {"token": result.token, "expires_at": result.expires_at.isoformat()}

    kms = APIRouter(prefix="/kms/v1", tags=["kms"])

    @kms.post("/keys/{name}/datakey")
    def datakey(name: str, authorization: Authorization = None) -> dict[str, Any]:
        return services.broker.datakey(name, _bearer(authorization)).to_dict()

    @kms.post("/keys/{name}/unwrap")
    def unwrap(
        name: str, body: UnwrapRequest, authorization: Authorization = None
    ) -> dict[str, Any]:
        wrapped = WrappedKey.from_text(body.wrapped_key)
        if wrapped.key_name != name:
            raise UsageError("the wrapped key belongs to another key")
        return services.broker.unwrap(wrapped, _bearer(authorization)).to_dict()

    admin = APIRouter(
        prefix="/kms/v1", tags=["administration"], dependencies=[Depends(admin_check)]
    )

    @admin.post("/keys")
    def create_key(body: CreateKeyRequest) -> dict[str, Any]:
        return services.keys.create_key(body.name).to_dict()

    @admin.get("/keys")
    def list_keys() -> list[dict[str, Any]]:
        return [k.to_dict() for k in services.keys.list_keys()]

    @admin.put("/keys/{name}/policy")
    def set_policy(name: str, body: PolicyRequest) -> dict[str, Any]:
        rules = [r.model_dump() for r in body.rules]
        return services.broker.set_policy(name, rules)

    @admin.get("/keys/{name}/policy")
    def get_policy(name: str) -> dict[str, Any]:
        return services.broker.get_policy(name)

    @admin.get("/audit")
    def audit(limit: int = 100) -> list[dict[str, Any]]:
        return [e.to_dict() for e in services.keys.audit.entries(limit=max(1, min(limit, 10000)))]

    app.include_router(attestation)
    app.include_router(kms)
    app.include_router(admin)
    return app


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class _BodyLimit:
    """Refuse bodies over MAX_BODY_BYTES (declared or streamed) with 413, before parsing."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and (not value.isdigit() or int(value) > MAX_BODY_BYTES):
                await refusal(413)(scope, receive, send)
                return
        seen = 0

        async def limited() -> MutableMapping[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > MAX_BODY_BYTES:
                raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await refusal(413)(scope, receive, send)


class _TooLarge(Exception):
    pass
