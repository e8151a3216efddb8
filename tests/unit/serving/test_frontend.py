"""The serving front end in process (no TLS, no Redis): every route, every refusal, the metrics.

The queue is an in-memory fake of the `ServingQueue` contract and a thread plays the worker;
the real queue is covered by the Redis integration tests."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from tests.support.asgi import AsgiClient
from tests.unit.serving.frontend_fakes import (
    MODELS,
    FakeAsyncOps,
    FakeClock,
    FakeQueue,
    FakeWorker,
    JumpingWaiter,
    as_client,
    queued,
)

from ppml.errors import UsageError
from ppml.server.serving_frontend import (
    FrontendSettings,
    PollingWaiter,
    RateLimit,
    TokenBucket,
    create_app,
    to_array,
)
from ppml.serving.contract import ModelInfo
from ppml.serving.metrics import ServingMetrics
from ppml.serving.queue import Result

SECRET = 31337.25  # a value that must never show in a log line or a refusal


@pytest.fixture
def queue() -> FakeQueue:
    return FakeQueue()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(
    queue: FakeQueue,
    clock: FakeClock | None = None,
    *,
    models: dict[str, ModelInfo] | None = None,
    raise_app_exceptions: bool = True,
    **settings: Any,
) -> tuple[AsgiClient, FastAPI]:
    clock = clock or FakeClock()
    app = create_app(
        queue,
        authenticate=as_client,
        models=models if models is not None else {"double": MODELS["double"]},
        settings=FrontendSettings(**settings),
        waiter=JumpingWaiter(clock),
        clock=clock,
    )
    return AsgiClient(app, raise_app_exceptions=raise_app_exceptions), app


@pytest.fixture
def worker(queue: FakeQueue) -> Iterator[FakeWorker]:
    with FakeWorker(queue) as w:
        yield w


def refused(response: httpx.Response, status: int, reason_part: str = "") -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert set(body) >= {"error", "reason"}
    assert reason_part in body["reason"]
    return body


# -- the synchronous route ---------------------------------------------------------------------


def test_predict_answers_each_instance_in_order(queue: FakeQueue, worker: FakeWorker) -> None:
    app = create_app(
        queue, authenticate=as_client, models={"double": MODELS["double"]}
    )  # real polling waiter
    client = AsgiClient(app)
    xs: list[list[float]] = [[1, 2, 3], [4.5, 5, 6], [0, 0, 0.25]]
    r = client.post("/predict", json={"instances": xs})
    assert r.status_code == 200, r.text
    assert r.json() == {"model": "double", "predictions": [[2 * v for v in x] for x in xs]}
    # one queue request per instance, of the model's dtype and shape, and nothing left behind
    assert [a.dtype for _, _, a in queue.submitted] == [np.float32] * 3
    assert [a.shape for _, _, a in queue.submitted] == [(3,)] * 3
    assert queue.results == {}


def test_with_async_ops_the_hot_path_stays_on_the_event_loop(
    queue: FakeQueue, worker: FakeWorker
) -> None:
    aio = FakeAsyncOps(queue)
    client = AsgiClient(
        create_app(queue, authenticate=as_client, models={"double": MODELS["double"]}, aio=aio)
    )
    r = client.post("/predict", json={"instances": [[1, 2, 3], [0, 1, 0]]})
    assert r.json()["predictions"] == [[2, 4, 6], [0, 2, 0]]
    assert aio.calls[0] == "submit_many" and set(aio.calls[1:]) == {"take_if_complete"}
    assert client.post("/v1/requests", json={"id": "a1", "inputs": [1, 1, 1]}).status_code == 202
    assert aio.calls.count("submit_many") == 2
    refused(client.post("/v1/requests", json={"id": "a1", "inputs": [1, 1, 1]}), 409)
    queue.max_length = 0
    refused(client.post("/predict", json={"instances": [[1, 2, 3]]}), 503)
    assert set(queue.results) <= {queued("a1")}  # /predict took its own; "a1" waits for its client


def test_predict_waits_with_the_waiter_until_the_results_come(
    queue: FakeQueue, clock: FakeClock
) -> None:
    waiter = JumpingWaiter(clock, between=queue.process)
    app = create_app(queue, authenticate=as_client, models=MODELS, waiter=waiter, clock=clock)
    r = AsgiClient(app).post("/predict", json={"model": "double", "instances": [[1, 2, 3]]})
    assert r.json()["predictions"] == [[2, 4, 6]]
    assert len(waiter.calls) == 1 and waiter.calls[0][1] == 0


def test_predict_times_out_with_the_ids_to_fetch_later(queue: FakeQueue, clock: FakeClock) -> None:
    client, _ = make(queue, clock, sync_timeout_s=2)
    r = client.post("/predict?timeout=0.5", json={"instances": [[1, 2, 3], [4, 5, 6]]})
    body = refused(r, 504, "0.5 s")
    assert body["error"] == "timeout"
    ids = body["ids"]
    assert len(ids) == 2 and [queued(i) for i in ids] == [i for i, _, _ in queue.submitted]
    assert client.get(f"/v1/requests/{ids[0]}").status_code == 202  # pending, not unknown
    queue.process()
    assert client.get(f"/v1/requests/{ids[1]}").json()["prediction"] == [8, 10, 12]
    taken = client.get("/v1/results").json()["results"]
    assert {t["id"] for t in taken} == set(ids)


def test_predict_timeout_is_capped_by_the_setting(queue: FakeQueue, clock: FakeClock) -> None:
    client, _ = make(queue, clock, sync_timeout_s=1)
    assert "within 1 s" in client.post("/predict?timeout=60", json={"instances": [[1, 2, 3]]}).text


def test_predict_with_a_failed_instance_is_400_naming_it(
    queue: FakeQueue, worker: FakeWorker
) -> None:
    app = create_app(queue, authenticate=as_client, models={"double": MODELS["double"]})
    r = AsgiClient(app).post("/predict", json={"instances": [[1, 2, 3], [-1, -2, -3]]})
    assert refused(r, 400)["reason"] == "instance 1: negative input"


# -- the asynchronous routes -------------------------------------------------------------------


def test_enqueue_then_fetch_pending_done_and_taken(queue: FakeQueue) -> None:
    client, _ = make(queue)
    r = client.post("/v1/requests", json={"id": "req-1", "inputs": [1, 2, 3]})
    assert r.status_code == 202
    assert r.json() == {"id": "req-1", "status": "pending"}
    assert r.headers["location"] == "/v1/requests/req-1"
    assert client.get("/v1/requests/req-1").json() == {"id": "req-1", "status": "pending"}
    queue.process()
    done = client.get("/v1/requests/req-1")
    assert done.status_code == 200
    assert done.json() == {"id": "req-1", "status": "done", "prediction": [2, 4, 6]}
    assert client.get("/v1/requests/req-1").status_code == 200  # reading does not remove
    results = client.get("/v1/results").json()["results"]
    assert results == [{"id": "req-1", "status": "done", "prediction": [2, 4, 6]}]
    assert client.get("/v1/results").json() == {"results": []}
    refused(client.get("/v1/requests/req-1"), 404, "unknown request id")


def test_enqueue_without_id_gets_one_and_instances_form_is_accepted(queue: FakeQueue) -> None:
    client, _ = make(queue)
    r = client.post("/v1/requests", json={"instances": [[1, 2, 3]], "model": "double"})
    assert r.status_code == 202
    request_id = r.json()["id"]
    assert len(request_id) == 32 and queue.submitted[0][0] == queued(request_id)


def test_failed_result_is_400_with_its_reason(queue: FakeQueue) -> None:
    client, _ = make(queue)
    client.post("/v1/requests", json={"id": "bad-1", "inputs": [-1, 0, 0]})
    queue.process()
    body = refused(client.get("/v1/requests/bad-1"), 400, "negative input")
    assert body["status"] == "failed" and body["id"] == "bad-1"
    assert client.get("/v1/results").json()["results"] == [
        {"id": "bad-1", "status": "failed", "reason": "negative input"}
    ]


def test_results_route_takes_only_requests_accepted_for_later(queue: FakeQueue) -> None:
    client, _ = make(queue)
    queue.results["someone-elses"] = Result("someone-elses", np.zeros(3), None)
    assert client.get("/v1/results").json() == {"results": []}
    assert "someone-elses" in queue.results


def test_unknown_and_malformed_ids(queue: FakeQueue) -> None:
    client, _ = make(queue)
    refused(client.get("/v1/requests/never-seen"), 404)
    refused(client.get("/v1/requests/-leading-dash"), 400, "request id")
    refused(client.post("/v1/requests", json={"id": "a/b", "inputs": [1, 2, 3]}), 400)
    refused(client.post("/v1/requests", json={"id": 7, "inputs": [1, 2, 3]}), 400)


def test_duplicate_id_is_409(queue: FakeQueue) -> None:
    client, _ = make(queue)
    assert client.post("/v1/requests", json={"id": "r", "inputs": [1, 2, 3]}).status_code == 202
    body = refused(client.post("/v1/requests", json={"id": "r", "inputs": [1, 2, 3]}), 409)
    assert body["error"] == "conflict"


def test_queue_full_is_503_with_retry_after(queue: FakeQueue) -> None:
    queue.max_length = 1
    client, _ = make(queue, retry_after_s=7)
    assert client.post("/v1/requests", json={"inputs": [1, 2, 3]}).status_code == 202
    r = client.post("/v1/requests", json={"inputs": [1, 2, 3]})
    refused(r, 503, "full")
    assert r.headers["retry-after"] == "7"
    r = client.post("/predict", json={"instances": [[1, 2, 3]]})
    refused(r, 503)
    assert r.headers["retry-after"] == "7"


def test_rate_limit_is_429_with_retry_after(queue: FakeQueue, clock: FakeClock) -> None:
    client, _ = make(queue, clock, rate_limit=RateLimit(rate=0.5, burst=2))
    for _ in range(2):
        assert client.post("/v1/requests", json={"inputs": [1, 2, 3]}).status_code == 202
    r = client.get("/v1/results")
    refused(r, 429)
    assert r.headers["retry-after"] == "2"
    assert client.get("/models").status_code == 200  # not limited
    assert client.get("/healthz").status_code == 200
    clock.advance(2)
    assert client.get("/v1/results").status_code == 200


# -- refusals of malformed input --------------------------------------------------------------

INT8 = {"count": MODELS["count"]}


@pytest.mark.parametrize(
    ("models", "body", "reason"),
    [
        (None, b"{not json", "not valid JSON"),
        (None, b"[1, 2, 3]", "JSON object"),
        (None, b"\xff\xfe", "not valid JSON"),
        (None, b'{"instances": [[NaN, 1, 2]]}', "NaN"),
        (None, b'{"instances": [[Infinity, 1, 2]]}', "NaN"),
        (None, b"[" * 50_000 + b"]" * 50_000, "not valid JSON"),
        (None, {"instances": [[1, 2, 3]], "extra": 1}, "unexpected fields"),
        (None, {}, "non-empty list"),
        (None, {"instances": []}, "non-empty list"),
        (None, {"instances": {"a": 1}}, "non-empty list"),
        (None, {"instances": [[1, 2, 3]] * 5}, "at most 4 instances"),
        (None, {"instances": [[1, 2], [1, 2, 3]]}, "instance 0: expected shape (3), got (2)"),
        (None, {"instances": [[[1, 2, 3]]]}, "expected shape (3), got (1, 3)"),
        (None, {"instances": [[1, [2], 3]]}, "instance 0: ragged"),
        (None, {"instances": [[1, "two", 3]]}, "not an array of numbers"),
        (None, {"instances": [[1, None, 3]]}, "not an array of numbers"),
        (None, {"instances": [[1, {"x": 1}, 3]]}, "not an array of numbers"),
        (None, {"instances": [[True, False, True]]}, "got booleans"),
        (None, {"instances": [[1e300, 0, 0]]}, "out of range for float32"),
        (None, {"instances": [[2**70, 0, 0]]}, "not an array of numbers"),
        (None, {"instances": [[1, 2, 3]], "model": "nope"}, "unknown model"),
        (None, {"instances": [[1, 2, 3]], "model": 5}, "unknown model"),
        (MODELS, {"instances": [[1, 2, 3]]}, "several models"),
        (INT8, {"instances": [[[1, 2], [3, 4]]]}, ""),  # a valid one, as a control
        (INT8, {"instances": [[[1.5, 2], [3, 4]]]}, "expected integers (int8)"),
        (INT8, {"instances": [[[300, 2], [3, 4]]]}, "out of range for int8"),
        (INT8, {"instances": [[[1, 2]]]}, "expected shape (2, *), got (1, 2)"),
    ],
)
def test_malformed_predict_bodies_are_400_with_a_reason(
    queue: FakeQueue, models: dict[str, ModelInfo] | None, body: Any, reason: str
) -> None:
    client, _ = make(queue, models=models, max_instances=4, sync_timeout_s=0.01)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post("/predict", content=content, headers={"content-type": "application/json"})
    if reason == "":
        assert r.status_code == 504  # accepted; no worker runs here
        return
    refused(r, 400, reason)
    assert queue.submitted == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"id": "x"}, "exactly one of 'inputs' and 'instances'"),
        ({"inputs": [1, 2, 3], "instances": [[1, 2, 3]]}, "exactly one of"),
        ({"instances": [[1, 2, 3], [1, 2, 3]]}, "exactly one instance"),
        ({"inputs": [1, 2]}, "inputs: expected shape (3), got (2)"),
        ({"inputs": [1, 2, 3], "timeout": 1}, "unexpected fields"),
    ],
)
def test_malformed_enqueue_bodies_are_400(queue: FakeQueue, body: Any, reason: str) -> None:
    client, _ = make(queue)
    refused(client.post("/v1/requests", json=body), 400, reason)


def test_bad_timeout_parameter_is_400(queue: FakeQueue) -> None:
    client, _ = make(queue)
    refused(client.post("/predict?timeout=-1", json={"instances": [[1, 2, 3]]}), 400)
    refused(client.post("/predict?timeout=soon", json={"instances": [[1, 2, 3]]}), 400)


def test_oversized_bodies_are_413_before_parsing(queue: FakeQueue) -> None:
    client, _ = make(queue, max_body_bytes=100)
    big = json.dumps({"instances": [[1, 2, 3]] * 20}).encode()
    refused(client.post("/predict", content=big), 413, "over 100 bytes")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
        for _ in range(20):
            yield b"[1, 2, 3],"

    r = client.post("/v1/requests", content=chunks())
    refused(r, 413)
    r = client.post("/predict", content=b"{}", headers={"content-length": "nonsense"})
    assert r.status_code in (400, 413)
    assert queue.submitted == []
    metrics = client.get("/metrics").text
    assert 'ppml_serving_errors_total{reason="too_large"}' in metrics


def test_refusals_never_echo_values_into_logs_or_answers(
    queue: FakeQueue, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client, _ = make(queue, models=INT8)
    secret = str(SECRET)
    bodies: list[dict[str, Any]] = [
        {"instances": [[[SECRET, 1], [2, 3]]]},
        {"instances": [[[SECRET, 1]]]},
        {"instances": [[[secret, 1], [2, 3]]]},
        {"instances": [[[1, 2], [3, 4]]], "model": secret},
        {"id": secret + "!", "inputs": [[1, 2], [3, 4]]},
        {secret: 1},
    ]
    for body in bodies:
        r = client.post("/predict" if "instances" in body else "/v1/requests", json=body)
        assert r.status_code == 400
        assert secret not in r.text
    assert caplog.records  # the refusals were logged ...
    assert secret not in caplog.text  # ... without the values


# -- other routes, errors, metrics -------------------------------------------------------------


def test_models_and_health(queue: FakeQueue) -> None:
    client, _ = make(queue, models=MODELS)
    assert client.get("/models").json() == {
        "models": [
            {"name": "double", "input_shape": [3], "dtype": "float32", "output_names": ["y"]},
            {"name": "count", "input_shape": [2, None], "dtype": "int8", "output_names": ["n"]},
        ]
    }
    assert client.get("/healthz").json() == {"status": "ok"}
    queue.fail = ConnectionError
    r = client.get("/healthz")
    assert r.status_code == 503 and r.json() == {"status": "queue unavailable"}


def test_unknown_route_and_method(queue: FakeQueue) -> None:
    client, _ = make(queue)
    refused(client.get("/nowhere"), 404)
    refused(client.get("/predict"), 405)


def test_a_failing_queue_is_an_opaque_500(
    queue: FakeQueue, caplog: pytest.LogCaptureFixture
) -> None:
    client, _ = make(queue, raise_app_exceptions=False)
    queue.fail = RuntimeError
    r = client.post("/v1/requests", json={"inputs": [1, 2, 3]})
    assert r.status_code == 500
    assert r.json() == {"error": "internal error", "reason": "internal error"}
    assert "the backend is down" not in r.text
    metrics = client.get("/metrics").text
    assert 'ppml_serving_requests_total{route="/v1/requests",status="500"} 1.0' in metrics
    assert "ppml_serving_queue_depth NaN" in metrics


def test_metrics_text(queue: FakeQueue, worker: FakeWorker) -> None:
    app = create_app(queue, authenticate=as_client, models={"double": MODELS["double"]})
    client = AsgiClient(app)
    client.post("/predict", json={"instances": [[1, 2, 3], [1, 2, 3]]})
    client.post("/predict", json={"instances": [[1, 2]]})
    client.get("/v1/requests/unknown-1")
    client.get("/v1/requests/unknown-2")
    app.state.metrics.observe_batch(2)
    text = client.get("/metrics").text
    for line in [
        'ppml_serving_requests_total{route="/predict",status="200"} 1.0',
        'ppml_serving_requests_total{route="/predict",status="400"} 1.0',
        'ppml_serving_requests_total{route="/v1/requests/{request_id}",status="404"} 2.0',
        'ppml_serving_request_seconds_count{route="/predict"} 2.0',
        'ppml_serving_errors_total{reason="shape"} 1.0',
        'ppml_serving_errors_total{reason="unknown_id"} 2.0',
        "ppml_serving_instances_total 2.0",
        "ppml_serving_queue_depth 0.0",
        'ppml_serving_batch_size_bucket{le="2.0"} 1.0',
        "ppml_serving_batch_size_count 1.0",
    ]:
        assert line in text, line
    assert "unknown-1" not in text  # labels are route templates, never raw paths


def test_each_app_has_its_own_registry(queue: FakeQueue) -> None:
    shared = ServingMetrics()
    a = create_app(queue, authenticate=as_client, models=MODELS, metrics=shared)
    b = create_app(queue, authenticate=as_client, models=MODELS)
    assert a.state.metrics is shared and b.state.metrics is not shared
    AsgiClient(a).get("/models")
    assert "/models" in AsgiClient(a).get("/metrics").text
    assert 'route="/models"' not in AsgiClient(b).get("/metrics").text


# -- the parts -----------------------------------------------------------------------------------


def test_model_info_validation_and_from_model() -> None:
    for bad in [
        {"name": "", "input_shape": (3,)},
        {"name": "a b", "input_shape": (3,)},
        {"name": "m", "input_shape": (0,)},
        {"name": "m", "input_shape": (3,), "dtype": "str"},
        {"name": "m", "input_shape": (3,), "dtype": "complex64"},
        {"name": "m", "input_shape": (3,), "dtype": "no-such-type"},
        {"name": "m", "input_shape": (3,), "output_names": ()},
    ]:
        with pytest.raises(UsageError):
            ModelInfo(**bad)  # type: ignore[arg-type]
    assert ModelInfo("m", [3, None], np.float64).dtype == "float64"  # type: ignore[arg-type,unused-ignore]

    class Loaded:
        name = "resnet@v2"
        input_shape = (None, 3, 224, 224)
        input_dtype = np.dtype(np.float32)
        output_names = ("logits",)

    info = ModelInfo.from_model(Loaded())
    assert info == ModelInfo("resnet@v2", (3, 224, 224), "float32", ("logits",))
    with pytest.raises(UsageError):
        create_app(FakeQueue(), models={})
    with pytest.raises(UsageError):
        create_app(FakeQueue(), models={"other": MODELS["double"]})


def test_to_array_conversions() -> None:
    f32 = ModelInfo("f", (2,), "float32")
    assert to_array([1, 2], f32, "x").dtype == np.float32
    u8 = ModelInfo("u", (2,), "uint8")
    assert to_array([0, 255], u8, "x").tolist() == [0, 255]
    b = ModelInfo("b", (2,), "bool")
    assert to_array([True, False], b, "x").dtype == np.bool_
    for info, value in [(u8, [-1, 0]), (b, [1, 0]), (u8, [1.0, 2.0])]:
        with pytest.raises(Exception, match="x: "):
            to_array(value, info, "x")


def test_token_bucket(clock: FakeClock) -> None:
    bucket = TokenBucket(RateLimit(rate=2, burst=3), clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)
    clock.advance(0.5)
    assert bucket.take() == 0.0
    clock.advance(100)
    assert [bucket.take() for _ in range(4)][-1] > 0  # refills to the burst, no further
    for bad in [(0, 1), (1, 0), (math.inf, 1)]:
        with pytest.raises(UsageError):
            RateLimit(*bad)


def test_polling_waiter_backs_off_up_to_the_cap_and_the_deadline() -> None:
    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)

    waiter = PollingWaiter(initial_s=0.01, max_s=0.05, sleep=sleep)

    async def go() -> None:
        for attempt in range(5):
            await waiter.wait(["a"], attempt, 10.0)
        await waiter.wait(["a"], 9, 0.003)

    asyncio.run(go())
    assert delays == pytest.approx([0.01, 0.02, 0.04, 0.05, 0.05, 0.003])


def test_settings_validation() -> None:
    bads: list[dict[str, Any]] = [
        {"sync_timeout_s": 0},
        {"max_body_bytes": 0},
        {"max_instances": 0},
        {"retry_after_s": 0},
        {"pending_ttl_s": 0},
        {"max_tracked": 0},
    ]
    for bad in bads:
        with pytest.raises(UsageError):
            FrontendSettings(**bad)


def test_accepted_ids_expire_and_are_bounded(queue: FakeQueue, clock: FakeClock) -> None:
    client, _ = make(queue, clock, pending_ttl_s=10, max_tracked=2)
    for i in range(3):
        client.post("/v1/requests", json={"id": f"r{i}", "inputs": [1, 2, 3]})
    assert client.get("/v1/requests/r0").status_code == 404  # forgotten: over the bound
    assert client.get("/v1/requests/r2").status_code == 202
    clock.advance(11)
    assert client.get("/v1/requests/r2").status_code == 404  # expired


def test_non_finite_outputs_are_failed_results_not_crashes(queue: FakeQueue) -> None:
    client, _ = make(queue)
    for name, array in [("nan", np.array([np.nan, 1.0])), ("text", np.array(["a"]))]:
        client.post("/v1/requests", json={"id": name, "inputs": [1, 2, 3]})
        queue.pending.pop(queued(name))
        queue.results[queued(name)] = Result(queued(name), array, None)
    refused(client.get("/v1/requests/nan"), 400, "not a finite number")
    refused(client.get("/v1/requests/text"), 400, "no numeric output")
    results = client.get("/v1/results").json()["results"]
    assert {r["status"] for r in results} == {"failed"}

    def answer_nan() -> None:
        for request_id in list(queue.pending):
            queue.pending.pop(request_id)
            queue.results[request_id] = Result(request_id, np.array([np.inf]), None)

    clock = FakeClock()
    app = create_app(
        queue,
        authenticate=as_client,
        models=MODELS,
        waiter=JumpingWaiter(clock, between=answer_nan),
        clock=clock,
    )
    r = AsgiClient(app).post("/predict", json={"model": "double", "instances": [[1, 2, 3]]})
    refused(r, 400, "instance 0: the model's output is not a finite number")


@pytest.mark.parametrize("path", ["/v1/results/", "/predict/", "/v1/requests/"])
def test_a_trailing_slash_is_never_redirected(queue: FakeQueue, path: str) -> None:
    client, _ = make(queue)
    r = client.request("GET" if "results" in path else "POST", path, headers={"host": "x.example"})
    assert r.status_code in (404, 405) and "location" not in r.headers
