"""The server's token cache: verifies each token once, answers repeats until expiry, never
caches a failure, and stays bounded."""

from __future__ import annotations

import datetime as dt

import pytest

from ppml.attestation.claims import TcbStatus, TeeType, TokenClaims
from ppml.errors import AttestationFailed, ConfigurationError
from ppml.server.tokens import CachedTokenVerifier

NOW = dt.datetime(2031, 1, 1, 12, 0, tzinfo=dt.UTC)


def _claims(expires_in: int = 300) -> TokenClaims:
    return TokenClaims(
        tee=TeeType.SIM,
        measurements={"measurement": "ab" * 32},
        debug=False,
        tcb_status=TcbStatus.UP_TO_DATE,
        public_key=bytes(32),
        policies_matched=(),
        issued_at=NOW,
        expires_at=NOW + dt.timedelta(seconds=expires_in),
        token_id="t",
    )


class Counting:
    def __init__(self, claims: TokenClaims | None = None) -> None:
        self.calls: list[str] = []
        self.claims = claims or _claims()

    def __call__(self, token: str) -> TokenClaims:
        self.calls.append(token)
        if token.startswith("bad"):
            raise AttestationFailed("attestation token: signature does not verify")
        return self.claims


def test_a_token_is_verified_once_until_it_expires() -> None:
    now = [NOW]
    inner = Counting()
    cache = CachedTokenVerifier(inner, clock=lambda: now[0])
    assert cache("tok") is inner.claims
    assert cache("tok") is inner.claims
    assert inner.calls == ["tok"]
    now[0] = NOW + dt.timedelta(seconds=300)  # expiry: verified again (and refused there)
    cache("tok")
    assert inner.calls == ["tok", "tok"]


def test_failures_are_not_cached() -> None:
    inner = Counting()
    cache = CachedTokenVerifier(inner, clock=lambda: NOW)
    for _ in range(2):
        with pytest.raises(AttestationFailed):
            cache("bad token")
    assert inner.calls == ["bad token", "bad token"] and len(cache) == 0


def test_expired_claims_are_not_cached() -> None:
    inner = Counting(_claims(expires_in=-1))
    cache = CachedTokenVerifier(inner, clock=lambda: NOW)
    cache("old")
    cache("old")
    assert len(inner.calls) == 2 and len(cache) == 0


def test_the_cache_is_bounded_lru() -> None:
    inner = Counting()
    cache = CachedTokenVerifier(inner, clock=lambda: NOW, max_tokens=2)
    for t in ("a", "b", "a", "c"):  # "b" is the least recently used when "c" arrives
        cache(t)
    assert len(cache) == 2
    cache("a")
    cache("b")
    assert inner.calls == ["a", "b", "c", "b"]


def test_tokens_differing_in_one_character_are_distinct() -> None:
    inner = Counting()
    cache = CachedTokenVerifier(inner, clock=lambda: NOW)
    cache("token-1")
    cache("token-2")
    assert inner.calls == ["token-1", "token-2"]


@pytest.mark.parametrize("bad", [0, -1, True, "10"])
def test_configuration_is_checked(bad: object) -> None:
    with pytest.raises(ConfigurationError):
        CachedTokenVerifier(Counting(), max_tokens=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        CachedTokenVerifier("not callable")  # type: ignore[arg-type]
