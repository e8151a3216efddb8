"""The worker loop over an in-memory stand-in for the ServingQueue contract (this layer only;
the Redis queue itself is covered by the queue's and the integration tests)."""

from __future__ import annotations

import itertools
import logging
import os
import signal
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from tests.support import MemoryKeyProvider
from tests.support.clock import FakeMonotonicClock as FakeClock
from tests.support.serving_models import INPUT_DIM, mlp_onnx_bytes, mlp_reference, write_encrypted

from ppml.crypto.envelope import DataKeyProvider
from ppml.errors import UsageError
from ppml.serving.batching import MODEL_FAILED, BatchSettings
from ppml.serving.contract import QueueConfig, read_secret_file
from ppml.serving.model import Model, load_model_bytes
from ppml.serving.queue import Request, Result
from ppml.serving.worker import Worker, WorkerSettings, main


class FakeQueue:
    """The ServingQueue contract in memory: a waiting list, a pending list per consumer with
    delivery times and counts, results stored first-wins. `read` with nothing waiting lets
    `block_ms` pass on the clock and calls `on_idle` (tests stop the worker there)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.waiting: deque[Request] = deque()
        self.pending: dict[str, tuple[Request, str, float]] = {}  # entry -> (req, consumer, t)
        self.results: dict[str, Result] = {}
        self.calls: list[str] = []
        self.reads: list[tuple[int, int]] = []
        self.on_idle: Callable[[], None] = lambda: None
        self.on_read: Callable[[list[Request]], None] = lambda got: None
        self.fail_completes = 0
        self.fail_reads = 0
        self.lose_read_replies = 0  # reads that deliver, then fail (the reply was lost)
        self._ids = itertools.count(1)

    def submit(self, request_id: str, array: Any, model: str = "mlp") -> None:
        entry = f"{next(self._ids)}-0"
        self.waiting.append(Request(request_id, model, np.asarray(array), entry, 0))

    def deliver_to(self, consumer: str, request_id: str, array: Any, at: float) -> None:
        """A request a (now dead) consumer read at time `at` and never answered."""
        entry = f"{next(self._ids)}-0"
        self.pending[entry] = (
            Request(request_id, "mlp", np.asarray(array), entry, 1),
            consumer,
            at,
        )

    # -- the contract ------------------------------------------------------------------------

    def ensure_group(self) -> None:
        self.calls.append("ensure_group")

    def read(self, consumer: str, count: int, block_ms: int) -> list[Request]:
        self.calls.append("read")
        if self.fail_reads:
            self.fail_reads -= 1
            raise ConnectionError("redis went away")
        self.reads.append((count, block_ms))
        got: list[Request] = []
        while self.waiting and len(got) < count:
            r = self.waiting.popleft()
            delivered = Request(r.request_id, r.model, r.array, r.entry_id, 1)
            self.pending[r.entry_id] = (delivered, consumer, self.clock())
            got.append(delivered)
        if got and self.lose_read_replies:
            self.lose_read_replies -= 1
            raise ConnectionError("the reply was lost")
        if not got:
            self.clock.now += block_ms / 1000.0
            self.on_idle()
        self.on_read(got)
        return got

    def read_pending(self, consumer: str, count: int) -> list[Request]:
        self.calls.append("read_pending")
        got: list[Request] = []
        for entry, (r, owner, _at) in list(self.pending.items()):
            if len(got) >= count:
                break
            if owner == consumer:
                again = Request(r.request_id, r.model, r.array, r.entry_id, r.deliveries + 1)
                self.pending[entry] = (again, consumer, self.clock())
                got.append(again)
        return got

    def reclaim(self, consumer: str, min_idle_ms: int, count: int) -> list[Request]:
        self.calls.append("reclaim")
        got: list[Request] = []
        for entry, (r, _owner, at) in list(self.pending.items()):
            if len(got) >= count:
                break
            if (self.clock() - at) * 1000.0 >= min_idle_ms:
                again = Request(r.request_id, r.model, r.array, r.entry_id, r.deliveries + 1)
                self.pending[entry] = (again, consumer, self.clock())
                got.append(again)
        return got

    def complete(self, requests: Sequence[tuple[Request, Result]]) -> None:
        self.calls.append("complete")
        if self.fail_completes:
            self.fail_completes -= 1
            raise ConnectionError("redis went away")
        for request, result in requests:
            assert request.request_id == result.request_id
            if self.pending.pop(request.entry_id, None) is not None:
                self.results.setdefault(result.request_id, result)


@pytest.fixture(scope="module")
def mlp() -> Model:
    return load_model_bytes(mlp_onnx_bytes(), name="mlp")


def _x(n: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, INPUT_DIM))


def _worker(
    queue: FakeQueue, model: Any, clock: FakeClock, **kw: Any
) -> tuple[Worker, list[float]]:
    slept: list[float] = []
    batch = kw.pop("batch", BatchSettings(2, 5))
    settings = WorkerSettings("w1", batch=batch, block_ms=100, claim_timeout_ms=60_000, **kw)
    return Worker(queue, model, settings, clock=clock, sleep=slept.append), slept


def _check_answers(queue: FakeQueue, x: np.ndarray) -> None:
    expected = mlp_reference(x)
    for i in range(len(x)):
        result = queue.results[f"r{i}"]
        assert result.error is None and result.array is not None
        np.testing.assert_allclose(result.array, expected[i], rtol=1e-5, atol=1e-5)


def test_answers_every_request_in_batches(mlp: Model) -> None:
    clock = FakeClock()
    queue = FakeQueue(clock)
    x = _x(5)
    for i in range(5):
        queue.submit(f"r{i}", x[i])
    worker, _ = _worker(queue, mlp, clock)
    assert [worker.run_once() for _ in range(4)] == [2, 2, 1, 0]
    _check_answers(queue, x)
    assert queue.pending == {}
    assert worker.stats.batches == 3 and worker.stats.requests == 5


def test_run_stops_when_asked_and_loses_nothing(mlp: Model) -> None:
    clock = FakeClock()
    queue = FakeQueue(clock)
    x = _x(3)
    for i in range(3):
        queue.submit(f"r{i}", x[i])
    worker, _ = _worker(queue, mlp, clock, batch=BatchSettings(8, 5))
    # The stop (SIGTERM) arrives while the first batch is being read: it is still answered.
    queue.on_read = lambda got: worker.stop() if got else None
    stats = worker.run()
    assert queue.calls[0] == "ensure_group"
    assert queue.calls.count("complete") == 1
    _check_answers(queue, x)
    assert queue.pending == {} and stats.requests == 3


def test_invalid_and_valid_requests_in_one_batch(mlp: Model) -> None:
    clock = FakeClock()
    queue = FakeQueue(clock)
    x = _x(2)
    queue.submit("r0", x[0])
    queue.submit("bad", np.zeros(3))
    queue.submit("r1", x[1])
    worker, _ = _worker(queue, mlp, clock, batch=BatchSettings(4, 5))
    worker.run_once()
    _check_answers(queue, x)
    assert queue.results["bad"].array is None
    assert "must have shape" in (queue.results["bad"].error or "")
    assert worker.stats.errors == 1


def test_a_model_failure_answers_with_errors_and_the_worker_goes_on(mlp: Model) -> None:
    class Flaky:
        name = "mlp"
        failures = 1

        def validate(self, array: Any) -> np.ndarray:
            return mlp.validate(array)

        def predict(self, batch: np.ndarray) -> np.ndarray:
            if self.failures:
                self.failures -= 1
                raise RuntimeError("boom")
            return mlp.predict(batch)

    clock = FakeClock()
    queue = FakeQueue(clock)
    x = _x(4)
    for i in range(4):
        queue.submit(f"r{i}", x[i])
    worker, _ = _worker(queue, Flaky(), clock)
    worker.run_once()
    worker.run_once()
    assert [queue.results[f"r{i}"].error for i in range(4)] == [MODEL_FAILED] * 2 + [None] * 2
    assert queue.pending == {}


def test_reclaims_the_requests_of_a_dead_worker_once_idle(mlp: Model) -> None:
    clock = FakeClock()
    queue = FakeQueue(clock)
    x = _x(2)
    queue.deliver_to("dead", "r0", x[0], at=clock.now)
    queue.deliver_to("dead", "r1", x[1], at=clock.now)
    worker, _ = _worker(queue, mlp, clock, reclaim_interval_s=30.0)
    worker.run_once()  # reclaims at start: not idle long enough yet
    assert queue.results == {}
    clock.now += 30.0
    worker.run_once()  # 30 s later: reclaim again, still under the 60 s claim timeout
    assert queue.results == {}
    clock.now += 31.0
    worker.run_once()
    _check_answers(queue, x)
    assert worker.stats.reclaimed == 2 and queue.pending == {}


def test_reclaim_runs_only_every_interval_unless_a_reclaim_was_full(mlp: Model) -> None:
    clock = FakeClock()
    queue = FakeQueue(clock)
    for i in range(3):
        queue.deliver_to("dead", f"r{i}", _x(3)[i], at=clock.now - 120.0)
    worker, _ = _worker(queue, mlp, clock, reclaim_interval_s=30.0)
    worker.run_once()  # a full reclaim (2 of 3): look again at once
    worker.run_once()  # the last one
    worker.run_once()  # not due
    assert queue.calls.count("reclaim") == 2
    assert len(queue.results) == 3
    clock.now += 30.0
    worker.run_once()
    assert queue.calls.count("reclaim") == 3


def test_a_failed_complete_is_retried_without_recomputing(mlp: Model) -> None:
    clock = FakeClock()
    queue = FakeQueue(clock)
    x = _x(2)
    for i in range(2):
        queue.submit(f"r{i}", x[i])
    queue.fail_completes = 2
    predicted: list[int] = []

    class Counting:
        name = "mlp"

        def validate(self, array: Any) -> np.ndarray:
            return mlp.validate(array)

        def predict(self, batch: np.ndarray) -> np.ndarray:
            predicted.append(len(batch))
            return mlp.predict(batch)

    worker, slept = _worker(queue, Counting(), clock)
    queue.on_idle = worker.stop
    stats = worker.run()
    assert slept == [0.1, 0.2]
    assert predicted == [2]
    assert stats.queue_failures == 2 and stats.requests == 2
    _check_answers(queue, x)
    assert queue.pending == {}


def test_requests_of_a_lost_read_reply_are_taken_back_at_once(mlp: Model) -> None:
    clock = FakeClock()
    queue = FakeQueue(clock)
    x = _x(3)
    for i in range(3):
        queue.submit(f"r{i}", x[i])
    queue.lose_read_replies = 1  # delivered to w1 (pending), but w1 never saw them
    worker, slept = _worker(queue, mlp, clock, batch=BatchSettings(4, 5))
    queue.on_idle = worker.stop
    stats = worker.run()
    _check_answers(queue, x)
    assert queue.pending == {}
    assert stats.queue_failures == 1 and stats.recovered == 3 and stats.reclaimed == 0
    assert slept == [0.1]  # taken back after the backoff, not after the 60 s claim timeout
    after = queue.calls[queue.calls.index("read") :]
    assert after.index("read_pending") < after.index("complete")


def test_a_restarted_worker_takes_back_its_own_pending_requests_first(mlp: Model) -> None:
    clock = FakeClock()
    queue = FakeQueue(clock)
    x = _x(2)
    queue.deliver_to("w1", "r0", x[0], at=clock())  # a previous w1 read them and died
    queue.deliver_to("w1", "r1", x[1], at=clock())
    queue.deliver_to("w9", "other", x[0], at=clock())  # another live worker's: left alone
    worker, _ = _worker(queue, mlp, clock)
    assert worker.run_once() == 2
    assert queue.calls[:3] == ["read_pending", "complete", "read_pending"]  # full: look again
    _check_answers(queue, x)
    assert worker.stats.recovered == 2 and worker.stats.reclaimed == 0
    assert [r.request_id for r, _, _ in queue.pending.values()] == ["other"]


def test_results_unsent_at_stop_stay_pending_for_reclaim(mlp: Model) -> None:
    clock = FakeClock()
    queue = FakeQueue(clock)
    queue.submit("r0", _x(1)[0])
    queue.fail_completes = 99
    worker, _ = _worker(queue, mlp, clock)
    queue.on_read = lambda got: worker.stop()
    worker.run()
    assert queue.results == {}
    assert [r.request_id for r, _, _ in queue.pending.values()] == ["r0"]


def test_consecutive_failures_back_off_exponentially_up_to_the_cap(mlp: Model) -> None:
    clock = FakeClock()
    queue = FakeQueue(clock)
    queue.fail_reads = 7
    worker, slept = _worker(queue, mlp, clock, max_backoff_s=5.0)
    queue.on_idle = worker.stop
    worker.run()
    assert slept == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0])


def test_settings_are_checked() -> None:
    with pytest.raises(UsageError):
        WorkerSettings("")
    with pytest.raises(UsageError):
        WorkerSettings("w", block_ms=0)


# -- main ---------------------------------------------------------------------------------------


def _factory(queue: FakeQueue, seen: list[QueueConfig]) -> Any:
    def make(config: QueueConfig, provider: DataKeyProvider) -> FakeQueue:
        seen.append(config)
        return queue

    return make


def test_main_serves_an_encrypted_model_until_sigterm(
    tmp_path: Path, provider: MemoryKeyProvider
) -> None:
    model_path = write_encrypted(mlp_onnx_bytes(), tmp_path / "mlp.onnx.ppml", provider, "sales")
    clock = FakeClock()
    queue = FakeQueue(clock)
    x = _x(3)
    for i in range(3):
        queue.submit(f"r{i}", x[i])
    # The first idle read (all answered) sends SIGTERM to this process.
    queue.on_idle = lambda: os.kill(os.getpid(), signal.SIGTERM)
    seen: list[QueueConfig] = []
    before = signal.getsignal(signal.SIGTERM)
    code = main(
        [
            str(model_path),
            "--deployment",
            "demo",
            "--payload-key-file",
            str(tmp_path / "payload.key.ppml"),
            "--max-batch-size",
            "4",
            "--block-ms",
            "10",
            "--consumer",
            "w-test",
        ],
        queue_factory=_factory(queue, seen),
        provider=provider,
    )
    assert code == 0
    assert signal.getsignal(signal.SIGTERM) == before
    _check_answers(queue, x)
    assert seen[0].deployment == "demo" and seen[0].max_deliveries == 5


def test_main_refuses_a_plaintext_model_with_exit_code_2(
    tmp_path: Path, provider: MemoryKeyProvider, caplog: pytest.LogCaptureFixture
) -> None:
    plain = tmp_path / "mlp.onnx"
    plain.write_bytes(mlp_onnx_bytes())
    seen: list[QueueConfig] = []
    argv = [str(plain), "--deployment", "demo", "--payload-key-file", str(tmp_path / "k")]
    with caplog.at_level(logging.ERROR):
        code = main(argv, queue_factory=_factory(FakeQueue(FakeClock()), seen), provider=provider)
    assert code == 2
    assert "not ppml-encrypted" in caplog.text
    assert seen == []  # never got as far as the queue


def test_secret_files_encrypted_or_owner_only(tmp_path: Path, provider: MemoryKeyProvider) -> None:
    key = os.urandom(32)
    enc = write_encrypted(key, tmp_path / "payload.key.ppml", provider, "sales")
    assert read_secret_file(enc, provider) == key
    plain = tmp_path / "password"
    plain.write_bytes(b"hunter2-long-password")
    plain.chmod(0o644)
    with pytest.raises(UsageError, match="owner only"):
        read_secret_file(plain, provider)
    plain.chmod(0o600)
    assert read_secret_file(plain, provider) == b"hunter2-long-password"
