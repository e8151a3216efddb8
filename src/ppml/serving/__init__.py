"""Trusted Cluster Serving: encrypted models served from a Redis-streams queue.

Clients push inputs through the HTTPS front end; workers (attested processes) run the model and
answer by request id. The queue holds only AES-GCM encrypted payloads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ppml.serving.client import InputQueue, OutputQueue

__all__ = ["InputQueue", "OutputQueue"]

# Exported lazily: `import ppml.serving` stays cheap (no numpy, httpx or FastAPI until used).
_LAZY = {
    "InputQueue": "ppml.serving.client",
    "OutputQueue": "ppml.serving.client",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
