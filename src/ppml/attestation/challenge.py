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
    "DEFAULT_MAX_PER_CLIENT",
    "NONCE_BYTES",
    "Challenge",
    "ChallengeCapacityExceeded",
    "ChallengeStore",
]

NONCE_BYTES = 32
DEFAULT_CHALLENGE_TTL = _dt.timedelta(seconds=60)
DEFAULT_MAX_OUTSTANDING = 10_000
DEFAULT_MAX_PER_CLIENT = 64


class ChallengeCapacityExceeded(AttestationFailed):
    """This client holds too many outstanding challenges; a server answers "try again later"
    (429)."""


@dataclass(frozen=True, slots=True)
class Challenge:
    """A nonce to bind into evidence, usable once before `expires_at`."""

    nonce: bytes
    expires_at: _dt.datetime


class ChallengeStore:
    """Issues nonces and accepts each one once, before it expires. Thread-safe.

    Memory is bounded by `max_outstanding`: when it is reached, the oldest outstanding nonce is
    dropped (a nonce is used within a round trip, so only a flood faster than that could cost a
    workload its challenge), never is a new one refused for everyone. Each client (the caller
    says who: a network address) holds at most `max_per_client` outstanding nonces: beyond
    that, its own requests are refused (`ChallengeCapacityExceeded`), nobody else's.
    """

    def __init__(
        self,
        ttl: _dt.timedelta = DEFAULT_CHALLENGE_TTL,
        clock: Clock = utc_now,
        random_bytes: Callable[[int], bytes] = os.urandom,
        *,
        max_outstanding: int = DEFAULT_MAX_OUTSTANDING,
        max_per_client: int = DEFAULT_MAX_PER_CLIENT,
    ) -> None:
        if not isinstance(ttl, _dt.timedelta) or ttl <= _dt.timedelta(0):
            raise ConfigurationError("the challenge lifetime must be a positive duration")
        if isinstance(max_outstanding, bool) or not isinstance(max_outstanding, int):
            raise ConfigurationError("max_outstanding must be a positive integer")
        if max_outstanding < 1:
            raise ConfigurationError("max_outstanding must be a positive integer")
        if isinstance(max_per_client, bool) or not isinstance(max_per_client, int):
            raise ConfigurationError("max_per_client must be a positive integer")
        if max_per_client < 1:
            raise ConfigurationError("max_per_client must be a positive integer")
        self._ttl, self._clock, self._random = ttl, clock, random_bytes
        self._max = max_outstanding
        self._max_per_client = max_per_client
        self._lock = threading.Lock()
        # Insertion order is (nearly) expiry order: expired entries are dropped from the front.
        self._outstanding: dict[bytes, tuple[_dt.datetime, str | None]] = {}
        self._per_client: dict[str, int] = {}

    @property
    def ttl(self) -> _dt.timedelta:
        return self._ttl

    def __len__(self) -> int:
        """The number of challenges issued and not yet used or dropped."""
        with self._lock:
            return len(self._outstanding)

    def issue(self, client: str | None = None) -> Challenge:
        """A fresh challenge for `client` (None: an in-process caller, not counted per client);
        `ChallengeCapacityExceeded` when that client holds too many."""
        now = self._clock()
        with self._lock:
            self._drop_expired(now)
            if client is not None and self._per_client.get(client, 0) >= self._max_per_client:
                raise ChallengeCapacityExceeded(
                    f"too many outstanding challenges for this client (limit "
                    f"{self._max_per_client}); try again later"
                )
            while len(self._outstanding) >= self._max:
                self._forget(next(iter(self._outstanding)))
            nonce = self._random(NONCE_BYTES)
            if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
                raise ConfigurationError("the random source returned the wrong number of bytes")
            if nonce in self._outstanding:
                raise ConfigurationError("the random source repeated a nonce")
            expires_at = now + self._ttl
            self._outstanding[nonce] = (expires_at, client)
            if client is not None:
                self._per_client[client] = self._per_client.get(client, 0) + 1
        return Challenge(nonce=nonce, expires_at=expires_at)

    def consume(self, nonce: bytes) -> None:
        """Accept `nonce` once: raise `AttestationFailed` if it is unknown, used or expired."""
        if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
            raise AttestationFailed(f"challenge nonce must be {NONCE_BYTES} bytes")
        now = self._clock()
        with self._lock:
            entry = self._forget(nonce)
        if entry is None:
            raise AttestationFailed("unknown or already used challenge")
        if now >= entry[0]:
            raise AttestationFailed("challenge expired")

    def _forget(self, nonce: bytes) -> tuple[_dt.datetime, str | None] | None:
        entry = self._outstanding.pop(nonce, None)
        if entry is not None and entry[1] is not None:
            left = self._per_client[entry[1]] - 1
            if left:
                self._per_client[entry[1]] = left
            else:
                del self._per_client[entry[1]]
        return entry

    def _drop_expired(self, now: _dt.datetime) -> None:
        while self._outstanding:
            nonce, (expires_at, _) = next(iter(self._outstanding.items()))
            if now < expires_at:
                break
            self._forget(nonce)
