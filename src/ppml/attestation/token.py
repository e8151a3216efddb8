"""Attestation tokens: short-lived ES256 JWTs that carry verified evidence claims and the
workload's X25519 public key (RFC 7800 `cnf`) from the attestation service to the key broker.

Header ``{"alg": "ES256", "kid": <RFC 7638 thumbprint of the signing key>, "typ": "JWT"}``;
payload exactly ``iss, iat, nbf, exp, jti, tee, measurements, debug, tcb_status,
policies_matched, cnf`` and, when the evidence attests more facts than measurements, ``extra``
(times are integer seconds; ``cnf = {"jwk": {"kty": "OKP", "crv": "X25519", "x":
<base64url>}}``; ``extra`` maps names to booleans, integers, short strings, lists of short
strings or maps of names to integers: an SGX enclave's ISVPRODID and ISVSVN, an SEV-SNP
guest policy and reported TCB, TCB advisory ids).
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import hmac
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NoReturn

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from ppml._internal.canonical import canonical_json
from ppml._internal.clock import Clock, utc_now
from ppml.attestation.claims import EvidenceClaims, TcbStatus, TeeType, TokenClaims
from ppml.errors import AttestationFailed, ConfigurationError, UsageError

__all__ = [
    "DEFAULT_ISSUER",
    "DEFAULT_LEEWAY",
    "DEFAULT_TOKEN_TTL",
    "JWS_ALGORITHM",
    "MAX_TOKEN_CHARS",
    "IssuedToken",
    "TokenIssuer",
    "TokenVerifier",
    "key_thumbprint",
]

JWS_ALGORITHM = "ES256"
DEFAULT_ISSUER = "ppml-attestation"
DEFAULT_TOKEN_TTL = _dt.timedelta(minutes=5)
DEFAULT_LEEWAY = _dt.timedelta(seconds=5)
MAX_TOKEN_CHARS = 16 * 1024
WORKLOAD_KEY_BYTES = 32

_CLAIMS = frozenset(
    {
        "iss",
        "iat",
        "nbf",
        "exp",
        "jti",
        "tee",
        "measurements",
        "debug",
        "tcb_status",
        "policies_matched",
        "cnf",
    }
)
_HEADER_FIELDS = frozenset({"alg", "kid", "typ"})
_JTI_BYTES = 16
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_MEASUREMENT_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_HEX = re.compile(r"(?:[0-9a-f]{2}){1,512}")
_MAX_MEASUREMENTS = 64
_MAX_EXTRA = 32
_MAX_EXTRA_TEXT = 256
_MAX_EXTRA_ITEMS = 256
_EXTRA_CLAIM = "extra"
_MAX_POLICIES = 1024
_MAX_NAME = 256


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes | None:
    """Strict base64url without padding: None unless `text` is the one encoding of its bytes."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        return None
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    return data if _b64url(data) == text else None


def key_thumbprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """The RFC 7638 JWK thumbprint (SHA-256, base64url) of a P-256 public key: the token `kid`."""
    numbers = public_key.public_numbers()
    jwk = {
        "crv": "P-256",
        "kty": "EC",
        "x": _b64url(numbers.x.to_bytes(32, "big")),
        "y": _b64url(numbers.y.to_bytes(32, "big")),
    }
    return _b64url(hashlib.sha256(canonical_json(jwk)).digest())


def _check_p256(key: object, *, private: bool) -> None:
    kind = ec.EllipticCurvePrivateKey if private else ec.EllipticCurvePublicKey
    if not isinstance(key, kind) or not isinstance(key.curve, ec.SECP256R1):
        which = "private" if private else "public"
        raise ConfigurationError(f"the token signing key must be a P-256 (ES256) {which} key")


def _check_issuer(issuer: object) -> str:
    if not isinstance(issuer, str) or not issuer or len(issuer) > _MAX_NAME:
        raise ConfigurationError("the token issuer must be a non-empty string")
    return issuer


def _valid_measurements(value: object) -> dict[str, str] | None:
    if not isinstance(value, Mapping) or not 0 < len(value) <= _MAX_MEASUREMENTS:
        return None
    out: dict[str, str] = {}
    for name, digest in value.items():
        if not isinstance(name, str) or not _MEASUREMENT_NAME.fullmatch(name):
            return None
        if not isinstance(digest, str) or not _HEX.fullmatch(digest):
            return None
        out[name] = digest
    return out


def _valid_extra_value(value: object) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return 0 <= value < 1 << 64
    if isinstance(value, str):
        return len(value) <= _MAX_EXTRA_TEXT
    if isinstance(value, list | tuple):
        return len(value) <= _MAX_EXTRA_ITEMS and all(
            isinstance(v, str) and len(v) <= _MAX_NAME for v in value
        )
    if isinstance(value, Mapping):
        return len(value) <= _MAX_MEASUREMENTS and all(
            isinstance(k, str)
            and _MEASUREMENT_NAME.fullmatch(k)
            and isinstance(v, int)
            and not isinstance(v, bool)
            and 0 <= v < 1 << 64
            for k, v in value.items()
        )
    return False


def _valid_extra(value: object) -> dict[str, Any] | None:
    """Extra facts, JSON-shaped (lists for sequences, dicts for maps), or None if invalid."""
    if not isinstance(value, Mapping) or len(value) > _MAX_EXTRA:
        return None
    out: dict[str, Any] = {}
    for name, item in value.items():
        if not isinstance(name, str) or not _MEASUREMENT_NAME.fullmatch(name):
            return None
        if not _valid_extra_value(item):
            return None
        if isinstance(item, list | tuple):
            item = list(item)
        elif isinstance(item, Mapping):
            item = dict(item)
        out[name] = item
    return out


def _frozen_extra(extra: dict[str, Any]) -> Mapping[str, Any]:
    def freeze(value: Any) -> Any:
        if isinstance(value, list):
            return tuple(value)
        return MappingProxyType(value) if isinstance(value, dict) else value

    return MappingProxyType({k: freeze(v) for k, v in extra.items()})


def _valid_policies(value: object) -> tuple[str, ...] | None:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        return None
    if len(value) > _MAX_POLICIES:
        return None
    if not all(isinstance(p, str) and 0 < len(p) <= _MAX_NAME for p in value):
        return None
    return tuple(value)


def _utc(timestamp: int) -> _dt.datetime:
    try:
        return _dt.datetime.fromtimestamp(timestamp, _dt.UTC)
    except (OverflowError, ValueError, OSError):
        _fail("time out of range")


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A token and the claims it carries. The token is a bearer credential: not in the repr."""

    token: str = field(repr=False)
    claims: TokenClaims


class TokenIssuer:
    """Signs attestation tokens with the attestation service's P-256 key."""

    def __init__(
        self,
        private_key: ec.EllipticCurvePrivateKey,
        *,
        issuer: str = DEFAULT_ISSUER,
        ttl: _dt.timedelta = DEFAULT_TOKEN_TTL,
        clock: Clock = utc_now,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        _check_p256(private_key, private=True)
        if not isinstance(ttl, _dt.timedelta) or ttl < _dt.timedelta(seconds=1):
            raise ConfigurationError("the token lifetime must be at least one second")
        self._key = private_key
        self._issuer = _check_issuer(issuer)
        self._ttl_seconds = int(ttl.total_seconds())
        self._clock, self._random = clock, random_bytes
        self._kid = key_thumbprint(private_key.public_key())

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    @property
    def issuer(self) -> str:
        return self._issuer

    @property
    def key_id(self) -> str:
        return self._kid

    def issue(
        self, claims: EvidenceClaims, public_key: bytes, policies_matched: Sequence[str]
    ) -> str:
        """A signed token for a workload with these verified `claims` and X25519 `public_key`."""
        return self.mint(claims, public_key, policies_matched).token

    def mint(
        self, claims: EvidenceClaims, public_key: bytes, policies_matched: Sequence[str]
    ) -> IssuedToken:
        """Like `issue`, and also return the claims the token carries."""
        if not isinstance(claims, EvidenceClaims):
            raise UsageError("claims must be EvidenceClaims")
        measurements = _valid_measurements(claims.measurements)
        if measurements is None:
            raise UsageError("measurements must be named lowercase hex digests")
        if not isinstance(claims.debug, bool):
            raise UsageError("debug must be a boolean")
        try:
            tee, tcb = TeeType(claims.tee), TcbStatus(claims.tcb_status)
        except ValueError:
            raise UsageError("unknown TEE type or TCB status") from None
        if not isinstance(public_key, bytes) or len(public_key) != WORKLOAD_KEY_BYTES:
            raise UsageError(f"the workload public key must be {WORKLOAD_KEY_BYTES} bytes")
        policies = _valid_policies(policies_matched)
        if policies is None:
            raise UsageError("policies_matched must be a list of policy names")
        extra = _valid_extra(claims.extra)
        if extra is None:
            raise UsageError("extra claims must be names mapped to simple JSON values")
        iat = math.floor(self._clock().timestamp())
        exp = iat + self._ttl_seconds
        jti = _b64url(self._random(_JTI_BYTES))
        payload: dict[str, Any] = {
            "iss": self._issuer,
            "iat": iat,
            "nbf": iat,
            "exp": exp,
            "jti": jti,
            "tee": tee.value,
            "measurements": measurements,
            "debug": claims.debug,
            "tcb_status": tcb.value,
            "policies_matched": list(policies),
            "cnf": {"jwk": {"kty": "OKP", "crv": "X25519", "x": _b64url(public_key)}},
        }
        if extra:
            payload[_EXTRA_CLAIM] = extra
        token = jwt.encode(
            payload,
            self._key,
            algorithm=JWS_ALGORITHM,
            headers={"kid": self._kid, "typ": "JWT"},
        )
        return IssuedToken(token=token, claims=_payload_claims(payload, extra))


def _fail(reason: str) -> NoReturn:
    raise AttestationFailed(f"attestation token: {reason}")


class TokenVerifier:
    """Checks attestation tokens for a relying party (the key broker): ES256 only, signed by
    the expected key and issuer, within its lifetime by the injected clock, strictly typed."""

    def __init__(
        self,
        public_key: ec.EllipticCurvePublicKey,
        *,
        issuer: str = DEFAULT_ISSUER,
        clock: Clock = utc_now,
        leeway: _dt.timedelta = DEFAULT_LEEWAY,
    ) -> None:
        _check_p256(public_key, private=False)
        if not isinstance(leeway, _dt.timedelta) or leeway < _dt.timedelta(0):
            raise ConfigurationError("the token leeway must be a non-negative duration")
        self._key = public_key
        self._issuer = _check_issuer(issuer)
        self._clock = clock
        self._leeway = leeway.total_seconds()
        self._kid = key_thumbprint(public_key)

    @classmethod
    def for_issuer(
        cls, issuer: TokenIssuer, *, clock: Clock = utc_now, leeway: _dt.timedelta = DEFAULT_LEEWAY
    ) -> TokenVerifier:
        """The verifier for tokens from `issuer` (in-process deployments)."""
        return cls(issuer.public_key, issuer=issuer.issuer, clock=clock, leeway=leeway)

    @property
    def key_id(self) -> str:
        return self._kid

    def verify(self, token: str) -> TokenClaims:
        """The claims of a valid token; `AttestationFailed` (with the reason) otherwise."""
        self._check_encoding(token)
        self._check_header(token)
        try:
            payload = jwt.decode(
                token,
                self._key,
                algorithms=[JWS_ALGORITHM],
                issuer=self._issuer,
                # Times are checked below against the injected clock.
                options={
                    "verify_signature": True,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_iss": True,
                    "require": sorted(_CLAIMS),
                },
            )
        except jwt.InvalidSignatureError:
            _fail("signature does not verify")
        except jwt.InvalidIssuerError:
            _fail("wrong issuer")
        except jwt.MissingRequiredClaimError as exc:
            _fail(f"missing claim {exc.claim!r}")
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            _fail(f"rejected ({type(exc).__name__})")
        return self._claims(payload)

    @staticmethod
    def _check_encoding(token: object) -> None:
        if not isinstance(token, str) or not token:
            _fail("must be a non-empty string")
        if len(token) > MAX_TOKEN_CHARS:
            _fail(f"longer than {MAX_TOKEN_CHARS} characters")
        parts = token.split(".")
        if len(parts) != 3 or any(not p or _b64url_decode(p) is None for p in parts):
            _fail("not a compact JWS of three canonical base64url parts")

    def _check_header(self, token: str) -> None:
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, TypeError):
            _fail("malformed header")
        if header.get("alg") != JWS_ALGORITHM:
            _fail(f"algorithm must be {JWS_ALGORITHM}")
        if not set(header) <= _HEADER_FIELDS or header.get("typ", "JWT") != "JWT":
            _fail("unexpected header fields")
        kid = header.get("kid")
        if not isinstance(kid, str) or not hmac.compare_digest(kid.encode(), self._kid.encode()):
            _fail("signed by an unknown key (kid)")

    def _claims(self, payload: dict[str, Any]) -> TokenClaims:
        if set(payload) - {_EXTRA_CLAIM} != _CLAIMS:
            _fail("unexpected claims")
        extra = _valid_extra(payload.get(_EXTRA_CLAIM, {}))
        if (
            extra is None
            or not isinstance(payload.get(_EXTRA_CLAIM, {}), dict)
            or (_EXTRA_CLAIM in payload and not extra)
        ):
            _fail("claim 'extra' must map names to simple values")
        iat, nbf, exp = payload["iat"], payload["nbf"], payload["exp"]
        for name, value in (("iat", iat), ("nbf", nbf), ("exp", exp)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                _fail(f"claim {name!r} must be a non-negative integer")
        if not iat <= exp or not nbf < exp:
            _fail("inconsistent times")
        now = self._clock().timestamp()
        if now >= exp + self._leeway:
            _fail("expired")
        if nbf > now + self._leeway:
            _fail("not yet valid")
        if iat > now + self._leeway:
            _fail("issued in the future")
        return _payload_claims(payload, extra)


def _payload_claims(payload: dict[str, Any], extra: dict[str, Any]) -> TokenClaims:
    """The claims of a token's payload whose claim names, extra claims and times are checked
    already (what the issuer signs is read back by the same rules as what a verifier reads)."""
    jti = payload["jti"]
    if not isinstance(jti, str) or not 0 < len(jti) <= _MAX_NAME:
        _fail("claim 'jti' must be a non-empty string")
    try:
        tee = TeeType(payload["tee"])
        tcb = TcbStatus(payload["tcb_status"])
    except ValueError:
        _fail("unknown TEE type or TCB status")
    debug = payload["debug"]
    if not isinstance(debug, bool):
        _fail("claim 'debug' must be a boolean")
    measurements = _valid_measurements(payload["measurements"])
    if measurements is None or not isinstance(payload["measurements"], dict):
        _fail("claim 'measurements' must map names to lowercase hex digests")
    policies = _valid_policies(payload["policies_matched"])
    if policies is None or not isinstance(payload["policies_matched"], list):
        _fail("claim 'policies_matched' must be a list of policy names")
    return TokenClaims(
        tee=tee,
        measurements=MappingProxyType(measurements),
        debug=debug,
        tcb_status=tcb,
        public_key=_workload_key(payload["cnf"]),
        policies_matched=policies,
        issued_at=_utc(payload["iat"]),
        expires_at=_utc(payload["exp"]),
        token_id=jti,
        extra=_frozen_extra(extra),
    )


def _workload_key(cnf: object) -> bytes:
    if not isinstance(cnf, dict) or set(cnf) != {"jwk"}:
        _fail("claim 'cnf' must hold exactly a 'jwk'")
    jwk = cnf["jwk"]
    if not isinstance(jwk, dict) or set(jwk) != {"kty", "crv", "x"}:
        _fail("'cnf.jwk' must have exactly kty, crv and x")
    if jwk["kty"] != "OKP" or jwk["crv"] != "X25519":
        _fail("'cnf.jwk' must be an OKP X25519 key")
    x = jwk["x"]
    raw = _b64url_decode(x) if isinstance(x, str) else None
    if raw is None or len(raw) != WORKLOAD_KEY_BYTES:
        _fail(f"'cnf.jwk.x' must be {WORKLOAD_KEY_BYTES} bytes in base64url")
    return raw
