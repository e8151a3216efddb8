"""Verified attestation tokens, remembered until they expire.

A workload attests once and presents the same token with every key request until it expires;
verifying the ES256 signature and re-parsing the claims each time is the largest avoidable cost
of an unwrap. `CachedTokenVerifier` verifies each distinct token once and answers repeats from
memory. It caches only successes (a token that failed is verified again, and fails again),
keys the cache by SHA-256 of the token (the token itself is not kept), and stops answering from
memory at the token's expiry; the key broker still checks the expiry itself on every request.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

from ppml._internal.clock import Clock, utc_now
from ppml.attestation.claims import TokenClaims
from ppml.errors import ConfigurationError
from ppml.kms.broker import TokenVerifier

__all__ = ["DEFAULT_MAX_TOKENS", "CachedTokenVerifier"]

DEFAULT_MAX_TOKENS = 4096


class CachedTokenVerifier:
    """A `TokenVerifier` that remembers up to `max_tokens` verified tokens (least recently used
    are forgotten first) until they expire by `clock`."""

    def __init__(
        self, verify: TokenVerifier, *, clock: Clock = utc_now, max_tokens: int = DEFAULT_MAX_TOKENS
    ) -> None:
        if not callable(verify):
            raise ConfigurationError("CachedTokenVerifier needs a token verifier")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ConfigurationError("max_tokens must be a positive integer")
        self._verify = verify
        self._clock = clock
        self._max = max_tokens
        self._lock = threading.Lock()
        self._cache: OrderedDict[bytes, TokenClaims] = OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache)

    def __call__(self, token: str) -> TokenClaims:
        if not isinstance(token, str):
            return self._verify(token)
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        now = self._clock()
        with self._lock:
            claims = self._cache.get(digest)
            if claims is not None:
                if now < claims.expires_at:
                    self._cache.move_to_end(digest)
                    return claims
                del self._cache[digest]
        claims = self._verify(token)  # raises for a token that does not verify: not cached
        if now < claims.expires_at:
            with self._lock:
                self._cache[digest] = claims
                self._cache.move_to_end(digest)
                while len(self._cache) > self._max:
                    self._cache.popitem(last=False)
        return claims
