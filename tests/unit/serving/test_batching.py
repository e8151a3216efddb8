"""Dynamic batching: gathering with an injected clock, validation and model failures per request."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from tests.support.clock import FakeMonotonicClock as FakeClock
from tests.support.serving_models import INPUT_DIM, OUTPUT_DIM, mlp_onnx_bytes, mlp_reference

from ppml.errors import UsageError
from ppml.serving.batching import MODEL_FAILED, BatchSettings, gather, run_batch
from ppml.serving.model import InputSignature, Model, load_model_bytes
from ppml.serving.queue import Request


class Arrivals:
    """A fetch function over items arriving at given clock times. A fetch returns what has
    arrived (up to `max_count`); with nothing there it blocks until the next arrival or its
    timeout (0: no blocking). `sleep` advances the clock, as time passing does."""

    def __init__(self, clock: FakeClock, arrivals: list[tuple[float, int]]) -> None:
        self.clock = clock
        self.arrivals = sorted((clock.now + dt, item) for dt, item in arrivals)
        self.calls: list[tuple[int, int]] = []
        self.slept: list[float] = []

    def __call__(self, max_count: int, timeout_ms: int) -> list[int]:
        self.calls.append((max_count, timeout_ms))
        if not self._ready() and timeout_ms > 0:
            wake = self.clock.now + timeout_ms / 1000.0
            if self.arrivals and self.arrivals[0][0] <= wake:
                wake = self.arrivals[0][0]
            self.clock.now = wake
        got = self._ready()[:max_count]
        del self.arrivals[: len(got)]
        return [item for _t, item in got]

    def _ready(self) -> list[tuple[float, int]]:
        return [a for a in self.arrivals if a[0] <= self.clock.now]

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.clock.now += seconds


def _gather(source: Arrivals, settings: BatchSettings, **kw: Any) -> list[int]:
    return gather(source, settings, clock=source.clock, sleep=source.sleep, **kw)


# -- gather -------------------------------------------------------------------------------------


def test_gather_returns_nothing_when_nothing_comes() -> None:
    source = Arrivals(FakeClock(), [])
    assert _gather(source, BatchSettings(8, 10), first_wait_ms=500) == []
    assert source.calls == [(8, 500)] and source.slept == []


def test_gather_fills_until_the_batch_is_full_without_blocking_again() -> None:
    source = Arrivals(FakeClock(), [(0.0, 1), (0.0, 2), (0.001, 3), (0.002, 4), (0.002, 5)])
    assert _gather(source, BatchSettings(4, 10), first_wait_ms=1000) == [1, 2, 3, 4]
    assert source.calls[0] == (4, 1000)
    assert all(timeout == 0 for _n, timeout in source.calls[1:])  # fills never block
    assert [n for n, _t in source.calls if n != 4] == sorted(
        (n for n, _t in source.calls if n != 4), reverse=True
    )
    assert source.arrivals  # item 5 stays for the next batch


def test_gather_waits_at_most_max_wait_after_the_first() -> None:
    clock = FakeClock()
    # The first item arrives after 0.3 s of blocking; the wait counts from then.
    arrivals = [(0.3, 1), (0.304, 2), (0.308, 3), (0.312, 4)]
    source = Arrivals(clock, arrivals)
    start = clock.now
    assert _gather(source, BatchSettings(16, 10), first_wait_ms=1000) == [1, 2, 3]
    assert clock.now - start == pytest.approx(0.310)  # 4 would come 12 ms after the first
    assert max(source.slept) <= 0.0005 + 1e-12
    assert sum(source.slept) == pytest.approx(0.010)


def test_an_empty_poll_does_not_end_the_filling() -> None:
    source = Arrivals(FakeClock(), [(0.0, 1), (0.005, 2)])
    assert _gather(source, BatchSettings(4, 10), first_wait_ms=50) == [1, 2]


def test_gather_without_wait_takes_only_what_the_first_fetch_brings() -> None:
    source = Arrivals(FakeClock(), [(0.0, 1), (0.0, 2), (0.0001, 3)])
    assert _gather(source, BatchSettings(4, 0), first_wait_ms=50) == [1, 2]
    assert len(source.calls) == 1 and source.slept == []


def test_the_poll_interval_is_configurable() -> None:
    source = Arrivals(FakeClock(), [(0.0, 1)])
    assert _gather(source, BatchSettings(4, 10), first_wait_ms=50, poll_ms=2.5) == [1]
    assert source.slept == pytest.approx([0.0025] * 4)
    with pytest.raises(UsageError):
        _gather(source, BatchSettings(4, 10), first_wait_ms=50, poll_ms=0)


def test_gather_stops_filling_when_asked_but_keeps_what_it_has() -> None:
    source = Arrivals(FakeClock(), [(0.0, 1), (0.0001, 2)])
    stopped = iter([False, True])
    got = _gather(source, BatchSettings(4, 10), first_wait_ms=50, stop=lambda: next(stopped))
    assert got == [1, 2]


def test_settings_are_checked() -> None:
    with pytest.raises(UsageError):
        BatchSettings(0, 5)
    with pytest.raises(UsageError):
        BatchSettings(8, -1)
    with pytest.raises(UsageError):
        gather(lambda n, t: [], BatchSettings(), first_wait_ms=0)


# -- run_batch ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp() -> Model:
    return load_model_bytes(mlp_onnx_bytes(), name="mlp")


def _request(i: int, array: Any, model: str = "mlp") -> Request:
    return Request(f"r{i}", model, array, f"{i}-0", 1)


def _x(n: int) -> np.ndarray:
    return np.random.default_rng(7).normal(size=(n, INPUT_DIM))


class CountingModel:
    """Wraps a model, counting predict calls and their batch sizes."""

    def __init__(self, inner: Any, fail: bool = False, rows: int | None = None) -> None:
        self.inner = inner
        self.fail = fail
        self.rows = rows
        self.batches: list[int] = []

    @property
    def name(self) -> str:
        return "mlp"

    def validate(self, array: Any) -> np.ndarray:
        return np.asarray(self.inner.validate(array))

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(batch.shape[0])
        if self.fail:
            raise RuntimeError("SECRET-DETAIL in the runtime's message")
        out = np.asarray(self.inner.predict(batch))
        return out[: self.rows] if self.rows is not None else out


def test_one_model_run_per_batch_and_outputs_split_per_request(mlp: Model) -> None:
    x = _x(5)
    model = CountingModel(mlp)
    done = run_batch(model, [_request(i, x[i]) for i in range(5)])
    assert model.batches == [5]
    expected = mlp_reference(x)
    for i, (request, result) in enumerate(done):
        assert request.request_id == result.request_id == f"r{i}"
        assert result.error is None and result.array is not None
        assert result.array.shape == (OUTPUT_DIM,)
        np.testing.assert_allclose(result.array, expected[i], rtol=1e-5, atol=1e-5)
        assert result.array.base is None  # owns its memory


def test_an_invalid_request_gets_its_own_error_and_the_batch_still_runs(mlp: Model) -> None:
    x = _x(3)
    requests = [
        _request(0, x[0]),
        _request(1, np.zeros(INPUT_DIM + 1)),
        _request(2, np.array(["a"] * INPUT_DIM)),
        _request(3, x[2]),
    ]
    model = CountingModel(mlp)
    done = run_batch(model, requests)
    assert model.batches == [2]
    assert [r.request_id for _, r in done] == ["r0", "r1", "r2", "r3"]
    assert done[1][1].array is None and "must have shape" in (done[1][1].error or "")
    assert done[2][1].array is None and "numeric" in (done[2][1].error or "")
    expected = mlp_reference(x[[0, 2]])
    np.testing.assert_allclose(done[0][1].array, expected[0], rtol=1e-5, atol=1e-5)  # type: ignore[arg-type]
    np.testing.assert_allclose(done[3][1].array, expected[1], rtol=1e-5, atol=1e-5)  # type: ignore[arg-type]


def test_all_invalid_runs_no_model(mlp: Model) -> None:
    model = CountingModel(mlp)
    done = run_batch(model, [_request(0, np.zeros(3))])
    assert model.batches == []
    assert done[0][1].error is not None


def test_a_model_error_fails_only_its_batch_and_logs_no_payload(
    mlp: Model, caplog: pytest.LogCaptureFixture
) -> None:
    requests = [_request(0, _x(1)[0]), _request(1, np.zeros(2))]
    with caplog.at_level(logging.DEBUG, logger="ppml.serving.batching"):
        done = run_batch(CountingModel(mlp, fail=True), requests)
    assert done[0][1] == done[0][1].__class__("r0", None, MODEL_FAILED)
    assert "must have shape" in (done[1][1].error or "")  # the invalid one keeps its own reason
    text = caplog.text
    assert "RuntimeError" in text
    assert "SECRET-DETAIL" not in text
    # the next batch is unaffected
    assert run_batch(CountingModel(mlp), [_request(2, _x(1)[0])])[0][1].error is None


def test_a_model_returning_the_wrong_row_count_fails_the_batch(mlp: Model) -> None:
    done = run_batch(CountingModel(mlp, rows=1), [_request(i, _x(2)[i]) for i in range(2)])
    assert [r.error for _, r in done] == [MODEL_FAILED, MODEL_FAILED]


def test_requests_for_another_model_are_refused(mlp: Model) -> None:
    done = run_batch(
        mlp, [_request(0, _x(1)[0]), _request(1, _x(1)[0], model="other")], model_name="mlp"
    )
    assert done[0][1].error is None
    assert done[1][1].error == "this deployment does not serve that model"


def test_dynamic_instance_shapes_run_once_per_shape() -> None:
    # A model with a dynamic non-batch dimension: sum over the last axis.
    sig = InputSignature("seq", (None, None), np.dtype(np.float32))
    calls: list[tuple[int, ...]] = []

    def run(batch: np.ndarray) -> np.ndarray:
        calls.append(batch.shape)
        return np.asarray(batch.sum(axis=1, keepdims=True))

    model = Model("summer", "onnx", sig, ["s"], run)
    requests = [
        _request(0, [1, 2], model="summer"),
        _request(1, [1, 2, 3], model="summer"),
        _request(2, [5, 5], model="summer"),
    ]
    done = run_batch(model, requests)
    assert sorted(calls) == [(1, 3), (2, 2)]
    assert [float(r.array[0]) for _, r in done] == [3.0, 6.0, 10.0]  # type: ignore[index]
