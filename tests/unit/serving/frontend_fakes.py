"""In-memory stand-ins for the front end's unit tests: a queue keeping the `ServingQueue`
contract (submit_many, depth, result, take_if_complete, take_results, `QueueFull`,
`DuplicateRequest`), a worker thread answering it, and a clock that tests move by hand. The
real queue is tested against Redis."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from tests.support.clock import FakeMonotonicClock as FakeClock

from ppml.server.boundary import Principal
from ppml.server.serving_frontend import ClientTag
from ppml.serving.contract import ModelInfo
from ppml.serving.queue import DuplicateRequest, QueueFull, Result

MODELS = {
    "double": ModelInfo("double", (3,), "float32", ("y",)),
    "count": ModelInfo("count", (2, None), "int8", ("n",)),
}


def answer(model: str, array: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """The fake model: doubles its input; a negative sum is an error (a 400-type result)."""
    if float(array.sum()) < 0:
        return None, "negative input"
    return array * 2, None


class FakeQueue:
    """Thread-safe, in memory; results stay until taken (no TTL)."""

    def __init__(self, max_length: int = 1000) -> None:
        self.max_length = max_length
        self.accepted: set[str] = set()
        self.pending: dict[str, tuple[str, np.ndarray]] = {}
        self.results: dict[str, Result] = {}
        self.submitted: list[tuple[str, str, np.ndarray]] = []
        self.fail: type[Exception] | None = None  # raised by every call when set
        self._cond = threading.Condition()

    def _check(self) -> None:
        if self.fail is not None:
            raise self.fail("the backend is down")

    def submit_many(self, requests: Sequence[tuple[str, str, np.ndarray]]) -> None:
        """All or none, as the real queue."""
        self._check()
        with self._cond:
            if any(request_id in self.accepted for request_id, _m, _a in requests):
                raise DuplicateRequest("duplicate")
            if len(self.pending) + len(requests) > self.max_length:
                raise QueueFull("full")
            for request_id, model, array in requests:
                self.accepted.add(request_id)
                self.pending[request_id] = (model, array)
                self.submitted.append((request_id, model, array))
            self._cond.notify_all()

    def depth(self) -> int:
        self._check()
        with self._cond:
            return len(self.pending)

    def result(self, request_id: str) -> Result | None:
        self._check()
        with self._cond:
            return self.results.get(request_id)

    def take_if_complete(self, request_ids: Sequence[str]) -> list[Result | None]:
        self._check()
        with self._cond:
            found = [self.results.get(i) for i in request_ids]
            if all(r is not None for r in found):
                for i in request_ids:
                    self.results.pop(i, None)
            return found

    def take_results(self, request_ids: Iterable[str] | None = None) -> list[Result]:
        self._check()
        with self._cond:
            ids = list(self.results) if request_ids is None else list(dict.fromkeys(request_ids))
            return [self.results.pop(i) for i in ids if i in self.results]

    # -- the worker side -------------------------------------------------------------------

    def process(self, ids: Sequence[str] | None = None) -> int:
        """Answer the pending requests (those of `ids`, or all) now; returns how many."""
        with self._cond:
            todo = [i for i in self.pending if ids is None or i in ids]
            for request_id in todo:
                model, array = self.pending.pop(request_id)
                out, error = answer(model, array)
                self.results[request_id] = Result(request_id, out, error)
            return len(todo)

    def wait_for_pending(self, stop: threading.Event) -> None:
        with self._cond:
            self._cond.wait_for(lambda: bool(self.pending) or stop.is_set())

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


class FakeWorker:
    """A thread answering every request as soon as it is submitted."""

    def __init__(self, queue: FakeQueue) -> None:
        self.queue = queue
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fake-worker", daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.queue.wait_for_pending(self.stop)
            self.queue.process()

    def __enter__(self) -> FakeWorker:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.queue.wake()
        self.thread.join(timeout=10)


class JumpingWaiter:
    """A `ResultWaiter` that, instead of sleeping, moves the clock to the deadline (so a
    timeout happens at once) after running `between` (e.g. to answer some requests)."""

    def __init__(self, clock: FakeClock, between: Callable[[], object] | None = None) -> None:
        self.clock = clock
        self.between = between
        self.calls: list[tuple[list[str], int]] = []

    async def wait(self, request_ids: Sequence[str], attempt: int, remaining_s: float) -> None:
        self.calls.append((list(request_ids), attempt))
        if self.between is not None:
            self.between()
        else:
            self.clock.advance(remaining_s)


class FakeAsyncOps:
    """`AsyncQueueLike` over a `FakeQueue` (what `ServingQueue.asynchronous` is to the real
    queue), counting its calls."""

    def __init__(self, queue: FakeQueue) -> None:
        self.queue = queue
        self.calls: list[str] = []

    async def submit_many(self, requests: Sequence[tuple[str, str, np.ndarray]]) -> None:
        self.calls.append("submit_many")
        self.queue.submit_many(requests)

    async def take_if_complete(self, request_ids: Sequence[str]) -> list[Result | None]:
        self.calls.append("take_if_complete")
        return self.queue.take_if_complete(request_ids)

    async def result(self, request_id: str) -> Result | None:
        self.calls.append("result")
        return self.queue.result(request_id)

    async def take_results(self, request_ids: Sequence[str]) -> list[Result]:
        self.calls.append("take_results")
        return self.queue.take_results(request_ids)

    async def depth(self) -> int:
        self.calls.append("depth")
        return self.queue.depth()


async def as_client(scope: Any) -> Principal:
    """The in-process tests' authenticator (no TLS here): the client named by the x-test-client
    header, else "alice". The certificate check itself is tested over real TLS."""
    for name, value in scope.get("headers", []):
        if name == b"x-test-client":
            return Principal("certificate", value.decode())
    return Principal("certificate", "alice")


def queued(request_id: str, client: str = "alice") -> str:
    """How the queue holds `client`'s `request_id`."""
    return ClientTag(client).queued(request_id)
