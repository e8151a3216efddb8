"""Injectable clocks, so that tests can pin time.

Two kinds, two names. A `Clock` reads the wall-clock time as a timezone-aware UTC datetime
(token and challenge expiry, certificate validity, audit records). A `MonotonicClock` reads
seconds that only go forward, from an arbitrary origin (timeouts, rate limits, idle times),
which adjustments of the wall clock must not disturb.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable

__all__ = ["Clock", "MonotonicClock", "utc_now"]

Clock = Callable[[], _dt.datetime]
MonotonicClock = Callable[[], float]


def utc_now() -> _dt.datetime:
    """The current time, timezone-aware, in UTC."""
    return _dt.datetime.now(_dt.UTC)
