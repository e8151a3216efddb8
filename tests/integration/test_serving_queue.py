"""The serving queue against a real redis-server (TLS, password, AOF) of a test workspace."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import redis_support
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis_support import make_workspace, require_redis_server, running_redis

from ppml.data.payload import PayloadCodec
from ppml.errors import ConfigurationError, UsageError
from ppml.serving.queue import (
    GROUP,
    INTEGRITY_ERROR,
    DuplicateRequest,
    QueueFull,
    Request,
    Result,
    ServingQueue,
)
from ppml.serving.redis_server import REDIS_PASSWORD_SECRET, RedisServer, start_redis
from ppml.workspace import Workspace

# The shared fixtures (a module-scoped workspace and Redis, a fresh deployment name per test).
redis_workspace = redis_support.redis_workspace
redis_server = redis_support.redis_server
deployment = redis_support.deployment

KEY = bytes(range(32))
NO_RETRY = Retry(NoBackoff(), 0)


def make_queue(
    server: RedisServer, name: str, *, plaintext: bool = False, **options: int
) -> ServingQueue:
    codec = PayloadCodec.plaintext(name) if plaintext else PayloadCodec(KEY, name)
    queue = ServingQueue(server.client(), deployment=name, codec=codec, **options)
    queue.ensure_group()
    return queue


def answer(request: Request, factor: float = 2.0) -> tuple[Request, Result]:
    return request, Result(request.request_id, request.array * factor)


# -- the round trip ------------------------------------------------------------------------------


def test_submit_read_complete_round_trip(redis_server: RedisServer, deployment: str) -> None:
    queue = make_queue(redis_server, deployment)
    queue.ensure_group()  # idempotent
    inputs = {f"r{i}": np.arange(6, dtype=np.float32).reshape(2, 3) + i for i in range(3)}
    for request_id, array in inputs.items():
        queue.submit(request_id, "lenet", array)
    assert queue.depth() == 3
    assert queue.result("r0") is None

    requests = queue.read("w1", count=10, block_ms=100)
    assert [r.request_id for r in requests] == ["r0", "r1", "r2"]
    assert all(r.model == "lenet" and r.deliveries == 1 for r in requests)
    np.testing.assert_array_equal(requests[1].array, inputs["r1"])
    assert queue.depth() == 3  # in flight still counts
    assert queue.read("w2", count=10, block_ms=0) == []

    queue.complete([answer(requests[0]), (requests[1], Result("r1", None, "bad input shape"))])
    assert queue.depth() == 1
    stored = queue.result("r0")
    assert stored is not None and stored.error is None
    np.testing.assert_array_equal(stored.array, inputs["r0"] * 2)
    several = queue.results_of(["r2", "r0", "r1"])  # one round trip, in the order asked
    assert several[0] is None and several[1] is not None and several[1].request_id == "r0"
    np.testing.assert_array_equal(several[1].array, inputs["r0"] * 2)
    assert several[2] == Result("r1", None, "bad input shape")
    assert queue.results_of([]) == []
    assert queue.take_results(["r1", "r1", "r2"]) == [Result("r1", None, "bad input shape")]
    assert queue.result("r1") is None  # taken

    queue.complete([answer(requests[2])])
    taken = queue.take_results()
    assert sorted(r.request_id for r in taken) == ["r0", "r2"]
    assert queue.take_results() == []
    assert queue.depth() == 0


def test_read_creates_a_missing_group(redis_server: RedisServer, deployment: str) -> None:
    codec = PayloadCodec(KEY, deployment)
    queue = ServingQueue(redis_server.client(), deployment=deployment, codec=codec)
    queue.submit("early", "m", np.ones(2))  # before any group exists
    [request] = queue.read("w1", count=5, block_ms=0)
    assert request.request_id == "early"


def test_argument_checks(redis_server: RedisServer, deployment: str) -> None:
    queue = make_queue(redis_server, deployment)
    for bad in ("", "has space", "a:b", "x" * 200, "*"):
        with pytest.raises(UsageError):
            queue.submit(bad, "m", np.ones(1))
    with pytest.raises(UsageError):
        queue.submit("ok", "bad model!", np.ones(1))
    with pytest.raises(UsageError):
        queue.submit("ok", "m", np.array([object()]))
    assert queue.depth() == 0
    with pytest.raises(UsageError):
        ServingQueue(redis_server.client(), deployment=deployment, codec=PayloadCodec(KEY, "other"))
    with pytest.raises(UsageError):
        ServingQueue(
            redis_server.client(decode_responses=True),
            deployment=deployment,
            codec=PayloadCodec(KEY, deployment),
        )


# -- at-least-once -------------------------------------------------------------------------------


def test_dead_consumer_is_reclaimed_and_first_result_wins(
    redis_server: RedisServer, deployment: str
) -> None:
    queue = make_queue(redis_server, deployment)
    queue.submit("r1", "m", np.arange(3.0))
    [dead] = queue.read("w1", count=1, block_ms=0)  # w1 "dies": never acknowledges

    assert queue.read("w2", count=1, block_ms=0) == []  # not redelivered as new
    assert queue.reclaim("w2", min_idle_ms=3_600_000, count=10) == []  # not idle long enough
    [taken] = queue.reclaim("w2", min_idle_ms=0, count=10)
    assert (taken.request_id, taken.entry_id, taken.deliveries) == ("r1", dead.entry_id, 2)
    np.testing.assert_array_equal(taken.array, np.arange(3.0))

    queue.complete([answer(taken, 10.0)])
    queue.complete([answer(dead, -1.0)])  # the "dead" worker comes back late
    result = queue.result("r1")
    assert result is not None
    np.testing.assert_array_equal(result.array, np.arange(3.0) * 10)
    assert queue.depth() == 0
    assert queue.reclaim("w3", min_idle_ms=0, count=10) == []


def test_a_result_written_twice_keeps_the_first(redis_server: RedisServer, deployment: str) -> None:
    queue = make_queue(redis_server, deployment)
    queue.submit("r1", "m", np.ones(2))
    [request] = queue.read("w1", count=1, block_ms=0)
    queue.complete([answer(request, 3.0), answer(request, 4.0)])
    queue.complete([(request, Result("r1", None, "late error"))])
    [result] = queue.take_results()
    np.testing.assert_array_equal(result.array, np.full(2, 3.0))
    # A completion after the client took its result does not bring a result back.
    queue.complete([answer(request, 5.0)])
    assert queue.take_results() == []


def test_reclaim_reports_deliveries_and_skips_deleted_entries(
    redis_server: RedisServer, deployment: str
) -> None:
    queue = make_queue(redis_server, deployment)
    for i in range(3):
        queue.submit(f"r{i}", "m", np.ones(1) * i)
    _r0, r1, _r2 = queue.read("w1", count=3, block_ms=0)
    queue.reclaim("w2", min_idle_ms=0, count=1)  # r0 delivered twice now
    client = redis_server.client()
    client.xdel(queue.stream_key, r1.entry_id)  # deleted behind the queue's back
    reclaimed = {r.request_id: r.deliveries for r in queue.reclaim("w3", min_idle_ms=0, count=10)}
    assert reclaimed == {"r0": 3, "r2": 2}
    assert client.xpending(queue.stream_key, GROUP)["pending"] == 2


def test_max_deliveries_answers_a_poison_request(
    redis_server: RedisServer, deployment: str
) -> None:
    queue = make_queue(redis_server, deployment, max_deliveries=2)
    queue.submit("poison", "m", np.ones(1))
    queue.read("w1", count=1, block_ms=0)
    assert len(queue.reclaim("w2", min_idle_ms=0, count=1)) == 1  # 2nd delivery
    assert queue.reclaim("w3", min_idle_ms=0, count=1) == []  # 3rd: answered with an error
    result = queue.result("poison")
    assert result is not None and result.array is None and "failed" in (result.error or "")
    assert queue.depth() == 0


def test_tampered_entries_are_answered_with_an_error(
    redis_server: RedisServer, deployment: str
) -> None:
    queue = make_queue(redis_server, deployment)
    client = redis_server.client()
    plain = PayloadCodec.plaintext(deployment).seal("evil", "request", np.ones(2), model="m")
    client.xadd(queue.stream_key, {"id": "evil", "model": "m", "payload": plain})
    queue.submit("good", "m", np.ones(2))
    client.xadd(queue.stream_key, {"no": "fields"})
    # An honest entry moved to another request id does not open either.
    entries: Any = client.xrange(queue.stream_key)
    fields = entries[1][1]
    client.xadd(queue.stream_key, {**fields, b"id": b"moved"})

    requests = queue.read("w1", count=10, block_ms=0)
    assert [r.request_id for r in requests] == ["good"]
    assert queue.result("evil") == Result("evil", None, INTEGRITY_ERROR)
    assert queue.result("moved") == Result("moved", None, INTEGRITY_ERROR)
    assert queue.depth() == 1  # only "good" is left
    client.set(queue.result_key("forged"), b"\x01\x01" + b"\x00" * 40)
    assert queue.take_results(["forged"]) == [Result("forged", None, INTEGRITY_ERROR)]


# -- back-pressure and duplicates ----------------------------------------------------------------


def test_queue_full_at_the_bound_and_nothing_trimmed(
    redis_server: RedisServer, deployment: str
) -> None:
    queue = make_queue(redis_server, deployment, max_length=3)
    for i in range(3):
        queue.submit(f"r{i}", "m", np.ones(1) * i)
    with pytest.raises(QueueFull):
        queue.submit("r3", "m", np.ones(1))
    assert queue.depth() == 3
    requests = queue.read("w1", count=10, block_ms=0)
    assert [r.request_id for r in requests] == ["r0", "r1", "r2"]  # accepted work kept
    with pytest.raises(QueueFull):  # in-flight requests count too
        queue.submit("r3", "m", np.ones(1))
    queue.complete([answer(requests[0])])
    queue.submit("r3", "m", np.ones(1))  # room again; the refused id was never marked
    assert queue.depth() == 3


def test_concurrent_submitters_never_overshoot(redis_server: RedisServer, deployment: str) -> None:
    queue = make_queue(redis_server, deployment, max_length=10)
    accepted: list[str] = []
    refused: list[str] = []
    lock = threading.Lock()

    def submitter(t: int) -> None:
        for i in range(10):
            request_id = f"t{t}-{i}"
            try:
                queue.submit(request_id, "m", np.ones(4))
                outcome = accepted
            except QueueFull:
                outcome = refused
            with lock:
                outcome.append(request_id)

    threads = [threading.Thread(target=submitter, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(accepted) == 10 and len(refused) == 70
    assert queue.depth() == 10
    assert sorted(r.request_id for r in queue.read("w", count=100, block_ms=0)) == sorted(accepted)


def test_duplicate_request_ids_are_refused(redis_server: RedisServer, deployment: str) -> None:
    queue = make_queue(redis_server, deployment)
    queue.submit("r1", "m", np.ones(1))
    with pytest.raises(DuplicateRequest):  # pending
        queue.submit("r1", "m", np.ones(1))
    [request] = queue.read("w1", count=1, block_ms=0)
    with pytest.raises(DuplicateRequest):  # in flight
        queue.submit("r1", "other", np.zeros(1))
    queue.complete([answer(request)])
    with pytest.raises(DuplicateRequest):  # answered
        queue.submit("r1", "m", np.ones(1))
    queue.take_results(["r1"])
    with pytest.raises(DuplicateRequest):  # taken, within the result TTL
        queue.submit("r1", "m", np.ones(1))
    assert queue.depth() == 0
    client = redis_server.client()
    assert client.ttl(queue.marker_key("r1")) > queue.result_ttl_s


# -- what Redis holds ----------------------------------------------------------------------------

_INPUT = np.full(256, 31337.4242, dtype=np.float64)
_OUTPUT = np.full(256, -2718.2818, dtype=np.float64)


def _everything_in_redis(client: redis.Redis) -> bytes:
    """Every key and value Redis holds, raw (DUMP), plus stream entries and strings read."""
    parts: list[Any] = []
    for key in client.scan_iter(count=1000):
        parts.append(key)
        parts.append(client.dump(key) or b"")
        kind = client.type(key)
        if kind == b"stream":
            entries: Any = client.xrange(key)
            for entry_id, fields in entries:
                parts.append(entry_id)
                parts.extend(b for kv in fields.items() for b in kv)
        elif kind == b"string":
            parts.append(client.get(key) or b"")
    return b"\x00".join(parts)


def _files_under(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file())


@pytest.mark.slow
@pytest.mark.parametrize("plaintext", [False, True], ids=["sealed", "plaintext-control"])
def test_redis_holds_no_plaintext(tmp_path: Path, plaintext: bool) -> None:
    with running_redis(tmp_path) as (_ws, server):
        queue = make_queue(server, "secret-model", plaintext=plaintext)
        queue.submit("answered", "m", _INPUT)
        queue.submit("pending", "m", _INPUT)
        [request, _] = queue.read("w1", count=2, block_ms=0)
        queue.complete([(request, Result("answered", _OUTPUT))])
        held = _everything_in_redis(server.client())
        server.stop()  # flushes the AOF
        on_disk = _files_under(server.data_dir)
    needles = (_INPUT.tobytes()[:64], _OUTPUT.tobytes()[:64])
    for haystack in (held, on_disk):
        for needle in needles:
            # The plaintext control proves the search finds the arrays when they are there.
            assert (needle in haystack) is plaintext


# -- the server: TLS, password, files ------------------------------------------------------------


def test_plaintext_connections_and_wrong_passwords_are_refused(
    redis_server: RedisServer,
) -> None:
    assert redis_server.client().config_get("port") == {"port": "0"}  # no plaintext port
    plain = redis.Redis(
        host=redis_server.host,
        port=redis_server.port,
        password="x" * 43,
        socket_timeout=5,
        retry=NO_RETRY,
    )
    with pytest.raises(redis.ConnectionError):
        plain.ping()
    with pytest.raises(redis.AuthenticationError):
        redis_server.client(password="wrong-password", retry=NO_RETRY).ping()
    with pytest.raises(redis.AuthenticationError):
        redis_server.client(password=None, retry=NO_RETRY).ping()
    untrusting = redis.Redis(
        host=redis_server.host, port=redis_server.port, ssl=True, socket_timeout=5, retry=NO_RETRY
    )  # the system CAs, not the workspace's: the server's certificate does not verify
    with pytest.raises(redis.ConnectionError):
        untrusting.ping()


def test_password_is_a_sealed_secret_and_never_exposed(
    redis_server: RedisServer, redis_workspace: Workspace
) -> None:
    password = redis_workspace.secret(REDIS_PASSWORD_SECRET)
    assert len(password) >= 32
    assert password not in repr(redis_server)
    pid = redis_server.pid
    assert pid is not None
    assert password.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert password.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
    assert password.encode() not in redis_server.log_file.read_bytes()
    assert stat.S_IMODE(redis_server.config_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(redis_server.directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(redis_server.data_dir.stat().st_mode) == 0o700
    assert password in redis_server.config_file.read_text()


def test_missing_redis_server_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = make_workspace(tmp_path / "ws")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ConfigurationError, match="apt-get install redis-server"):
        start_redis(ws)


def test_a_readable_server_key_is_refused(tmp_path: Path) -> None:
    require_redis_server()
    ws = make_workspace(tmp_path / "ws")
    os.chmod(ws.server_key, 0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        start_redis(ws)


def test_startup_failure_is_reported_without_the_password(tmp_path: Path) -> None:
    require_redis_server()
    ws = make_workspace(tmp_path / "ws")
    # The same port twice: the second server cannot bind and exits.
    with (
        running_redis(tmp_path / "first") as (_ws, first),
        pytest.raises(ConfigurationError, match="redis-server") as info,
    ):
        start_redis(ws, port=first.port, timeout=10)
    assert ws.secret(REDIS_PASSWORD_SECRET) not in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["stop", "kill"])
def test_restart_keeps_accepted_requests_and_results(tmp_path: Path, how: str) -> None:
    """A clean stop flushes the AOF; after SIGKILL, Redis has written every acknowledged command
    to the AOF before replying (only an OS crash could lose the last second: everysec)."""
    with running_redis(tmp_path) as (_ws, server):
        queue = make_queue(server, "restart")
        for i in range(20):
            queue.submit(f"r{i}", "m", np.full(3, float(i)))
        in_flight = queue.read("w1", count=8, block_ms=0)
        queue.complete([answer(r) for r in in_flight[:4]])
        assert queue.depth() == 16

        if how == "kill":
            server.kill()
        server.restart()  # same directory, same port
        assert server.running

        queue = make_queue(server, "restart")
        assert queue.depth() == 16
        with pytest.raises(DuplicateRequest):
            queue.submit("r0", "m", np.ones(3))
        reclaimed = queue.reclaim("w2", min_idle_ms=0, count=100)
        fresh = queue.read("w2", count=100, block_ms=0)
        assert sorted(r.request_id for r in reclaimed) == [f"r{i}" for i in range(4, 8)]
        assert [r.request_id for r in fresh] == [f"r{i}" for i in range(8, 20)]
        queue.complete([answer(r) for r in reclaimed + fresh])
        results = {r.request_id: r for r in queue.take_results()}
        assert sorted(results, key=lambda s: int(s[1:])) == [f"r{i}" for i in range(20)]
        for request_id, result in results.items():
            np.testing.assert_array_equal(result.array, np.full(3, 2.0 * int(request_id[1:])))
        assert queue.depth() == 0
