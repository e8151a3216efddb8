"""Attestation tokens: ES256 round trip, and every forgery, tampering and malformation refused."""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwt.algorithms import ECAlgorithm
from tests.support.clock import FakeClock

from ppml.attestation import (
    EvidenceClaims,
    IssuedToken,
    TcbStatus,
    TeeType,
    TokenClaims,
    TokenIssuer,
    TokenVerifier,
    key_thumbprint,
)
from ppml.errors import AttestationFailed, ConfigurationError, UsageError

T0 = _dt.datetime(2030, 1, 1, 12, 0, 0, tzinfo=_dt.UTC)
KEY = ec.derive_private_key(0x1234567890ABCDEF, ec.SECP256R1())
OTHER_KEY = ec.derive_private_key(0xFEDCBA0987654321, ec.SECP256R1())
KID = key_thumbprint(KEY.public_key())
WORKLOAD_KEY = bytes(range(32))
CLAIMS = EvidenceClaims(
    tee=TeeType.SIM,
    measurements={"measurement": "ab" * 32},
    debug=False,
    tcb_status=TcbStatus.UP_TO_DATE,
    report_data=b"\x00" * 64,
)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def part(token: str, index: int) -> Any:
    text = token.split(".")[index]
    return json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))


def issuer(clock: FakeClock | None = None, **kwargs: Any) -> TokenIssuer:
    return TokenIssuer(
        kwargs.pop("key", KEY),
        clock=clock or FakeClock(T0),
        random_bytes=lambda n: b"\x11" * n,
        **kwargs,
    )


def verifier(now: _dt.datetime = T0, **kwargs: Any) -> TokenVerifier:
    return TokenVerifier(kwargs.pop("key", KEY.public_key()), clock=FakeClock(now), **kwargs)


def good_payload(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = part(issuer().issue(CLAIMS, WORKLOAD_KEY, ["p"]), 1)
    payload.update(changes)
    return payload


def es256(payload: dict[str, Any], *, key: ec.EllipticCurvePrivateKey = KEY, **header: Any) -> str:
    """A token correctly signed by `key`, so only its content is wrong."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    return jwt.api_jws.encode(body, key, algorithm="ES256", headers={"kid": KID, **header})


def refused(token: object, v: TokenVerifier | None = None) -> str:
    with pytest.raises(AttestationFailed) as info:
        (v or verifier()).verify(token)  # type: ignore[arg-type]
    return info.value.message


def test_round_trip() -> None:
    issued = issuer().mint(CLAIMS, WORKLOAD_KEY, ["sales-read", "pii-read"])
    claims = verifier().verify(issued.token)
    assert claims == TokenClaims(
        tee=TeeType.SIM,
        measurements={"measurement": "ab" * 32},
        debug=False,
        tcb_status=TcbStatus.UP_TO_DATE,
        public_key=WORKLOAD_KEY,
        policies_matched=("sales-read", "pii-read"),
        issued_at=T0,
        expires_at=T0 + _dt.timedelta(minutes=5),
        token_id=b64url(b"\x11" * 16),
    )
    assert claims == issued.claims
    again = issuer().issue(CLAIMS, WORKLOAD_KEY, ["sales-read", "pii-read"])
    assert part(again, 1) == part(issued.token, 1)  # ECDSA signatures differ, content does not


def test_token_format() -> None:
    token = issuer().issue(CLAIMS, WORKLOAD_KEY, [])
    assert part(token, 0) == {"alg": "ES256", "kid": KID, "typ": "JWT"}
    iat = int(T0.timestamp())
    assert part(token, 1) == {
        "iss": "ppml-attestation",
        "iat": iat,
        "nbf": iat,
        "exp": iat + 300,
        "jti": b64url(b"\x11" * 16),
        "tee": "sim",
        "measurements": {"measurement": "ab" * 32},
        "debug": False,
        "tcb_status": "UpToDate",
        "policies_matched": [],
        "cnf": {"jwk": {"kty": "OKP", "crv": "X25519", "x": b64url(WORKLOAD_KEY)}},
    }


def test_kid_is_the_rfc7638_thumbprint() -> None:
    jwk = json.loads(ECAlgorithm.to_jwk(KEY.public_key()))
    required = {k: jwk[k] for k in ("crv", "kty", "x", "y")}
    members = json.dumps(required, sort_keys=True, separators=(",", ":")).encode()
    assert b64url(hashlib.sha256(members).digest()) == KID


def test_secrets_are_not_in_reprs() -> None:
    issued = issuer().mint(CLAIMS, WORKLOAD_KEY, [])
    assert isinstance(issued, IssuedToken)
    assert issued.token not in repr(issued)


def test_expired_token_is_refused_after_the_leeway() -> None:
    token = issuer().issue(CLAIMS, WORKLOAD_KEY, [])
    expiry = T0 + _dt.timedelta(minutes=5)
    verifier(expiry + _dt.timedelta(seconds=4)).verify(token)
    assert refused(token, verifier(expiry + _dt.timedelta(seconds=5))).endswith("expired")
    refused(token, verifier(expiry + _dt.timedelta(days=1)))
    refused(token, verifier(expiry, leeway=_dt.timedelta(0)))


def test_token_is_not_valid_before_it_was_issued() -> None:
    token = issuer().issue(CLAIMS, WORKLOAD_KEY, [])
    verifier(T0 - _dt.timedelta(seconds=5)).verify(token)
    assert "not yet valid" in refused(token, verifier(T0 - _dt.timedelta(seconds=6)))
    assert "not yet valid" in refused(token, verifier(T0 - _dt.timedelta(hours=1)))


def test_issued_in_the_future_is_refused() -> None:
    later = int((T0 + _dt.timedelta(minutes=1)).timestamp())
    token = es256(good_payload(iat=later))
    assert "future" in refused(token)


@pytest.mark.parametrize(
    "changes",
    [
        {"exp": int(T0.timestamp())},
        {"nbf": int(T0.timestamp()) + 400},
        {"iat": int(T0.timestamp()) + 400},
    ],
)
def test_inconsistent_times_are_refused(changes: dict[str, int]) -> None:
    refused(es256(good_payload(**changes)))


def test_token_from_another_key_is_refused() -> None:
    token = issuer(key=OTHER_KEY).issue(CLAIMS, WORKLOAD_KEY, [])
    assert "unknown key" in refused(token)


def test_token_from_another_key_claiming_our_kid_is_refused() -> None:
    forged = es256(good_payload(), key=OTHER_KEY)
    assert "signature" in refused(forged)


def test_alg_none_is_refused() -> None:
    header = b64url_json({"alg": "none", "typ": "JWT", "kid": KID})
    body = b64url_json(good_payload())
    refused(f"{header}.{body}.")
    refused(f"{header}.{body}.AAAA")
    for alg in ("None", "NONE", "nOnE"):
        refused(f"{b64url_json({'alg': alg, 'kid': KID})}.{body}.AAAA")


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_hmac_forgery_with_the_public_key_as_secret_is_refused(alg: str) -> None:
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    public_pem = KEY.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    signing_input = (
        f"{b64url_json({'alg': alg, 'kid': KID, 'typ': 'JWT'})}.{b64url_json(good_payload())}"
    )
    for secret in (public_pem, public_pem.strip(), KID.encode()):
        mac = hmac.new(secret, signing_input.encode(), digest).digest()
        assert "algorithm" in refused(f"{signing_input}.{b64url(mac)}")


@pytest.mark.parametrize("alg", ["ES384", "ES512", "RS256", "PS256", "EdDSA", "", None])
def test_other_algorithms_in_the_header_are_refused(alg: object) -> None:
    token = es256(good_payload())
    _, body, signature = token.split(".")
    refused(f"{b64url_json({'alg': alg, 'kid': KID, 'typ': 'JWT'})}.{body}.{signature}")


def test_tampered_payload_is_refused() -> None:
    token = issuer().issue(CLAIMS, WORKLOAD_KEY, [])
    header, _, signature = token.split(".")
    for changes in ({"debug": True}, {"policies_matched": ["admin"]}, {"tee": "sgx"}):
        tampered = f"{header}.{b64url_json(good_payload(**changes))}.{signature}"
        assert "signature" in refused(tampered)


def test_tampered_header_and_signature_are_refused() -> None:
    token = issuer().issue(CLAIMS, WORKLOAD_KEY, [])
    header, body, signature = token.split(".")
    refused(f"{b64url_json({'alg': 'ES256', 'typ': 'JWT', 'kid': KID, 'x': 1})}.{body}.{signature}")
    refused(f"{b64url_json({'alg': 'ES256', 'typ': 'JWS', 'kid': KID})}.{body}.{signature}")
    refused(f"{b64url_json({'alg': 'ES256', 'typ': 'JWT'})}.{body}.{signature}")
    refused(f"{b64url_json({'alg': 'ES256', 'kid': 5})}.{body}.{signature}")
    refused(f"{header}.{body}.{signature[::-1]}")
    refused(f"{header}.{body}.{signature[:-4]}")
    for i in range(len(token)):
        if token[i] == ".":
            continue
        flipped = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1 :]
        refused(flipped)


@pytest.mark.parametrize(
    "claim",
    ["iss", "iat", "nbf", "exp", "jti", "tee", "measurements", "debug", "tcb_status",
     "policies_matched", "cnf"],
)  # fmt: skip
def test_missing_claims_are_refused(claim: str) -> None:
    payload = good_payload()
    del payload[claim]
    refused(es256(payload))


def test_unexpected_claims_are_refused() -> None:
    refused(es256(good_payload(aud="kms")))
    assert "unexpected claims" in refused(es256(good_payload(admin=True)))


@pytest.mark.parametrize(
    "changes",
    [
        {"iat": "1"},
        {"iat": 1.5},
        {"exp": True},
        {"nbf": None},
        {"jti": 5},
        {"jti": ""},
        {"tee": "tpm"},
        {"tee": None},
        {"tcb_status": "Great"},
        {"debug": "false"},
        {"debug": 0},
        {"measurements": {}},
        {"measurements": ["ab"]},
        {"measurements": {"measurement": "AB" * 32}},
        {"measurements": {"measurement": "abc"}},
        {"measurements": {"Bad Name": "ab"}},
        {"measurements": {"measurement": 5}},
        {"policies_matched": "sales"},
        {"policies_matched": [5]},
        {"policies_matched": [""]},
        {"policies_matched": {"sales": 1}},
    ],
)
def test_claims_of_the_wrong_type_are_refused(changes: dict[str, Any]) -> None:
    refused(es256(good_payload(**changes)))


def test_wrong_issuer_is_refused() -> None:
    token = issuer(issuer="someone-else").issue(CLAIMS, WORKLOAD_KEY, [])
    assert "issuer" in refused(token)
    good = issuer().issue(CLAIMS, WORKLOAD_KEY, [])
    assert "issuer" in refused(good, verifier(issuer="kms-only"))
    assert "issuer" in refused(es256(good_payload(iss=["ppml-attestation"])))


@pytest.mark.parametrize(
    "cnf",
    [
        None,
        {},
        {"jwk": None},
        {"jwk": {"kty": "EC", "crv": "X25519", "x": b64url(WORKLOAD_KEY)}},
        {"jwk": {"kty": "OKP", "crv": "Ed25519", "x": b64url(WORKLOAD_KEY)}},
        {"jwk": {"kty": "OKP", "crv": "X25519", "x": b64url(WORKLOAD_KEY[:31])}},
        {"jwk": {"kty": "OKP", "crv": "X25519", "x": b64url(WORKLOAD_KEY + b"\x00")}},
        {"jwk": {"kty": "OKP", "crv": "X25519", "x": b64url(WORKLOAD_KEY) + "="}},
        {"jwk": {"kty": "OKP", "crv": "X25519", "x": b64url(WORKLOAD_KEY)[:-1] + "B"}},
        {"jwk": {"kty": "OKP", "crv": "X25519", "x": base64.b64encode(b"\xff" * 32).decode()}},
        {"jwk": {"kty": "OKP", "crv": "X25519", "x": WORKLOAD_KEY.hex()}},
        {"jwk": {"kty": "OKP", "crv": "X25519", "x": 5}},
        {"jwk": {"kty": "OKP", "crv": "X25519"}},
        {"jwk": {"kty": "OKP", "crv": "X25519", "x": b64url(WORKLOAD_KEY), "d": "AA"}},
        {"jwk": {"kty": "OKP", "crv": "X25519", "x": b64url(WORKLOAD_KEY)}, "kid": "k"},
    ],
)
def test_bad_workload_jwk_is_refused(cnf: object) -> None:
    refused(es256(good_payload(cnf=cnf)))


@pytest.mark.parametrize(
    "token",
    ["", "a", "a.b", "a.b.c.d", "..", "a..c", "é.é.é", "x" * 20000, None, b"a.b.c", 5],
)
def test_malformed_tokens_are_refused(token: object) -> None:
    refused(token)


def test_issue_validates_its_input() -> None:
    with pytest.raises(UsageError):
        issuer().issue(CLAIMS, WORKLOAD_KEY[:31], [])
    with pytest.raises(UsageError):
        issuer().issue(CLAIMS, WORKLOAD_KEY, "sales")
    with pytest.raises(UsageError):
        issuer().issue(CLAIMS, WORKLOAD_KEY, [1])  # type: ignore[list-item]
    bad = EvidenceClaims(TeeType.SIM, {"m": "XY"}, False, TcbStatus.UP_TO_DATE, b"")
    with pytest.raises(UsageError):
        issuer().issue(bad, WORKLOAD_KEY, [])


def test_keys_must_be_p256() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ConfigurationError):
        TokenIssuer(p384)
    with pytest.raises(ConfigurationError):
        TokenVerifier(p384.public_key())
    with pytest.raises(ConfigurationError):
        TokenVerifier(KEY)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        TokenIssuer(KEY, ttl=_dt.timedelta(0))
    with pytest.raises(ConfigurationError):
        TokenIssuer(KEY, issuer="")


def test_verifier_for_issuer() -> None:
    clock = FakeClock(T0)
    iss = issuer(clock, issuer="ws-1")
    v = TokenVerifier.for_issuer(iss, clock=clock)
    assert v.key_id == iss.key_id == KID
    assert v.verify(iss.issue(CLAIMS, WORKLOAD_KEY, [])).public_key == WORKLOAD_KEY
