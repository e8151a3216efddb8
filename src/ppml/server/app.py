"""The HTTPS API: the attestation service and the KMS, as thin routers over the domain classes.

The boundary (`ppml.server.boundary`) stands in front of every route: workloads authenticate
the key release routes with attestation tokens (bearer), verified before the body is read;
administrators with the workspace's own client certificate (the TLS layer verifies the chain,
the boundary compares the certificate with the workspace's); the attestation routes are
anonymous and limited per client address. The routers only translate: every decision is made
by `AttestationService`, `KeyBroker` and `KeyService`, the same objects that serve in-process
use.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from hmac import compare_digest
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from ppml.attestation import AttestationService, TokenClaims
from ppml.crypto.envelope import WrappedKey
from ppml.errors import AttestationFailed, UsageError
from ppml.kms import KeyService
from ppml.kms.broker import OP_DATAKEY, OP_UNWRAP, KeyBroker
from ppml.server.boundary import (
    PEER_CERT_EXTENSION,
    Authenticator,
    Boundary,
    Principal,
    RateLimit,
    Refused,
    Rule,
    client_address,
    principal_of,
)
from ppml.server.errors import CATALOGUE, install_error_handlers

__all__ = [
    "MAX_BODY_BYTES",
    "PEER_CERT_EXTENSION",
    "ServiceLimits",
    "Services",
    "create_app",
    "pinned_certificates",
]

MAX_BODY_BYTES = 64 * 1024

_log = logging.getLogger("ppml.server")

# For the OpenAPI document only: the boundary verifies the token before the route runs.
_bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="attestationToken",
    description="An attestation token from POST /attestation/v1/attest.",
)
# Module level: FastAPI resolves (string) annotations in the module's namespace.
Authorization = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer_scheme)]


@dataclass(frozen=True)
class Services:
    """What the server exposes. The same objects serve in-process callers.

    `admin_certificates`: the DER of the client certificates that administer (the workspace's
    own, `tls/client.pem`); none: no one administers over HTTPS."""

    attestation: AttestationService
    broker: KeyBroker
    keys: KeyService
    admin_certificates: tuple[bytes, ...] = field(default=(), repr=False)

    def close(self) -> None:
        """Record the refusals counted but not yet recorded, then close the key store."""
        try:
            self.broker.flush()
        finally:
            self.keys.close()


_PER_ADDRESS = RateLimit(500.0, 1000)
_PER_TOKEN = RateLimit(500.0, 1000)
_PER_ADMIN = RateLimit(500.0, 1000)
_REFUSALS = RateLimit(2.0, 50)


@dataclass(frozen=True)
class ServiceLimits:
    """The rate limits of `ppml serve`: challenges and attestations per client address, key
    releases per token, administration per certificate, and refused calls (401, 403) per client
    address, after which that address's calls are refused (429) without reaching the service."""

    challenge: RateLimit = _PER_ADDRESS
    attest: RateLimit = _PER_ADDRESS
    release: RateLimit = _PER_TOKEN
    admin: RateLimit = _PER_ADMIN
    refusals: RateLimit = _REFUSALS


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


def _bearer(scope: Mapping[str, Any]) -> str:
    """The bearer token of a request, or "" when there is none."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


def pinned_certificates(certificates: tuple[bytes, ...]) -> Authenticator:
    """Authenticates a client certificate (already verified against the workspace CA by the
    TLS layer) that is one of `certificates` (DER), compared by SHA-256."""
    pins = tuple(hashlib.sha256(c).digest() for c in certificates)

    async def authenticate(scope: Any) -> Principal:
        cert = scope.get("extensions", {}).get(PEER_CERT_EXTENSION)
        if cert:
            digest = hashlib.sha256(cert).digest()
            if any(compare_digest(digest, pin) for pin in pins):
                return Principal("certificate", "administrator")
        raise Refused(401, "no_admin_certificate")

    return authenticate


def _token_authenticator(broker: KeyBroker, op: str) -> Authenticator:
    """Authenticates a key release by its bearer token (the broker verifies and audits)."""
    from starlette.concurrency import run_in_threadpool

    async def authenticate(scope: Any) -> Principal:
        token = _bearer(scope)  # an oversized one is refused by the broker
        path = str(scope.get("path", ""))
        key_name = path.split("/")[4] if path.count("/") >= 5 else None
        # A token that verifies (cached after its first use) costs microseconds: checked on the
        # event loop. A refusal is audited, which writes: that goes to a worker thread.
        claims = broker.claims_of(token)
        if claims is None:
            try:
                claims = await run_in_threadpool(
                    broker.authenticate, op, key_name, token, client=client_address(scope)
                )
            except AttestationFailed:
                raise Refused(401, "token_refused") from None
        return Principal("token", str(claims.token_id), claims)

    return authenticate


def _refusals(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the catalogue refusals a route can answer."""
    return {s: {"model": RefusalResponse, "description": CATALOGUE[s]} for s in statuses}


def _claims(request: Request) -> TokenClaims:
    principal = principal_of(request.scope)
    if principal is None or not isinstance(principal.claims, TokenClaims):
        raise AttestationFailed("a release route without a verified token")
    return principal.claims


def create_app(
    services: Services,
    *,
    admin: Authenticator | None = None,
    limits: ServiceLimits | None = None,
) -> FastAPI:
    """The FastAPI application over `services`, behind the boundary. `admin`: how administrators
    authenticate (default: `pinned_certificates(services.admin_certificates)`)."""
    limits = limits or ServiceLimits()
    admin = admin or pinned_certificates(services.admin_certificates)
    # No interactive docs: they would load third-party script on this origin. The OpenAPI
    # document is served, and docs/api.md describes every route.
    app = FastAPI(
        title="ppml attestation service and KMS",
        version="1",
        description="Attestation-gated key release. See docs/api.md.",
        docs_url=None,
        redoc_url=None,
        # No redirect to the path without its trailing slash: it would answer before the
        # boundary authenticates, with a Location built from the client's Host header.
        redirect_slashes=False,
    )
    install_error_handlers(app)
    # The catalogue text only: which check failed is in the server's log, never in the answer.
    app.add_middleware(
        Boundary,
        rules=_boundary_rules(services, admin, limits),
        default_body=MAX_BODY_BYTES,
        reasons=False,
    )

    @app.get("/healthz", response_model=HealthResponse)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    app.include_router(_attestation_router(services))
    app.include_router(_release_router(services))
    app.include_router(_admin_router(services))
    return app


def _boundary_rules(services: Services, admin: Authenticator, limits: ServiceLimits) -> list[Rule]:
    """Who may call which route, how often, with how large a body."""
    key = r"[^/]{1,256}"
    return [
        Rule("public", r"/healthz|/openapi\.json", frozenset({"GET", "HEAD"})),
        Rule(
            "challenge",
            r"/attestation/v1/challenge",
            frozenset({"POST"}),
            limit=limits.challenge,
            max_body=1024,  # no body is needed; clients send `{}`
        ),
        Rule(
            "attest",
            r"/attestation/v1/attest",
            frozenset({"POST"}),
            limit=limits.attest,
            refusals=limits.refusals,
            max_body=MAX_BODY_BYTES,
        ),
        *(
            Rule(
                route,
                rf"/kms/v1/keys/{key}/{route}",
                frozenset({"POST"}),
                authenticate=_token_authenticator(services.broker, op),
                limit=limits.release,
                refusals=limits.refusals,
                max_body=MAX_BODY_BYTES,
            )
            for route, op in (("datakey", OP_DATAKEY), ("unwrap", OP_UNWRAP))
        ),
        Rule(
            "admin",
            rf"/kms/v1/keys|/kms/v1/keys/{key}/policy|/kms/v1/audit",
            authenticate=admin,
            limit=limits.admin,
            refusals=limits.refusals,
            max_body=MAX_BODY_BYTES,
        ),
    ]


def _attestation_router(services: Services) -> APIRouter:
    attestation = APIRouter(
        prefix="/attestation/v1", tags=["attestation"], responses=_refusals(400, 413)
    )

    @attestation.post("/challenge", response_model=ChallengeResponse, responses=_refusals(401, 429))
    def challenge(request: Request) -> dict[str, str]:
        c = services.attestation.challenge(client_address(request.scope))
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

    return attestation


def _release_router(services: Services) -> APIRouter:
    """The attested workloads' routes: a token from /attest authenticates them."""
    kms = APIRouter(prefix="/kms/v1", tags=["kms"], responses=_refusals(400, 401, 403, 413, 429))

    @kms.post("/keys/{name}/datakey", response_model=ReleasedKeyResponse)
    def datakey(name: str, request: Request, _: Authorization = None) -> dict[str, Any]:
        return services.broker.datakey(name, claims=_claims(request)).to_dict()

    @kms.post("/keys/{name}/unwrap", response_model=ReleasedKeyResponse)
    def unwrap(
        name: str, body: UnwrapRequest, request: Request, _: Authorization = None
    ) -> dict[str, Any]:
        claims = _claims(request)
        wrapped = WrappedKey.from_text(body.wrapped_key)
        if wrapped.key_name != name:
            raise UsageError("the wrapped key belongs to another key")
        return services.broker.unwrap(wrapped, claims=claims).to_dict()

    return kms


def _admin_router(services: Services) -> APIRouter:
    """The administrators' routes: keys, release policies, the audit log."""
    admin_routes = APIRouter(
        prefix="/kms/v1",
        tags=["administration"],
        responses=_refusals(400, 401, 404, 413, 429),
    )

    @admin_routes.post("/keys", response_model=KeyResponse, responses=_refusals(409))
    def create_key(body: CreateKeyRequest) -> dict[str, Any]:
        return services.keys.create_key(body.name).to_dict()

    @admin_routes.get("/keys", response_model=list[KeyResponse])
    def list_keys() -> list[dict[str, Any]]:
        return [k.to_dict() for k in services.keys.list_keys()]

    @admin_routes.put("/keys/{name}/policy", response_model=PolicyResponse)
    def set_policy(name: str, body: PolicyRequest) -> dict[str, Any]:
        rules = [_rule_dict(r) for r in body.rules]
        return services.broker.set_policy(name, rules)

    @admin_routes.get("/keys/{name}/policy", response_model=PolicyResponse)
    def get_policy(name: str) -> dict[str, Any]:
        return services.broker.get_policy(name)

    @admin_routes.get("/audit", response_model=list[AuditEntryResponse])
    def audit(limit: int = 100) -> list[dict[str, Any]]:
        return [e.to_dict() for e in services.keys.audit.entries(limit=max(1, min(limit, 10000)))]

    return admin_routes
