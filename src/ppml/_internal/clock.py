"""An injectable clock, so that tests can pin time."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable

__all__ = ["Clock", "utc_now"]

Clock = Callable[[], _dt.datetime]


def utc_now() -> _dt.datetime:
    """The current time, timezone-aware, in UTC."""
    return _dt.datetime.now(_dt.UTC)
