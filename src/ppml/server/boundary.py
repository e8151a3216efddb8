"""The HTTP boundary of every ppml service (`ppml serve` and the serving front end), written once.

Every request passes, in this order, before the application sees a byte of its body:

1. the route's **rule** (the first whose method and path pattern match; a path no rule names is
   left to the application, which answers 404 or 405);
2. the **refusal quota** of the client's address for the rule (too many refused calls: 429);
3. **authentication** (a client certificate verified against the workspace CA, an attestation
   token, or none for an anonymous route): 401 before the body is read or parsed;
4. the **rate limit** of the rule, per client (the authenticated name, else the address): 429
   with Retry-After;
5. the **body limit**: a declared Content-Length, or a streamed body read up to the limit
   (413), then replayed to the application.

Every answer carries the security headers (a Content-Security-Policy that allows nothing, no
sniffing, no framing, no referrer, no caching). Refusals come from one catalogue: the body is
``{"error": <fixed text>}`` plus, where the service says so, a ``reason`` that never quotes the
request.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse

from ppml._internal.clock import MonotonicClock
from ppml.errors import UsageError

__all__ = [
    "CATALOGUE",
    "PEER_CERT_EXTENSION",
    "PRINCIPAL",
    "SECURITY_HEADERS",
    "Authenticator",
    "Boundary",
    "Principal",
    "RateLimit",
    "Refused",
    "Rule",
    "TokenBucket",
    "principal_of",
    "refusal_response",
]

_log = logging.getLogger("ppml.server")

PEER_CERT_EXTENSION = "ppml.peer_cert"
PRINCIPAL = "ppml.principal"

CATALOGUE: dict[int, str] = {
    400: "bad request",
    401: "unauthorized",
    403: "forbidden",
    404: "not found",
    405: "method not allowed",
    409: "conflict",
    413: "request too large",
    429: "too many requests",
    500: "internal error",
    503: "service unavailable",
    504: "timeout",
}

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (b"strict-transport-security", b"max-age=31536000"),
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Refused(Exception):
    """A refusal: `status` (in the catalogue), `code` (for metrics and logs), `reason` (for the
    client, or None to send only the catalogue text)."""

    def __init__(
        self,
        status: int,
        code: str,
        reason: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(reason or CATALOGUE.get(status, "refused"))
        if status not in CATALOGUE:
            raise ValueError(f"status {status} is not in the refusal catalogue")
        self.status = status
        self.code = code
        self.reason = reason
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def response(self) -> JSONResponse:
        return refusal_response(self.status, self.reason, headers=self.headers, extra=self.extra)


def refusal_response(
    status: int,
    reason: str | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> JSONResponse:
    """The catalogue's answer for `status`, with `reason` when the service gives one."""
    body: dict[str, Any] = {"error": CATALOGUE[status]}
    if reason is not None:
        body["reason"] = reason
    body.update(extra or {})
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made a request: `kind` is "certificate" (the name is the certificate's common name)
    or "token" (the name is the token's id); `claims` holds what the authenticator verified."""

    kind: str
    name: str
    claims: Any = field(default=None, compare=False, repr=False)


def principal_of(scope: Mapping[str, Any]) -> Principal | None:
    """The request's authenticated principal (None on an anonymous route)."""
    value = scope.get("extensions", {}).get(PRINCIPAL)
    return value if isinstance(value, Principal) else None


Authenticator = Callable[[Scope], Awaitable[Principal]]
"""Checks a request's credentials (never its body): the principal, or `Refused(401)`."""


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket: `rate` requests per second on average, bursts of up to `burst`."""

    rate: float
    burst: int

    def __post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)) or self.burst < 1:
            raise UsageError("a rate limit needs rate > 0 and burst >= 1")


class TokenBucket:
    """Thread-safe token bucket; `take()` is 0.0 when granted, else the seconds to wait."""

    def __init__(self, limit: RateLimit, clock: MonotonicClock = time.monotonic) -> None:
        self._rate = limit.rate
        self._burst = float(limit.burst)
        self._clock = clock
        self._tokens = self._burst
        self._last = clock()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now

    def take(self) -> float:
        with self._lock:
            self._refill()
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return 0.0
            return (1.0 - self._tokens) / self._rate

    def wait(self) -> float:
        """The seconds until a token is there (0.0: one is), without taking it."""
        with self._lock:
            self._refill()
            return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) / self._rate


class _Buckets:
    """One bucket per (rule, client), bounded: the least recently used are forgotten (a
    forgotten bucket is a full one, the state a client returns to by waiting)."""

    def __init__(self, limit: RateLimit, clock: MonotonicClock, capacity: int = 65_536) -> None:
        self._limit, self._clock, self._capacity = limit, clock, capacity
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, client: str) -> TokenBucket:
        with self._lock:
            bucket = self._buckets.get(client)
            if bucket is None:
                bucket = self._buckets[client] = TokenBucket(self._limit, self._clock)
                if len(self._buckets) > self._capacity:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(client)
            return bucket


@dataclass(frozen=True, slots=True)
class Rule:
    """How requests to one group of routes pass the boundary.

    `path`: a regular expression the whole path must match; `methods`: None for any.
    `authenticate`: None for an anonymous route. `limit`: per client. `refusals`: how many
    refused calls (401 or 403) a client address may make before its calls are refused with 429
    unseen by the application. `max_body`: bytes.
    """

    name: str
    path: str
    methods: frozenset[str] | None = None
    authenticate: Authenticator | None = None
    limit: RateLimit | None = None
    refusals: RateLimit | None = None
    max_body: int = 64 * 1024
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_regex", re.compile(self.path))
        if self.max_body < 0:
            raise UsageError("max_body must be >= 0")

    def matches(self, method: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        return self._regex.fullmatch(path) is not None


OnRefused = Callable[[Scope, Refused], None]


def client_address(scope: Mapping[str, Any]) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class Boundary:
    """ASGI middleware: the checks above, for `rules`; outermost in the application.

    `default_body`: the body limit of a path no rule names. `on_refused` is told of every
    refusal made here (metrics). `reasons`: whether a refusal tells the client why (else the
    catalogue text only; the reason is in the log either way).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        rules: Sequence[Rule],
        default_body: int = 64 * 1024,
        on_refused: OnRefused | None = None,
        clock: MonotonicClock = time.monotonic,
        log: logging.Logger = _log,
        reasons: bool = True,
    ) -> None:
        self.app = app
        self._reasons = reasons
        self.rules = tuple(rules)
        self.default_body = default_body
        self._on_refused = on_refused
        self._log = log
        self._limits = {r.name: _Buckets(r.limit, clock) for r in self.rules if r.limit}
        self._refusals = {r.name: _Buckets(r.refusals, clock) for r in self.rules if r.refusals}

    def rule_for(self, method: str, path: str) -> Rule | None:
        for rule in self.rules:
            if rule.matches(method, path):
                return rule
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = _with_security_headers(send)
        rule = self.rule_for(str(scope.get("method", "")), str(scope.get("path", "")))
        try:
            try:
                principal, refusals = await self._admit(scope, rule)
                limit = rule.max_body if rule else self.default_body
                body = await _read_body(scope, receive, limit)
            except Refused:
                raise
            except Exception as exc:  # an authenticator's fault: answered like any other
                self._log.error(
                    "internal error admitting %s %r: %s",
                    scope.get("method"),
                    scope.get("path"),
                    type(exc).__name__,
                )
                raise Refused(500, "internal") from None
        except Refused as exc:
            self._refuse(scope, rule, exc)
            response = (
                exc.response()
                if self._reasons
                else refusal_response(exc.status, headers=exc.headers)
            )
            await response(scope, receive, send)
            return
        if body is None:
            return  # the client went away
        if principal is not None:
            scope["extensions"] = {**(scope.get("extensions") or {}), PRINCIPAL: principal}
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        if refusals is None:
            await self.app(scope, replay, send)
            return

        async def counting(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] in (401, 403):
                refusals.take()
            await send(message)

        await self.app(scope, replay, counting)

    async def _admit(
        self, scope: Scope, rule: Rule | None
    ) -> tuple[Principal | None, TokenBucket | None]:
        if rule is None:
            return None, None
        address = client_address(scope)
        refusals = None
        if rule.name in self._refusals:
            refusals = self._refusals[rule.name].get(address)
            wait = refusals.wait()
            if wait > 0:
                raise _too_many("too_many_refusals", wait)
        principal = None
        if rule.authenticate is not None:
            principal = await rule.authenticate(scope)
        if rule.name in self._limits:
            who = f"{principal.kind}:{principal.name}" if principal else f"address:{address}"
            wait = self._limits[rule.name].get(who).take()
            if wait > 0:
                raise _too_many("rate_limited", wait)
        return principal, refusals

    def _refuse(self, scope: Scope, rule: Rule | None, exc: Refused) -> None:
        self._log.info(
            "refused %s %r from %s: %d %s",
            scope.get("method"),
            scope.get("path"),
            client_address(scope),
            exc.status,
            exc.code,
        )
        if exc.status in (401, 403) and rule is not None and rule.name in self._refusals:
            self._refusals[rule.name].get(client_address(scope)).take()
        if self._on_refused is not None:
            self._on_refused(scope, exc)


def _too_many(code: str, wait: float) -> Refused:
    return Refused(
        429, code, "too many requests", headers={"Retry-After": str(max(1, math.ceil(wait)))}
    )


def _with_security_headers(send: Send) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            present = {name.lower() for name, _ in message.get("headers", [])}
            extra = [(n, v) for n, v in SECURITY_HEADERS if n not in present]
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return wrapped


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The whole body, refused with 413 past `limit` (declared or streamed); None if the
    client went away."""
    for name, value in scope.get("headers", []):
        if name == b"content-length" and (not value.isdigit() or int(value) > limit):
            raise Refused(413, "too_large", f"the body is over {limit} bytes")
    chunks: list[bytes] = []
    seen = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        body = message.get("body", b"")
        seen += len(body)
        if seen > limit:
            raise Refused(413, "too_large", f"the body is over {limit} bytes")
        chunks.append(body)
        if not message.get("more_body", False):
            return b"".join(chunks)
