"""One bounded, thread-safe memory of verification results that passed (certificate chains,
collateral), each valid inside the time window in which every time check it made holds.

A hit needs the verification time inside the entry's window, so a cached answer is exactly what
verifying again would give; an entry never outlives the validity or nextUpdate of what it
checked. Failures are never cached (the callers put only results that passed). ``hits`` and
``misses`` count lookups.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

from cryptography import x509

__all__ = ["VerifiedCache", "cache_key", "validity_window"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_ALWAYS = (
    _dt.datetime.min.replace(tzinfo=_dt.UTC),
    _dt.datetime.max.replace(tzinfo=_dt.UTC),
)


class VerifiedCache(Generic[K, V]):
    """At most `max_entries` results, least recently used dropped first."""

    def __init__(self, max_entries: int = 256) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max = max_entries
        self._entries: OrderedDict[K, tuple[V, _dt.datetime, _dt.datetime]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def get(self, key: K, at: _dt.datetime | None = None) -> V | None:
        """The result kept for `key` if `at` (None: any time) is inside its window."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and (at is None or entry[1] <= at <= entry[2]):
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[0]
            self.misses += 1
            return None

    def put(self, key: K, value: V, window: tuple[_dt.datetime, _dt.datetime] = _ALWAYS) -> None:
        """Keep `value`, valid from ``window[0]`` to ``window[1]`` (both included)."""
        with self._lock:
            self._entries[key] = (value, window[0], window[1])
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)


def cache_key(tag: bytes, *parts: bytes | None) -> bytes:
    """SHA-256 over `tag` and each part, length-prefixed (None marked as absent), so that no
    two different sequences of parts share a key."""
    h = hashlib.sha256(tag + b"\x00")
    for part in parts:
        if part is None:
            h.update(b"\x00")
        else:
            h.update(b"\x01" + len(part).to_bytes(8, "big") + part)
    return h.digest()


def validity_window(
    certs: Iterable[x509.Certificate],
    crls: Iterable[x509.CertificateRevocationList | None] = (),
    spans: Iterable[tuple[_dt.datetime, _dt.datetime]] = (),
) -> tuple[_dt.datetime, _dt.datetime]:
    """The times at which every certificate is valid, every CRL current (lastUpdate to
    nextUpdate) and every other span open: the window of a cache entry."""
    starts: list[_dt.datetime] = []
    ends: list[_dt.datetime] = []
    for cert in certs:
        starts.append(cert.not_valid_before_utc)
        ends.append(cert.not_valid_after_utc)
    for crl in crls:
        if crl is not None and crl.next_update_utc is not None:
            starts.append(crl.last_update_utc)
            ends.append(crl.next_update_utc)
    for start, end in spans:
        starts.append(start)
        ends.append(end)
    return max(starts), min(ends)
