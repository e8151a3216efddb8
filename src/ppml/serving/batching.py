"""Dynamic batching, independent of Redis: gather requests briefly, run the model once per batch.

`gather` collects up to `max_batch_size` items from any `fetch(max_count, timeout_ms)` source,
waiting at most `max_wait_ms` after the first one arrived. Only the first fetch blocks (until a
first item comes); the batch then fills by polling without blocking, every `poll_ms`: a blocking
read with a timeout of a few milliseconds is not an option on Redis, which serves such timeouts
on its clock tick (every 100 ms at the default ``hz 10``), not at the millisecond asked for.
`run_batch` turns an image input into an instance (the deployment's `preprocess`, see
`ppml.serving.image`), validates each request's instance, stacks the valid ones, runs the model
once (once per distinct instance shape, for models with dynamic non-batch dimensions) and splits the
outputs back into one `Result` per request. A bad instance gets its own error result; a model
failure fails only its batch; no payload content ever reaches a log line or an error text.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from ppml._internal.clock import MonotonicClock
from ppml.data.payload import EncodedImage
from ppml.errors import UsageError
from ppml.serving.queue import Request, Result

__all__ = [
    "MODEL_FAILED",
    "NO_IMAGES",
    "BatchSettings",
    "Fetch",
    "Predictor",
    "Preprocess",
    "gather",
    "run_batch",
]

_log = logging.getLogger(__name__)

T = TypeVar("T")
Fetch = Callable[[int, int], list[T]]
"""`fetch(max_count, timeout_ms)`: up to `max_count` items, waiting at most `timeout_ms` for the
first (0: not at all, only what is there now); an empty list when none came in time."""

MODEL_FAILED = "the model failed on this request's batch"
NO_IMAGES = "this deployment takes no image inputs (it was started without image settings)"
Preprocess = Callable[[bytes], np.ndarray]
"""`preprocess(image file bytes)`: the model's instance, or `UsageError` saying why not."""
MAX_BATCH_SIZE = 4096
MAX_WAIT_MS = 60_000


class Predictor(Protocol):
    """What batching needs from a model (`ppml.serving.model.Model` is one)."""

    @property
    def name(self) -> str: ...

    def validate(self, array: Any) -> np.ndarray: ...

    def predict(self, batch: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True, slots=True)
class BatchSettings:
    """`max_batch_size` instances per model run; `max_wait_ms` spent filling a batch after its
    first request arrived (0: take what is there at once)."""

    max_batch_size: int = 16
    max_wait_ms: int = 5

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch_size <= MAX_BATCH_SIZE:
            raise UsageError(f"the batch size must be between 1 and {MAX_BATCH_SIZE}")
        if not 0 <= self.max_wait_ms <= MAX_WAIT_MS:
            raise UsageError(f"the batch wait must be between 0 and {MAX_WAIT_MS} ms")


def gather(
    fetch: Fetch[T],
    settings: BatchSettings,
    *,
    first_wait_ms: int,
    clock: MonotonicClock = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    stop: Callable[[], bool] | None = None,
    poll_ms: float = 0.5,
) -> list[T]:
    """One batch: wait up to `first_wait_ms` for a first item, then fill up to
    `max_batch_size` for at most `max_wait_ms` more (measured on `clock`, in seconds), looking
    every `poll_ms` without blocking.

    The first fetch is never asked to wait less than 1 ms (to Redis, a block of 0 means
    forever); with `max_wait_ms=0` only the first fetch is made. `stop()` returning true ends
    the filling early (what was fetched is returned, never dropped).
    """
    if first_wait_ms < 1:
        raise UsageError("the first wait must be at least 1 ms")
    if poll_ms <= 0:
        raise UsageError("the poll interval must be positive")
    items = list(fetch(settings.max_batch_size, first_wait_ms))
    if not items or settings.max_wait_ms == 0:
        return items
    deadline = clock() + settings.max_wait_ms / 1000.0
    polls = math.ceil(settings.max_wait_ms / poll_ms)  # a bound whatever the clock does
    while len(items) < settings.max_batch_size and polls > 0:
        polls -= 1
        if stop is not None and stop():
            break
        remaining = deadline - clock()
        if remaining < 1e-6:  # below a microsecond: the deadline (rounding aside)
            break
        sleep(min(remaining, poll_ms / 1000.0))
        items.extend(fetch(settings.max_batch_size - len(items), 0))
    return items


def run_batch(
    model: Predictor,
    requests: Sequence[Request],
    *,
    model_name: str | None = None,
    preprocess: Preprocess | None = None,
) -> list[tuple[Request, Result]]:
    """Predict for every request; returns one (request, result) per request, in order.

    An image input becomes an instance through `preprocess` (None: images are refused). A
    request whose image does not decode or whose instance does not validate gets a result with
    the reason as its error; so does one that names another model than `model_name` (when
    given). The valid
    instances run together; when the model raises or returns the wrong number of rows, every
    request of that run gets the error `MODEL_FAILED` (logged with the exception type only).
    """
    results: list[Result | None] = [None] * len(requests)
    groups: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
    for i, request in enumerate(requests):
        if model_name is not None and request.model != model_name:
            results[i] = Result(
                request.request_id, None, "this deployment does not serve that model"
            )
            continue
        try:
            value = request.array
            if isinstance(value, EncodedImage):
                if preprocess is None:
                    raise UsageError(NO_IMAGES)
                value = preprocess(value.data)
            instance = model.validate(value)
        except UsageError as exc:
            results[i] = Result(request.request_id, None, exc.message)
            continue
        except Exception as exc:  # a validator bug must not take the batch down
            _log.error("validating a request failed: %s", type(exc).__name__)
            results[i] = Result(request.request_id, None, "invalid input")
            continue
        groups.setdefault(instance.shape, []).append((i, instance))
    for members in groups.values():
        outputs = _predict(model, [instance for _, instance in members])
        for row, (i, _) in enumerate(members):
            rid = requests[i].request_id
            if outputs is None:
                results[i] = Result(rid, None, MODEL_FAILED)
            else:
                # A copy: a result must not keep the whole batch's output alive.
                results[i] = Result(rid, np.array(outputs[row], copy=True))
    done: list[tuple[Request, Result]] = []
    for request, result in zip(requests, results, strict=True):
        assert result is not None
        done.append((request, result))
    return done


def _predict(model: Predictor, instances: list[np.ndarray]) -> np.ndarray | None:
    """The model's output for the stacked instances, or None when the model failed."""
    started = time.perf_counter()
    try:
        outputs = np.asarray(model.predict(np.stack(instances)))
    except Exception as exc:  # any runtime error fails this batch only
        _log.error(
            "model %s failed on a batch of %d: %s", model.name, len(instances), type(exc).__name__
        )
        return None
    if outputs.ndim == 0 or outputs.shape[0] != len(instances):
        _log.error(
            "model %s returned %s rows for a batch of %d",
            model.name,
            outputs.shape[0] if outputs.ndim else "no",
            len(instances),
        )
        return None
    _log.debug(
        "model %s ran a batch of %d in %.1f ms",
        model.name,
        len(instances),
        (time.perf_counter() - started) * 1000.0,
    )
    return outputs
