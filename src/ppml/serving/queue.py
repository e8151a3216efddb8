"""The serving queue on Redis Streams: the contract shared by the front end and the workers.

One stream per deployment (``ppml:serving:<deployment>:requests``) read by one consumer group
(``workers``): at-least-once delivery, each entry acknowledged (XACK) and deleted only after its
result is stored. Results are stored under ``ppml:serving:<deployment>:result:<request id>``
with SET NX (the first result wins, a redelivered request cannot overwrite it) and a TTL.
Entries of a dead worker are taken over with XAUTOCLAIM once idle for longer than the claim
timeout. The stream is bounded: `submit` refuses with `QueueFull` when the requests not yet
answered reach `max_length`, never trimming accepted work away.

Every payload (request input, result output) is sealed by a `PayloadCodec` (AES-GCM under the
deployment's key, bound to the deployment, the request id and the direction), so that Redis
holds no plaintext inputs or outputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ppml.errors import PPMLError, UsageError

if TYPE_CHECKING:
    import numpy as np
    import redis

    from ppml.serving.codec import PayloadCodec

__all__ = [
    "DuplicateRequest",
    "QueueFull",
    "Request",
    "Result",
    "ServingQueue",
]


class QueueFull(PPMLError):
    """The queue holds `max_length` unanswered requests: retry later (HTTP 503, Retry-After)."""


class DuplicateRequest(UsageError):
    """A request with this id was accepted already."""


@dataclass(frozen=True, slots=True)
class Request:
    """One request as a worker sees it: decrypted, with its stream entry for acknowledgement."""

    request_id: str
    model: str
    array: np.ndarray
    entry_id: str  # the stream entry id (for XACK / XDEL)
    deliveries: int  # 1 on first delivery, more after a reclaim


@dataclass(frozen=True, slots=True)
class Result:
    """A finished request: an output array, or an error message for the client (400-type)."""

    request_id: str
    array: np.ndarray | None
    error: str | None = None


class ServingQueue:
    """The queue of one deployment. Thread-safe as far as the Redis client is."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        deployment: str,
        codec: PayloadCodec,
        max_length: int = 10_000,
        result_ttl_s: int = 3600,
    ) -> None:
        raise NotImplementedError

    def ensure_group(self) -> None:
        """Create the stream and the consumer group if missing (idempotent)."""
        raise NotImplementedError

    def submit(self, request_id: str, model: str, array: np.ndarray) -> None:
        """Accept a request or raise `QueueFull` / `DuplicateRequest`; never drops silently."""
        raise NotImplementedError

    def depth(self) -> int:
        """Requests accepted and not yet answered (waiting plus in flight)."""
        raise NotImplementedError

    def read(self, consumer: str, count: int, block_ms: int) -> list[Request]:
        """Up to `count` new requests for `consumer`, waiting at most `block_ms` for the first."""
        raise NotImplementedError

    def reclaim(self, consumer: str, min_idle_ms: int, count: int) -> list[Request]:
        """Take over up to `count` requests delivered to others and idle for `min_idle_ms`."""
        raise NotImplementedError

    def complete(self, requests: Sequence[tuple[Request, Result]]) -> None:
        """Store each result (SET NX with TTL), then XACK and XDEL its entry, in one pipeline."""
        raise NotImplementedError

    def result(self, request_id: str) -> Result | None:
        """The stored result, or None while pending (or unknown, or expired)."""
        raise NotImplementedError

    def take_results(self, request_ids: Iterable[str] | None = None) -> list[Result]:
        """Finished results, removed from Redis as they are returned (all when ids is None)."""
        raise NotImplementedError
