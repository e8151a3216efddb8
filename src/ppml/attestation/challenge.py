"""Attestation challenges: random single-use nonces with a short lifetime, so that evidence is
fresh and cannot be replayed."""

from __future__ import annotations

import datetime as _dt
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ppml._internal.clock import Clock, utc_now
from ppml.errors import AttestationFailed, ConfigurationError

__all__ = [
    "DEFAULT_CHALLENGE_TTL",
    "DEFAULT_MAX_OUTSTANDING",
    "NONCE_BYTES",
    "Challenge",
    "ChallengeCapacityExceeded",
    "ChallengeStore",
]

NONCE_BYTES = 32
DEFAULT_CHALLENGE_TTL = _dt.timedelta(seconds=60)
DEFAULT_MAX_OUTSTANDING = 10_000


class ChallengeCapacityExceeded(AttestationFailed):
    """Too many challenges are outstanding; a server may answer "try again later" (503)."""


@dataclass(frozen=True, slots=True)
class Challenge:
    """A nonce to bind into evidence, usable once before `expires_at`."""

    nonce: bytes
    expires_at: _dt.datetime


class ChallengeStore:
    """Issues nonces and accepts each one once, before it expires. Thread-safe; memory is bounded
    by `max_outstanding` (expired nonces are dropped as new ones are issued)."""

    def __init__(
        self,
        ttl: _dt.timedelta = DEFAULT_CHALLENGE_TTL,
        clock: Clock = utc_now,
        random_bytes: Callable[[int], bytes] = os.urandom,
        *,
        max_outstanding: int = DEFAULT_MAX_OUTSTANDING,
    ) -> None:
        if not isinstance(ttl, _dt.timedelta) or ttl <= _dt.timedelta(0):
            raise ConfigurationError("the challenge lifetime must be a positive duration")
        if isinstance(max_outstanding, bool) or not isinstance(max_outstanding, int):
            raise ConfigurationError("max_outstanding must be a positive integer")
        if max_outstanding < 1:
            raise ConfigurationError("max_outstanding must be a positive integer")
        self._ttl, self._clock, self._random = ttl, clock, random_bytes
        self._max = max_outstanding
        self._lock = threading.Lock()
        # Insertion order is (nearly) expiry order: expired entries are dropped from the front.
        self._outstanding: dict[bytes, _dt.datetime] = {}

    @property
    def ttl(self) -> _dt.timedelta:
        return self._ttl

    def __len__(self) -> int:
        """The number of challenges issued and not yet used or dropped."""
        with self._lock:
            return len(self._outstanding)

    def issue(self) -> Challenge:
        """A fresh challenge; `ChallengeCapacityExceeded` when too many are outstanding."""
        now = self._clock()
        with self._lock:
            self._drop_expired(now)
            if len(self._outstanding) >= self._max:
                raise ChallengeCapacityExceeded(
                    f"too many outstanding challenges (limit {self._max}); try again later"
                )
            nonce = self._random(NONCE_BYTES)
            if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
                raise ConfigurationError("the random source returned the wrong number of bytes")
            if nonce in self._outstanding:
                raise ConfigurationError("the random source repeated a nonce")
            expires_at = now + self._ttl
            self._outstanding[nonce] = expires_at
        return Challenge(nonce=nonce, expires_at=expires_at)

    def consume(self, nonce: bytes) -> None:
        """Accept `nonce` once: raise `AttestationFailed` if it is unknown, used or expired."""
        if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
            raise AttestationFailed(f"challenge nonce must be {NONCE_BYTES} bytes")
        now = self._clock()
        with self._lock:
            expires_at = self._outstanding.pop(nonce, None)
        if expires_at is None:
            raise AttestationFailed("unknown or already used challenge")
        if now >= expires_at:
            raise AttestationFailed("challenge expired")

    def _drop_expired(self, now: _dt.datetime) -> None:
        while self._outstanding:
            nonce, expires_at = next(iter(self._outstanding.items()))
            if now < expires_at:
                break
            del self._outstanding[nonce]
