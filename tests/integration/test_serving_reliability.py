"""Reliability of Trusted Cluster Serving with real parts: a real TLS redis-server with AOF,
real worker processes (``python -m ppml.serving.worker``, model and payload key encrypted under
a workspace key, keys from the workspace's KMS through PPML_HOME / PPML_PASSPHRASE), and the
real front end served over HTTPS by uvicorn where HTTP matters.

- a worker SIGKILLed with 10,000 requests in flight (submitted with `ServingQueue.submit`, at
  the queue level): every accepted request gets exactly one result, equal to the reference;
- a worker stalled past the claim timeout and then resumed: its late results never reach the
  client a second time;
- Redis restarted (clean stop, and SIGKILL) under load: no accepted request is lost, workers
  recover with their backoff;
- malformed input through the HTTPS front end: 400/413 with a reason, the worker keeps going;
- SIGTERM: a worker stops after its current batch, exit 0, and nothing it read is lost.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from redis_support import require_redis_server
from tests.support.serving_models import INPUT_DIM, mlp_onnx_bytes, mlp_reference, write_encrypted

from ppml._internal.fs import write_private
from ppml.crypto.passphrase import KdfParams
from ppml.data.payload import KEY_BYTES, PayloadCodec
from ppml.server.embedded import tls_files_for
from ppml.server.serving_frontend import FrontendSettings, create_app
from ppml.server.tls import serving
from ppml.serving.contract import ModelInfo
from ppml.serving.model import load_model
from ppml.serving.queue import GROUP, INTEGRITY_ERROR, DuplicateRequest, Result, ServingQueue
from ppml.serving.redis_server import RedisServer, redis_password, start_redis
from ppml.workspace import Workspace

pytestmark = pytest.mark.slow

PASSPHRASE = "serving reliability passphrase"
KEY_NAME = "models"
MODEL = "mlp"
DEADLINE_S = 60.0


def _poll(condition: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    """Wait for `condition` (looked at every 20 ms) or fail naming `what`."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        tick.wait(0.02)


@dataclass
class Serving:
    """A workspace, its Redis, the encrypted model and payload key, and the workers started."""

    root: Path
    ws: Workspace
    server: RedisServer
    model_file: Path
    payload_key_file: Path
    password_file: Path
    payload_key: bytes
    workers: list[tuple[subprocess.Popen[bytes], Path]] = field(default_factory=list)

    def queue(self, deployment: str, **options: Any) -> ServingQueue:
        codec = PayloadCodec(self.payload_key, deployment)
        queue = ServingQueue(self.server.client(), deployment=deployment, codec=codec, **options)
        queue.ensure_group()
        return queue

    def start_worker(self, deployment: str, consumer: str, *extra: str) -> subprocess.Popen[bytes]:
        log = self.root / f"{deployment}-{consumer}.log"
        argv = [
            sys.executable,
            "-m",
            "ppml.serving.worker",
            str(self.model_file),
            "--deployment",
            deployment,
            "--model-name",
            MODEL,
            "--redis-port",
            str(self.server.port),
            "--redis-ca",
            str(self.ws.ca_cert),
            "--redis-password-file",
            str(self.password_file),
            "--payload-key-file",
            str(self.payload_key_file),
            "--consumer",
            consumer,
            "--block-ms",
            "100",
            "--max-batch-size",
            "32",
            "--max-wait-ms",
            "2",
            *extra,
        ]
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("PPML_")},
            "PPML_HOME": str(self.ws.path),
            "PPML_PASSPHRASE": PASSPHRASE,
        }
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        self.workers.append((proc, log))
        return proc

    def wait_ready(self, *procs: subprocess.Popen[bytes]) -> None:
        """Until every worker logged that it serves (its queue group exists then). Redis 7.0
        lists a consumer only once it was given an entry, so the group cannot tell."""

        def ready() -> bool:
            self.check_alive()
            return all(" serving model " in self.log_of(p) for p in procs)

        _poll(ready, "the workers to start")

    def check_alive(self) -> None:
        for proc, log in self.workers:
            code = proc.poll()
            if code is not None and code not in (0, -signal.SIGKILL):
                raise AssertionError(f"a worker exited with {code}:\n{log.read_text()[-3000:]}")

    def log_of(self, proc: subprocess.Popen[bytes]) -> str:
        return next(log.read_text() for p, log in self.workers if p is proc)

    def stop_workers(self) -> None:
        for proc, _log in self.workers:
            if proc.poll() is None:
                proc.terminate()
        for proc, _log in self.workers:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.workers.clear()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serving]:
    require_redis_server()
    root = tmp_path_factory.mktemp("reliability")
    ws = Workspace.create(root / "ws", PASSPHRASE.encode(), dev=True, kdf=KdfParams.for_testing())
    payload_key = os.urandom(KEY_BYTES)
    with ws.key_service() as keys:
        keys.create_key(KEY_NAME)
        model_file = write_encrypted(mlp_onnx_bytes(), root / "mlp.onnx.ppml", keys, KEY_NAME)
        key_file = write_encrypted(payload_key, root / "payload.key.ppml", keys, KEY_NAME)
    server = start_redis(ws)
    password_file = root / "redis.password"
    write_private(password_file, redis_password(ws, create=False).encode())
    serving_setup = Serving(root, ws, server, model_file, key_file, password_file, payload_key)
    try:
        yield serving_setup
    finally:
        serving_setup.stop_workers()
        server.stop()


@pytest.fixture
def env(setup: Serving) -> Iterator[Serving]:
    """The module's setup; the workers a test started are stopped at its end."""
    try:
        yield setup
    finally:
        setup.stop_workers()


_deployments = iter(range(1_000_000))


@pytest.fixture
def deployment() -> str:
    return f"rel-{next(_deployments)}"


def _inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 1.0, (n, INPUT_DIM)).astype(np.float32)


class Submitter(threading.Thread):
    """Submits ``r0 .. r{n-1}`` through `ServingQueue.submit`, riding out Redis outages: a
    submit that failed on the connection is retried with the same id, and `DuplicateRequest`
    then means that an earlier attempt was accepted (ids are unique in these tests)."""

    def __init__(self, queue: ServingQueue, x: np.ndarray) -> None:
        super().__init__(daemon=True)
        self.queue = queue
        self.x = x
        self.accepted = 0
        self.connection_errors = 0
        self.duplicates = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            tick = threading.Event()
            for i in range(len(self.x)):
                while True:
                    try:
                        self.queue.submit(f"r{i}", MODEL, self.x[i])
                    except DuplicateRequest:
                        self.duplicates += 1  # accepted by an attempt whose answer was lost
                    except redis.RedisError:
                        self.connection_errors += 1
                        tick.wait(0.05)
                        continue
                    break
                self.accepted = i + 1
        except BaseException as exc:  # reported by the test
            self.error = exc


def _answered(queue: ServingQueue, submitter: Submitter) -> int:
    return submitter.accepted - queue.depth()


def collect(
    queue: ServingQueue, n: int, env: Serving, timeout: float = DEADLINE_S
) -> dict[str, Result]:
    """Take the results of ``r0 .. r{n-1}`` as a client would, each at most once (a second
    delivery of an id fails the test); tolerates Redis outages."""
    results: dict[str, Result] = {}
    remaining = [f"r{i}" for i in range(n)]

    def more() -> bool:
        nonlocal remaining
        env.check_alive()
        for start in range(0, len(remaining), 2000):
            try:
                taken = queue.take_results(remaining[start : start + 2000])
            except redis.RedisError:
                return False
            for result in taken:
                assert result.request_id not in results, f"{result.request_id} delivered twice"
                results[result.request_id] = result
        remaining = [i for i in remaining if i not in results]
        return not remaining

    _poll(more, f"{n} results ({n - len(results)} missing)", timeout)
    return results


def check_exactly_once(queue: ServingQueue, x: np.ndarray, results: dict[str, Result]) -> None:
    """One result per id, each equal to the reference; nothing left in the queue or Redis."""
    n = len(x)
    assert sorted(results) == sorted(f"r{i}" for i in range(n))
    outputs = np.stack([results[f"r{i}"].array for i in range(n)])  # type: ignore[misc]
    assert all(results[f"r{i}"].error is None for i in range(n))
    np.testing.assert_allclose(outputs, mlp_reference(x), rtol=1e-5, atol=1e-5)
    assert queue.depth() == 0
    client = queue._client
    assert client.xpending(queue.stream_key, GROUP)["pending"] == 0
    assert queue.take_results([f"r{i}" for i in range(n)]) == []  # nothing delivered twice
    assert list(client.scan_iter(match=queue.result_key("*"))) == []


def _pending_of(queue: ServingQueue, consumer: str) -> int:
    client = queue._client
    return len(
        client.xpending_range(queue.stream_key, GROUP, "-", "+", 10_000, consumername=consumer)
    )


def _freeze_with_work(proc: subprocess.Popen[bytes], queue: ServingQueue, consumer: str) -> int:
    """SIGSTOP the worker at a moment when it holds read, unanswered requests; their count."""
    tick = threading.Event()
    deadline = time.monotonic() + DEADLINE_S
    while True:
        os.kill(proc.pid, signal.SIGSTOP)
        held = _pending_of(queue, consumer)
        if held:
            return held
        os.kill(proc.pid, signal.SIGCONT)
        assert time.monotonic() < deadline, f"{consumer} never held a request"
        tick.wait(0.005)


# -- a worker dies ---------------------------------------------------------------------------------


def test_sigkill_with_10000_in_flight_every_request_answered_exactly_once(
    env: Serving, deployment: str
) -> None:
    n = 10_000
    queue = env.queue(deployment, max_length=n)
    fast_reclaim = ("--claim-timeout-ms", "500", "--reclaim-interval-s", "0.2")
    victim = env.start_worker(deployment, "w1", *fast_reclaim)
    survivor = env.start_worker(deployment, "w2", *fast_reclaim)
    env.wait_ready(victim, survivor)
    x = _inputs(n, seed=1)
    submitter = Submitter(queue, x)
    submitter.start()
    _poll(lambda: _answered(queue, submitter) >= 2000, "2000 answers before the kill")
    held = _freeze_with_work(victim, queue, "w1")
    victim.kill()  # SIGKILL while stopped: it never answers what it held
    assert victim.wait(10) == -signal.SIGKILL
    submitter.join(DEADLINE_S)
    assert submitter.error is None and submitter.accepted == n

    results = collect(queue, n, env)
    check_exactly_once(queue, x, results)
    assert held > 0 and _pending_of(queue, "w1") == 0
    assert "took over" in env.log_of(survivor)
    assert survivor.poll() is None


def test_a_stalled_worker_resuming_late_never_shows_a_second_result(
    env: Serving, deployment: str
) -> None:
    n = 2000
    queue = env.queue(deployment)
    fast_reclaim = ("--claim-timeout-ms", "300", "--reclaim-interval-s", "0.1")
    slow = env.start_worker(deployment, "w1", *fast_reclaim)
    other = env.start_worker(deployment, "w2", *fast_reclaim)
    env.wait_ready(slow, other)
    x = _inputs(n, seed=2)
    submitter = Submitter(queue, x)
    submitter.start()
    _poll(lambda: _answered(queue, submitter) >= 300, "300 answers before the stall")
    held = _freeze_with_work(slow, queue, "w1")
    submitter.join(DEADLINE_S)
    assert submitter.error is None
    results = collect(queue, n, env)  # the held requests too: w2 took them over
    assert _pending_of(queue, "w1") == 0  # taken over from the frozen worker
    os.kill(slow.pid, signal.SIGCONT)  # it completes its stale batch now: nothing is stored
    _poll(lambda: "answered already" in env.log_of(slow) or slow.poll() is not None, "w1")
    check_exactly_once(queue, x, results)
    assert held > 0 and slow.poll() is None and other.poll() is None


# -- Redis restarts --------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["restart", "kill"])
def test_redis_restart_under_load_loses_no_accepted_request(
    env: Serving, deployment: str, how: str
) -> None:
    """`restart`: SIGTERM (Redis flushes its AOF) and start on the same directory and port;
    `kill`: SIGKILL and start. After SIGKILL, appendfsync everysec promises durability only up
    to the last second against a machine crash; a process crash loses nothing written to the
    AOF file, which Redis does before it answers (unless an fsync stalls for over 2 s)."""
    n = 4000
    queue = env.queue(deployment)
    # A read whose reply the restart swallowed (redis-py retries XREADGROUP by itself) leaves
    # entries pending in the group until reclaimed: claim timeout + reclaim interval, which
    # default to 60 s + 30 s; short here.
    recover = ("--claim-timeout-ms", "1000", "--reclaim-interval-s", "0.5")
    workers = [env.start_worker(deployment, f"w{i}", *recover) for i in (1, 2)]
    env.wait_ready(*workers)
    x = _inputs(n, seed=3)
    submitter = Submitter(queue, x)
    submitter.start()
    _poll(lambda: _answered(queue, submitter) >= 1000, "1000 answers before the restart")
    accepted_before = submitter.accepted
    if how == "restart":
        env.server.restart()
    else:
        env.server.kill()
        env.server.start()
    submitter.join(DEADLINE_S)
    assert submitter.error is None and submitter.accepted == n
    assert accepted_before < n, "the restart came after all submissions"

    results = collect(queue, n, env)
    check_exactly_once(queue, x, results)
    assert all(proc.poll() is None for proc in workers)
    logs = "".join(env.log_of(proc) for proc in workers)
    print(
        f"redis {how}: submitter connection errors {submitter.connection_errors}, "
        f"duplicate answers to retried submits {submitter.duplicates}; "
        f"worker backoffs {logs.count('queue operation failed')}, "
        f"take-overs {logs.count('took over')}"
    )


# -- SIGTERM ---------------------------------------------------------------------------------------


def test_sigterm_stops_after_the_batch_exit_0_nothing_read_is_lost(
    env: Serving, deployment: str
) -> None:
    n = 3000
    queue = env.queue(deployment)
    x = _inputs(n, seed=4)
    for i in range(n):  # a backlog: the worker is busy when the signal comes
        queue.submit(f"r{i}", MODEL, x[i])
    worker = env.start_worker(deployment, "w1", "--max-batch-size", "8")
    _poll(lambda: queue.depth() <= n - 300, "300 answers before SIGTERM")
    worker.terminate()
    assert worker.wait(15) == 0
    answered = n - queue.depth()
    assert answered < n, "the worker finished the backlog before SIGTERM"
    assert _pending_of(queue, "w1") == 0  # it answered everything it had read
    log = env.log_of(worker)
    assert "SIGTERM, finishing the current batch" in log and "stopped:" in log

    env.start_worker(deployment, "w2")  # the rest, for a complete count
    results = collect(queue, n, env)
    check_exactly_once(queue, x, results)


# -- malformed input through the HTTPS front end ---------------------------------------------------


@contextlib.contextmanager
def https_front_end(env: Serving, queue: ServingQueue, **settings: Any) -> Iterator[httpx.Client]:
    with env.ws.key_service() as keys:
        info = ModelInfo.from_model(load_model(env.model_file, keys, name=MODEL))
    app = create_app(queue, models={MODEL: info}, settings=FrontendSettings(**settings))
    tls = tls_files_for(env.ws)
    verify = env.ws.client_ssl_context()  # the front end authenticates its clients
    with (
        serving(app, tls) as handle,
        httpx.Client(base_url=handle.url, verify=verify, timeout=20.0) as client,
    ):
        yield client


def _refused(response: httpx.Response, status: int, reason: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert reason in body["reason"], body


def test_malformed_input_over_https_is_refused_and_the_worker_keeps_serving(
    env: Serving, deployment: str
) -> None:
    queue = env.queue(deployment)
    worker = env.start_worker(deployment, "w1")
    env.wait_ready(worker)
    x = _inputs(3, seed=5)
    good = x[0].tolist()
    limit = 64 * 1024
    with https_front_end(env, queue, max_body_bytes=limit, sync_timeout_s=20.0) as http:
        # shape, dtype, JSON, size, model: each a 400/413 with its reason, nothing queued
        _refused(http.post("/predict", json={"instances": [good[:3]]}), 400, "expected shape (16)")
        _refused(http.post("/predict", json={"instances": [[good, good]]}), 400, "expected shape")
        _refused(
            http.post("/predict", json={"instances": [["a"] * INPUT_DIM]}), 400, "not an array"
        )
        _refused(http.post("/predict", json={"instances": [[True] * INPUT_DIM]}), 400, "booleans")
        _refused(http.post("/predict", json={"instances": [[1e300] * INPUT_DIM]}), 400, "range")
        _refused(http.post("/predict", json={"instances": [[*good[:8], good[8:]]]}), 400, "ragged")
        headers = {"content-type": "application/json"}
        _refused(http.post("/predict", content=b'{"instances": [[1,', headers=headers), 400, "JSON")
        nan = b'{"instances": [[NaN' + b", 0" * (INPUT_DIM - 1) + b"]]}"
        _refused(http.post("/predict", content=nan, headers=headers), 400, "NaN")
        big = {"instances": [good] * 2000}
        _refused(http.post("/predict", json=big), 413, f"over {limit} bytes")
        chunked = iter([b'{"instances": [' + b"[0.5]," * 20_000, b"[0]]}"])
        _refused(http.post("/predict", content=chunked, headers=headers), 413, "over")
        _refused(
            http.post("/predict", json={"model": "other", "instances": [good]}), 400, "unknown"
        )
        _refused(
            http.post("/v1/requests", json={"model": "../x", "inputs": good}), 400, "unknown model"
        )
        assert queue.depth() == 0  # none of them reached the queue

        # Malformed work that does reach the worker (bypassing the front end's checks).
        queue.submit("bad-shape", MODEL, np.zeros(3, dtype=np.float32))
        queue.submit("bad-model", "other-model", x[1])
        client = queue._client
        client.xadd(queue.stream_key, {"id": "garbage", "model": MODEL, "payload": b"\x01\x01xx"})

        # The worker is alive and answers valid requests, over HTTPS and by id.
        answer = http.post("/predict", json={"instances": [good, x[2].tolist()]})
        assert answer.status_code == 200, answer.text
        np.testing.assert_allclose(
            answer.json()["predictions"], mlp_reference(x[[0, 2]]), rtol=1e-5, atol=1e-5
        )
        _poll(lambda: queue.depth() == 0, "the malformed entries to be answered")
        errors = {r.request_id: r.error for r in queue.take_results(["bad-shape", "bad-model"])}
        assert errors["bad-shape"] is not None and "shape" in errors["bad-shape"]
        assert errors == {**errors, "bad-model": "this deployment does not serve that model"}
        assert queue.take_results(["garbage"]) == [Result("garbage", None, INTEGRITY_ERROR)]
        accepted = http.post("/v1/requests", json={"id": "after", "inputs": good})
        assert accepted.status_code == 202, accepted.text

        def done() -> bool:
            return http.get("/v1/requests/after").status_code == 200

        _poll(done, "the request after the malformed ones")
        np.testing.assert_allclose(
            http.get("/v1/requests/after").json()["prediction"],
            mlp_reference(x[:1])[0],
            rtol=1e-5,
            atol=1e-5,
        )
    assert worker.poll() is None
