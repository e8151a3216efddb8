"""Fake clocks that tests move by hand, one for each kind of clock in `ppml._internal.clock`.

`FakeClock` stands in for a `Clock` (wall-clock time, timezone-aware UTC datetimes);
`FakeMonotonicClock` for a `MonotonicClock` (seconds from an arbitrary origin). Both read
`now`, which a test sets directly or moves with `advance`; both are safe to read and advance
from several threads.
"""

from __future__ import annotations

import datetime as _dt
import threading

__all__ = ["EPOCH", "FakeClock", "FakeMonotonicClock"]

EPOCH = _dt.datetime(2030, 1, 1, tzinfo=_dt.UTC)
"""Where a `FakeClock` starts unless told otherwise."""


class FakeClock:
    """A wall clock (a `ppml._internal.clock.Clock`) standing at `now` until moved."""

    def __init__(self, now: _dt.datetime = EPOCH) -> None:
        if now.tzinfo is None:
            raise ValueError("a FakeClock reads timezone-aware datetimes")
        self._lock = threading.Lock()
        self.now = now

    def __call__(self) -> _dt.datetime:
        with self._lock:
            return self.now

    def advance(self, **delta: float) -> None:
        """Move forward by ``datetime.timedelta(**delta)``, e.g. ``advance(seconds=61)``."""
        with self._lock:
            self.now += _dt.timedelta(**delta)


class FakeMonotonicClock:
    """A monotonic clock (a `ppml._internal.clock.MonotonicClock`) standing at `now` seconds
    until moved."""

    def __init__(self, now: float = 1000.0) -> None:
        self._lock = threading.Lock()
        self.now = now

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        """Move forward by `seconds`."""
        with self._lock:
            self.now += seconds
