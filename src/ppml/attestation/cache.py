"""One bounded, thread-safe memory of verification results that passed (certificate chains,
collateral), each valid inside the time window in which every time check it made holds.

A hit needs the verification time inside the entry's window, so a cached answer is exactly what
verifying again would give; an entry never outlives the validity or nextUpdate of what it
checked. Failures are never cached (the callers put only results that passed). ``hits`` and
``misses`` count lookups.
"""

from __future__ import annotations

import datetime as _dt
import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["VerifiedCache"]

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
