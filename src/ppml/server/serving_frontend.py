"""The HTTPS front end of Trusted Cluster Serving: JSON in, queue requests out, results back.

Clients send instances as nested JSON lists; the front end checks them against the served
model (shape, dtype, finite numbers), submits **one queue request per instance** and answers by
request id. One request per instance is what lets the workers batch across clients (the
batcher stacks instances of any origin), keeps a result addressable by one id, and keeps the
order of a `/predict` answer trivially the order of its ids. The instances of one call are
submitted together, in one round trip, and accepted all or none (a `QueueFull` accepts none).
A `/predict` call then waits for its results with a `ResultWaiter`: the `ResultNotifier`
(woken by the workers' notifications, see `ppml.serving.notify`) in deployments, polling
otherwise; it takes them in one round trip when all are there.

An instance may also be an image file, as ``{"b64": "<base64 of the file>"}`` (TensorFlow
Serving's form for binary values), when the deployment takes images (`ModelInfo.image`): the
front end checks the base64, the size (413 over the image limit) and the format by its magic
bytes (400 if it is not PNG, JPEG, GIF, BMP or WebP), never decodes it, and queues the file's
bytes sealed; the worker decodes and preprocesses it, and answers an image that does not decode
with an error result.

Routes::

    POST /predict?timeout=S      {"instances": [...], "model"?}  -> 200 {"predictions": [...]}
                                 504 {"ids": [...]} when the results are late: fetch them later
    POST /v1/requests            {"id"?, "model"?, "inputs": x} -> 202 {"id", "status": "pending"}
                                 ("instances": [x] is accepted too, with exactly one instance)
    GET  /v1/requests/{id}       200 done {"prediction"} | 202 pending | 400 failed {"reason"}
                                 | 404 unknown (never accepted here, taken, or expired)
    GET  /v1/results             200 {"results": [...]}: every finished result of the requests
                                 accepted by /v1/requests (or left over by a 504), removed
    GET  /models, /metrics, /healthz
    GET  /queue                  200 {"depth": n}: requests accepted and not yet answered (the
                                 queue's own count) | 503 when the queue cannot be reached

Clients authenticate with a certificate of the workspace CA (mutual TLS; `ppml serving client
issue NAME` makes one): the boundary (`ppml.server.boundary`) answers 401 to a data route
without one before reading its body. Every request id belongs to the client that submitted it:
the queue holds it behind the client's tag, so that two clients may use the same id, no client
can read, take or squat another's, and `GET /v1/results` returns the caller's results only.
`/healthz`, `/models`, `/metrics` and `/queue` are anonymous, rate limited per address.

Refusals are ``{"error": <fixed text>, "reason": <what was wrong>}``; a reason names positions,
shapes and dtypes, never values from the request, and neither do the logs. 413 when the body
is over `max_body_bytes` (checked before anything parses it), 429 and 503 carry Retry-After.

Pending and unknown: the queue's `result()` cannot tell a pending request from an unknown one,
so this front end remembers the ids it accepted (bounded, for `pending_ttl_s`). Behind several
front ends without sticky routing, a pending request asked of another replica reads as 404
until its result exists; a queue-side "is this id accepted" would remove that limit.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, NoReturn, Protocol

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ppml import names
from ppml._internal.clock import MonotonicClock
from ppml.data.payload import EncodedImage
from ppml.errors import UsageError
from ppml.server import boundary as _boundary
from ppml.server.boundary import (
    PEER_CERT_EXTENSION,
    Authenticator,
    Principal,
    RateLimit,
    TokenBucket,
    principal_of,
)
from ppml.serving.contract import NUMERIC_KINDS, ModelInfo, format_shape
from ppml.serving.image import FORMATS, sniff_format
from ppml.serving.metrics import CONTENT_TYPE, ServingMetrics
from ppml.serving.queue import DuplicateRequest, QueueFull, Result

__all__ = [
    "CATALOGUE",
    "AsyncQueueLike",
    "ClientTag",
    "FrontendSettings",
    "ModelInfo",
    "PollingWaiter",
    "QueueLike",
    "RateLimit",
    "ResultWaiter",
    "TokenBucket",
    "client_certificates",
    "create_app",
]

_log = logging.getLogger("ppml.serving")

# One catalogue for every service (ppml.server.boundary).
CATALOGUE = _boundary.CATALOGUE
_PUBLIC_LIMIT = RateLimit(50.0, 100)  # /healthz, /models, /metrics, per client address
_REFUSALS = RateLimit(1.0, 30)  # refused data calls (401) per client address


Input = np.ndarray | EncodedImage  # one instance as queued: an array, or an image file's bytes

# -- what is served, and how -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FrontendSettings:
    sync_timeout_s: float = 10.0  # the longest /predict waits (a client may ask for less)
    max_body_bytes: int = 1024 * 1024
    max_instances: int = 256  # per /predict call
    rate_limit: RateLimit | None = None  # over the data routes (predict, /v1/*), per client
    retry_after_s: int = 1  # told to clients on 503 (queue full)
    pending_ttl_s: float = 3600.0  # how long an accepted id is remembered (the result TTL)
    max_tracked: int = 100_000  # accepted ids remembered at most (the oldest are forgotten)

    def __post_init__(self) -> None:
        if not self.sync_timeout_s > 0 or self.max_body_bytes < 1 or self.max_instances < 1:
            raise UsageError("sync_timeout_s, max_body_bytes and max_instances must be positive")
        if self.retry_after_s < 1 or not self.pending_ttl_s > 0 or self.max_tracked < 1:
            raise UsageError("retry_after_s, pending_ttl_s and max_tracked must be positive")


class QueueLike(Protocol):
    """What the front end uses of `ppml.serving.queue.ServingQueue` (blocking calls; the front
    end runs them in worker threads)."""

    def submit_many(self, requests: Sequence[tuple[str, str, Input]]) -> None: ...
    def depth(self) -> int: ...
    def result(self, request_id: str) -> Result | None: ...
    def take_if_complete(self, request_ids: Sequence[str]) -> list[Result | None]: ...
    def take_results(self, request_ids: Iterable[str] | None = None) -> list[Result]: ...


class AsyncQueueLike(Protocol):
    """The queue as the front end's routes use it, as coroutines: `ppml.serving.queue.AsyncQueueOps`
    over an asyncio Redis client, or any `QueueLike` run in worker threads."""

    async def submit_many(self, requests: Sequence[tuple[str, str, Input]]) -> None: ...
    async def take_if_complete(self, request_ids: Sequence[str]) -> list[Result | None]: ...
    async def result(self, request_id: str) -> Result | None: ...
    async def take_results(self, request_ids: Sequence[str]) -> list[Result]: ...
    async def depth(self) -> int: ...


class ResultWaiter(Protocol):
    """How `/predict` waits between two looks at the queue: `PollingWaiter` by default, the
    `ppml.serving.notify.ResultNotifier` in deployments (it returns as soon as one of
    `request_ids` may have a result)."""

    async def wait(self, request_ids: Sequence[str], attempt: int, remaining_s: float) -> None: ...


@dataclass(frozen=True, slots=True)
class PollingWaiter:
    """Exponential backoff: `initial_s`, doubling, at most `max_s`, never past the deadline."""

    initial_s: float = 0.001
    max_s: float = 0.01
    sleep: Callable[[float], Awaitable[None]] | None = None

    async def wait(self, request_ids: Sequence[str], attempt: int, remaining_s: float) -> None:
        import asyncio

        delay = min(self.initial_s * (2 ** min(attempt, 30)), self.max_s, max(remaining_s, 0.0))
        await (self.sleep or asyncio.sleep)(delay)


class _Accepted:
    """The ids this front end accepted for later fetching, oldest first, bounded and expiring."""

    def __init__(self, ttl_s: float, capacity: int, clock: MonotonicClock) -> None:
        self._ttl = ttl_s
        self._capacity = capacity
        self._clock = clock
        self._ids: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, ids: Iterable[str]) -> None:
        with self._lock:
            now = self._clock()
            for request_id in ids:
                self._ids[request_id] = now
                self._ids.move_to_end(request_id)
            self._expire(now)

    def __contains__(self, request_id: str) -> bool:
        with self._lock:
            self._expire(self._clock())
            return request_id in self._ids

    def ids(self) -> list[str]:
        with self._lock:
            self._expire(self._clock())
            return list(self._ids)

    def discard(self, ids: Iterable[str]) -> None:
        with self._lock:
            for request_id in ids:
                self._ids.pop(request_id, None)

    def _expire(self, now: float) -> None:
        while self._ids:
            oldest, at = next(iter(self._ids.items()))
            if now - at <= self._ttl and len(self._ids) <= self._capacity:
                break
            del self._ids[oldest]


# -- clients ------------------------------------------------------------------------------------


class ClientTag:
    """How one client's request ids are held in the queue: behind a tag of 16 hex digits derived
    from the client's name, so that ids are scoped per client."""

    __slots__ = ("prefix",)

    def __init__(self, name: str) -> None:
        digest = hashlib.sha256(b"ppml/serving/client/v1\x00" + name.encode()).hexdigest()
        self.prefix = digest[:16] + "."

    def queued(self, request_id: str) -> str:
        return self.prefix + request_id

    def owns(self, queued_id: str) -> bool:
        return queued_id.startswith(self.prefix)

    def external(self, queued_id: str) -> str:
        return queued_id[len(self.prefix) :]


def client_certificates() -> Authenticator:
    """Authenticates a client by its certificate (verified against the workspace CA by the TLS
    layer, with the client-authentication usage): the client's name is the certificate's
    common name."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    async def authenticate(scope: Any) -> Principal:
        der = scope.get("extensions", {}).get(PEER_CERT_EXTENSION)
        if der:
            try:
                cert = x509.load_der_x509_certificate(der)
                names_ = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            except ValueError:
                names_ = []
            if names_ and isinstance(names_[0].value, str) and names_[0].value:
                return Principal("certificate", names_[0].value)
        raise _Refused(401, "no_client_certificate", "a client certificate is required")

    return authenticate


# -- refusals ----------------------------------------------------------------------------------


_Refused = _boundary.Refused


def _bad(code: str, reason: str) -> NoReturn:
    raise _Refused(400, code, reason)


def _refusal_response(exc: _Refused) -> JSONResponse:
    return exc.response()


# -- parsing at the boundary ---------------------------------------------------------------------


def _reject_constant(name: str) -> NoReturn:
    _bad("non_numeric", "NaN and Infinity are not numbers here")


async def _read_json(request: Request) -> dict[str, Any]:
    """The JSON object of the body (the boundary refused one over the body limit already)."""
    try:
        body = json.loads(await request.body(), parse_constant=_reject_constant)
    except _Refused:
        raise
    except (ValueError, RecursionError):
        _bad("bad_json", "the body is not valid JSON")
    if not isinstance(body, dict):
        _bad("bad_json", "the body must be a JSON object")
    return body


def _fields(body: Mapping[str, Any], allowed: set[str]) -> None:
    if set(body) - allowed:
        _bad("bad_field", f"unexpected fields; allowed: {sorted(allowed)}")


def _model(body: Mapping[str, Any], models: Mapping[str, ModelInfo]) -> ModelInfo:
    name = body.get("model")
    if name is None:
        if len(models) == 1:
            return next(iter(models.values()))
        _bad("unknown_model", "several models are served: name one in 'model'")
    if not isinstance(name, str) or name not in models:
        _bad("unknown_model", "unknown model")
    return models[name]


def _shape_text(shape: Sequence[int | None]) -> str:
    return "(" + format_shape(shape, ", ") + ")"


def to_array(value: Any, info: ModelInfo, where: str) -> np.ndarray:
    """One instance (nested lists of numbers) as an array of the model's shape and dtype."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        _bad("ragged", f"{where}: ragged nested lists")
    if array.dtype.kind not in NUMERIC_KINDS:
        _bad("non_numeric", f"{where}: not an array of numbers")
    expected = info.input_shape
    if array.ndim != len(expected) or any(
        d is not None and d != n for d, n in zip(expected, array.shape, strict=True)
    ):
        _bad(
            "shape",
            f"{where}: expected shape {_shape_text(expected)}, got {_shape_text(array.shape)}",
        )
    target = np.dtype(info.dtype)
    if target.kind == "b":
        if array.dtype.kind != "b":
            _bad("dtype", f"{where}: expected booleans")
        return array.astype(target)
    if array.dtype.kind == "b":
        _bad("dtype", f"{where}: expected numbers, got booleans")
    if target.kind in "iu":
        if array.dtype.kind == "f":
            _bad("dtype", f"{where}: expected integers ({info.dtype})")
        limits = np.iinfo(target)
        if array.size and (int(array.min()) < limits.min or int(array.max()) > limits.max):
            _bad("dtype", f"{where}: integers out of range for {info.dtype}")
        return array.astype(target)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is detected just below
        converted = array.astype(target)
    if not np.all(np.isfinite(converted)):
        _bad("dtype", f"{where}: numbers out of range for {info.dtype}")
    return converted


def to_input(value: Any, info: ModelInfo, where: str) -> Input:
    """One instance: nested lists of numbers (`to_array`), or ``{"b64": ...}``, an image file
    checked as far as it can be without decoding it (base64, size, format)."""
    if not isinstance(value, dict):
        return to_array(value, info, where)
    if set(value) != {"b64"} or not isinstance(value["b64"], str):
        _bad("bad_field", f'{where}: an object instance is {{"b64": "<base64 of an image file>"}}')
    spec = info.image
    if spec is None:
        _bad("no_images", f"{where}: this deployment takes no images (send numbers)")
    text = value["b64"]
    if len(text) > 4 * ((spec.max_bytes + 2) // 3) + 4:  # before decoding anything
        raise _Refused(413, "image_too_large", f"{where}: the image is over {spec.max_bytes} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        _bad("bad_base64", f"{where}: 'b64' is not valid base64")
    if len(data) > spec.max_bytes:
        raise _Refused(413, "image_too_large", f"{where}: the image is over {spec.max_bytes} bytes")
    if sniff_format(data) is None:
        _bad(
            "not_an_image",
            f"{where}: not an image file of a supported format ({', '.join(FORMATS)})",
        )
    return EncodedImage(data)


def _request_id(value: Any) -> str:
    # The queue's own rule (ppml.names), checked here so that a refusal is a 400 with a reason.
    if not names.REQUEST_ID.ok(value):
        _bad("bad_id", f"a request id is {names.REQUEST_ID.description}")
    return str(value)


_NOT_FINITE = "the model's output is not a finite number"


def _checked(result: Result) -> Result:
    """A result fit for JSON: an output that is missing, non-numeric or not finite (JSON has
    no NaN) becomes an error result."""
    array = result.array
    if result.error is not None:
        return result
    if array is None or array.dtype.kind not in NUMERIC_KINDS:
        return Result(result.request_id, None, "the model gave no numeric output")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        return Result(result.request_id, None, _NOT_FINITE)
    return result


def _answer(result: Result, request_id: str) -> dict[str, Any]:
    assert result.array is not None
    return {"id": request_id, "status": "done", "prediction": result.array.tolist()}


# -- the app -------------------------------------------------------------------------------------


class _InThreads:
    """The synchronous queue as an `AsyncQueueLike`: each call in a worker thread."""

    def __init__(self, queue: QueueLike) -> None:
        self._queue = queue

    async def submit_many(self, requests: Sequence[tuple[str, str, Input]]) -> None:
        await run_in_threadpool(self._queue.submit_many, requests)

    async def take_if_complete(self, request_ids: Sequence[str]) -> list[Result | None]:
        return await run_in_threadpool(self._queue.take_if_complete, request_ids)

    async def result(self, request_id: str) -> Result | None:
        return await run_in_threadpool(self._queue.result, request_id)

    async def take_results(self, request_ids: Sequence[str]) -> list[Result]:
        return await run_in_threadpool(self._queue.take_results, request_ids)

    async def depth(self) -> int:
        return await run_in_threadpool(self._queue.depth)


class _FrontEnd:
    """What the routes do, over one asynchronous queue (`aio`)."""

    def __init__(
        self,
        aio: AsyncQueueLike,
        models: Mapping[str, ModelInfo],
        settings: FrontendSettings,
        metrics: ServingMetrics,
        waiter: ResultWaiter,
        clock: MonotonicClock,
        new_id: Callable[[], str],
    ) -> None:
        self.aio = aio
        self.models = models
        self.settings = settings
        self.metrics = metrics
        self.waiter = waiter
        self.clock = clock
        self.new_id = new_id
        self.accepted = _Accepted(settings.pending_ttl_s, settings.max_tracked, clock)

    async def submit_all(self, model: str, items: Sequence[tuple[str, Input]]) -> None:
        requests = [(request_id, model, array) for request_id, array in items]
        try:
            await self.aio.submit_many(requests)
        except QueueFull:
            raise _Refused(
                503,
                "queue_full",
                "the queue is full: retry later",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            ) from None
        except DuplicateRequest:
            raise _Refused(
                409, "duplicate", "a request with this id was accepted already"
            ) from None
        except UsageError:  # the queue's own checks (its message may quote the request)
            _bad("refused", "the queue refused the request")
        self.metrics.instances.inc(len(items))

    async def predict(
        self, tag: ClientTag, body: Mapping[str, Any], timeout: float | None
    ) -> dict[str, Any]:
        _fields(body, {"instances", "model"})
        info = _model(body, self.models)
        instances = body.get("instances")
        if not isinstance(instances, list) or not instances:
            _bad("bad_field", "'instances' must be a non-empty list")
        if len(instances) > self.settings.max_instances:
            _bad("too_many", f"at most {self.settings.max_instances} instances per call")
        arrays = [to_input(x, info, f"instance {i}") for i, x in enumerate(instances)]
        base = self.new_id()
        ids = [tag.queued(f"{base}-{i}") for i in range(len(arrays))]
        await self.submit_all(info.name, list(zip(ids, arrays, strict=True)))
        wait_s = min(timeout or self.settings.sync_timeout_s, self.settings.sync_timeout_s)
        found = await self._results_within(tag, ids, wait_s)
        predictions = []
        for n, i in enumerate(ids):
            array, error = found[i].array, found[i].error
            if error is not None or array is None:
                _bad("failed", f"instance {n}: {error or 'no output'}")
            predictions.append(array.tolist())
        return {"model": info.name, "predictions": predictions}

    async def _results_within(
        self, tag: ClientTag, ids: Sequence[str], wait_s: float
    ) -> dict[str, Result]:
        """The results of `ids`, taken together once all are there; a 504 after `wait_s`."""
        deadline = self.clock() + wait_s
        attempt = 0
        while True:
            # Wait first: a result is never there right after submitting (a worker needs at
            # least a batch), and a notifying waiter returns as soon as one is stored.
            await self.waiter.wait(ids, attempt, deadline - self.clock())
            attempt += 1
            fetched = await self.aio.take_if_complete(ids)
            if all(r is not None for r in fetched):
                return {r.request_id: _checked(r) for r in fetched if r is not None}
            if deadline - self.clock() <= 0:
                self.accepted.add(ids)  # the client may fetch them with /v1/requests or results
                raise _Refused(
                    504,
                    "timeout",
                    f"no result within {wait_s:g} s: fetch them later by id",
                    extra={"ids": [tag.external(i) for i in ids]},
                )

    async def enqueue(self, tag: ClientTag, body: Mapping[str, Any]) -> str:
        _fields(body, {"id", "model", "inputs", "instances"})
        info = _model(body, self.models)
        request_id = _request_id(body["id"]) if "id" in body else self.new_id()
        if ("inputs" in body) == ("instances" in body):
            _bad("bad_field", "give exactly one of 'inputs' and 'instances'")
        if "instances" in body:
            instances = body["instances"]
            if not isinstance(instances, list) or len(instances) != 1:
                _bad("bad_field", "'instances' must hold exactly one instance per request id")
            value = instances[0]
        else:
            value = body["inputs"]
        array = to_input(value, info, "inputs")
        await self.submit_all(info.name, [(tag.queued(request_id), array)])
        self.accepted.add([tag.queued(request_id)])
        return request_id

    async def fetch(self, tag: ClientTag, request_id: str) -> JSONResponse:
        _request_id(request_id)
        queued = tag.queued(request_id)
        result = await self.aio.result(queued)
        result = _checked(result) if result is not None else None
        if result is None:
            if queued in self.accepted:
                return JSONResponse({"id": request_id, "status": "pending"}, status_code=202)
            raise _Refused(
                404, "unknown_id", "unknown request id (never accepted, taken or expired)"
            )
        if result.error is not None:
            raise _Refused(
                400, "failed", result.error, extra={"id": request_id, "status": "failed"}
            )
        return JSONResponse(_answer(result, request_id))

    async def results(self, tag: ClientTag) -> list[dict[str, Any]]:
        ids = [i for i in self.accepted.ids() if tag.owns(i)]
        taken = await self.aio.take_results(ids) if ids else []
        self.accepted.discard(r.request_id for r in taken)
        return [
            _answer(r, tag.external(r.request_id))
            if r.error is None
            else {"id": tag.external(r.request_id), "status": "failed", "reason": r.error}
            for r in map(_checked, taken)
        ]

    async def depth(self) -> int | None:
        """The queue's depth, None when the queue cannot be reached."""
        try:
            return int(await self.aio.depth())
        except Exception as exc:  # whatever the backend raises, the answer is "not ready"
            _log.warning("health check: queue unavailable: %s", type(exc).__name__)
            return None


def create_app(
    queue: QueueLike,
    *,
    models: Mapping[str, ModelInfo],
    settings: FrontendSettings | None = None,
    metrics: ServingMetrics | None = None,
    waiter: ResultWaiter | None = None,
    aio: AsyncQueueLike | None = None,
    clock: MonotonicClock = time.monotonic,
    new_id: Callable[[], str] = lambda: secrets.token_hex(16),
    authenticate: Authenticator | None = None,
) -> FastAPI:
    """The front end over `queue`, serving `models` (keyed by name). `app.state.metrics` is the
    `ServingMetrics` (pass one in to share it with in-process workers). With `aio` (the same
    queue over an asyncio Redis client), submitting and taking results run on the event loop
    instead of a thread each: a thread hop costs more CPU than the Redis call itself.
    `authenticate`: how clients authenticate on the data routes (default: by certificate,
    `client_certificates`)."""
    if not models:
        raise UsageError("a front end serves at least one model")
    if any(name != info.name for name, info in models.items()):
        raise UsageError("models must be keyed by their names")
    settings = settings or FrontendSettings()
    metrics = metrics or ServingMetrics()
    metrics.track_queue_depth(queue.depth)
    front = _FrontEnd(
        aio if aio is not None else _InThreads(queue),
        models,
        settings,
        metrics,
        waiter or PollingWaiter(),
        clock,
        new_id,
    )
    app = _new_app(settings, metrics, clock, authenticate or client_certificates())
    _add_refusal_handlers(app, metrics)
    _add_data_routes(app, front)
    _add_public_routes(app, front)
    return app


def _new_app(
    settings: FrontendSettings,
    metrics: ServingMetrics,
    clock: MonotonicClock,
    authenticate: Authenticator,
) -> FastAPI:
    """The app with its boundary (authentication, limits, body sizes) and its observer."""
    app = FastAPI(
        title="ppml serving front end",
        version="1",
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        redirect_slashes=False,  # a 404, never a redirect built from the Host header
    )
    app.state.metrics = metrics
    rules = [
        _boundary.Rule(
            "public",
            r"/healthz|/models|/metrics|/queue",
            frozenset({"GET", "HEAD"}),
            limit=_PUBLIC_LIMIT,
            max_body=0,
        ),
        _boundary.Rule(
            "data",
            r"/predict|/v1/requests|/v1/requests/[^/]+|/v1/results",
            authenticate=authenticate,
            limit=settings.rate_limit,
            refusals=_REFUSALS,
            max_body=settings.max_body_bytes,
        ),
    ]
    app.add_middleware(
        _boundary.Boundary,
        rules=rules,
        default_body=0,
        on_refused=lambda scope, exc: metrics.observe_error(exc.code),
        clock=clock,
        log=_log,
    )
    app.add_middleware(_Observe, metrics=metrics)  # outermost: boundary refusals are counted
    return app


def _add_refusal_handlers(app: FastAPI, metrics: ServingMetrics) -> None:
    @app.exception_handler(_Refused)
    async def _refused(request: Request, exc: _Refused) -> JSONResponse:
        metrics.observe_error(exc.code)
        _log.info(
            "refused %s %s: %d %s", request.method, _route(request.scope), exc.status, exc.code
        )
        return _refusal_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await _refused(request, _Refused(400, "bad_parameter", "invalid query parameter"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _refusal_response(_Refused(500, "internal", CATALOGUE[500]))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code if exc.status_code in CATALOGUE else 400
        return _refusal_response(_Refused(status, "http", CATALOGUE[status]))


def _tag_of(request: Request) -> ClientTag:
    principal = principal_of(request.scope)
    if principal is None:  # the boundary admits no data call without one
        raise _Refused(401, "no_client")
    return ClientTag(principal.name)


def _add_data_routes(app: FastAPI, front: _FrontEnd) -> None:
    @app.post("/predict")
    async def predict(
        request: Request, timeout: Annotated[float | None, Query(gt=0)] = None
    ) -> JSONResponse:
        tag = _tag_of(request)
        return JSONResponse(await front.predict(tag, await _read_json(request), timeout))

    @app.post("/v1/requests", status_code=202)
    async def enqueue(request: Request) -> JSONResponse:
        tag = _tag_of(request)
        request_id = await front.enqueue(tag, await _read_json(request))
        return JSONResponse(
            {"id": request_id, "status": "pending"},
            status_code=202,
            headers={"Location": f"/v1/requests/{request_id}"},
        )

    @app.get("/v1/requests/{request_id}")
    async def fetch(request_id: str, request: Request) -> JSONResponse:
        return await front.fetch(_tag_of(request), request_id)

    @app.get("/v1/results")
    async def results(request: Request) -> JSONResponse:
        return JSONResponse({"results": await front.results(_tag_of(request))})


def _add_public_routes(app: FastAPI, front: _FrontEnd) -> None:
    catalogue_models = {"models": [m.to_dict() for m in front.models.values()]}

    @app.get("/models")
    async def list_models() -> JSONResponse:
        return JSONResponse(catalogue_models)

    @app.get("/metrics")
    async def scrape() -> Response:
        return Response(await run_in_threadpool(front.metrics.render), media_type=CONTENT_TYPE)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        if await front.depth() is None:
            return JSONResponse({"status": "queue unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/queue")
    async def depth() -> JSONResponse:
        depth = await front.depth()
        if depth is None:
            return JSONResponse({"status": "queue unavailable"}, status_code=503)
        return JSONResponse({"depth": depth})


# -- observing every request -----------------------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def _route(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class _Observe:
    """Counts each answer by route template and status, and times it. Outermost, so that an
    unexpected exception (answered 500 by Starlette) is counted too."""

    def __init__(
        self, app: Callable[[Scope, Receive, Send], Awaitable[None]], metrics: ServingMetrics
    ):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:
            self.metrics.observe_error("internal")
            _log.error("internal error on %s %s", scope.get("method"), _route(scope))
            status = 500
            raise
        finally:
            self.metrics.observe_request(_route(scope), status, time.perf_counter() - start)
