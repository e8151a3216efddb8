"""The serving queue's multi-instance submission, retry safety, own-pending recovery and result
notifications, against a real redis-server (TLS, password, AOF)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import redis.asyncio
import redis.connection
import redis_support
from redis_support import running_redis

from ppml.data.payload import PayloadCodec
from ppml.errors import UsageError
from ppml.serving.notify import ResultNotifier
from ppml.serving.queue import DuplicateRequest, QueueFull, Request, Result, ServingQueue
from ppml.serving.redis_server import RedisServer

redis_workspace = redis_support.redis_workspace
redis_server = redis_support.redis_server
deployment = redis_support.deployment

KEY = bytes(range(32))


def make_queue(server: RedisServer, name: str, **options: Any) -> ServingQueue:
    queue = ServingQueue(server.client(), deployment=name, codec=PayloadCodec(KEY, name), **options)
    queue.ensure_group()
    return queue


def answer(request: Request) -> tuple[Request, Result]:
    return request, Result(request.request_id, request.array * 2)


def markers(server: RedisServer, queue: ServingQueue) -> list[bytes]:
    return sorted(server.client().keys(queue.marker_key("*")))


# -- submit_many -------------------------------------------------------------------------------


def test_submit_many_accepts_all_in_one_call(redis_server: RedisServer, deployment: str) -> None:
    queue = make_queue(redis_server, deployment)
    queue.submit_many([(f"r{i}", "m", np.full(2, float(i))) for i in range(5)])
    assert queue.depth() == 5
    got = queue.read("w", count=10, block_ms=0)
    assert [r.request_id for r in got] == [f"r{i}" for i in range(5)]
    np.testing.assert_array_equal(got[3].array, np.full(2, 3.0))


def test_submit_many_is_all_or_nothing(redis_server: RedisServer, deployment: str) -> None:
    queue = make_queue(redis_server, deployment, max_length=5)
    queue.submit_many([("a", "m", np.ones(2)), ("b", "m", np.ones(2))])
    before = markers(redis_server, queue)

    with pytest.raises(QueueFull):  # 2 + 4 > 5: none of the 4 is accepted
        queue.submit_many([(f"c{i}", "m", np.ones(2)) for i in range(4)])
    with pytest.raises(DuplicateRequest, match="'b'"):  # "b" was accepted: "x" is not taken
        queue.submit_many([("x", "m", np.ones(2)), ("b", "m", np.ones(2))])
    with pytest.raises(UsageError, match="twice"):
        queue.submit_many([("y", "m", np.ones(2)), ("y", "m", np.ones(2))])
    with pytest.raises(UsageError):
        queue.submit_many([])
    assert queue.depth() == 2
    assert markers(redis_server, queue) == before

    queue.submit_many([(f"c{i}", "m", np.ones(2)) for i in range(3)])  # exactly fits
    assert queue.depth() == 5


@pytest.fixture
def lose_next_reply(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Armed, the next reply read from Redis is read and then dropped with a connection error,
    as when a connection breaks after Redis ran the command: the client library reconnects and
    sends the same command again (redis-py retries connection errors by itself)."""
    armed = threading.Event()
    real = redis.connection.AbstractConnection.read_response

    def read_response(self: Any, *args: Any, **kwargs: Any) -> Any:
        response = real(self, *args, **kwargs)
        if armed.is_set():
            armed.clear()
            self.disconnect()
            raise redis.ConnectionError("the reply was lost")
        return response

    monkeypatch.setattr(redis.connection.AbstractConnection, "read_response", read_response)
    yield armed


def test_a_submission_retried_after_a_lost_reply_is_accepted_once(
    redis_server: RedisServer, deployment: str, lose_next_reply: threading.Event
) -> None:
    queue = make_queue(redis_server, deployment)
    queue.submit("warm", "m", np.ones(2))  # the script is loaded: the next reply is its answer
    lose_next_reply.set()
    queue.submit_many([("r1", "m", np.ones(2)), ("r2", "m", np.ones(2))])  # no 409
    assert not lose_next_reply.is_set()  # the reply was indeed lost once
    assert queue.depth() == 3  # the retry added nothing
    got = queue.read("w", count=10, block_ms=0)
    assert [r.request_id for r in got] == ["warm", "r1", "r2"]
    with pytest.raises(DuplicateRequest):  # another call with the same id still is a duplicate
        queue.submit("r1", "m", np.ones(2))


def test_read_pending_returns_what_a_lost_read_reply_delivered(
    redis_server: RedisServer, deployment: str, lose_next_reply: threading.Event
) -> None:
    queue = make_queue(redis_server, deployment)
    queue.submit_many([(f"r{i}", "m", np.full(2, float(i))) for i in range(3)])
    queue.depth()
    # The reply of the first XREADGROUP is lost; the client library sends it again, and the
    # retry finds nothing new: the entries were delivered to "w" by the first one, unseen.
    lose_next_reply.set()
    assert queue.read("w", count=10, block_ms=0) == []
    assert not lose_next_reply.is_set()
    assert queue.depth() == 3
    own = queue.read_pending("w", count=10)
    assert [r.request_id for r in own] == ["r0", "r1", "r2"]
    assert queue.read_pending("other", count=10) == []
    queue.complete([answer(r) for r in own])
    assert queue.read_pending("w", count=10) == [] and queue.depth() == 0


def test_take_if_complete_removes_only_complete_sets(
    redis_server: RedisServer, deployment: str
) -> None:
    queue = make_queue(redis_server, deployment)
    queue.submit_many([(i, "m", np.ones(2)) for i in ("a", "b")])
    got = queue.read("w", count=10, block_ms=0)
    queue.complete([answer(got[0])])
    partial = queue.take_if_complete(["a", "b"])
    assert partial[0] is not None and partial[1] is None
    assert queue.result("a") is not None  # not removed: the set is not complete
    queue.complete([answer(got[1])])
    both = queue.take_if_complete(["a", "b"])
    assert [r.request_id for r in both if r is not None] == ["a", "b"]
    np.testing.assert_array_equal(both[1].array, np.full(2, 2.0))  # type: ignore[union-attr]
    assert queue.results_of(["a", "b"]) == [None, None]


def test_async_ops_submit_and_take_like_the_queue(
    redis_server: RedisServer, deployment: str
) -> None:
    queue = make_queue(redis_server, deployment, max_length=3)
    client = async_client(redis_server)

    async def run() -> None:
        aio = queue.asynchronous(client)
        try:
            await aio.submit_many([("a", "m", np.ones(2)), ("b", "m", np.full(2, 3.0))])
            with pytest.raises(DuplicateRequest):
                await aio.submit_many([("a", "m", np.ones(2))])
            with pytest.raises(QueueFull):
                await aio.submit_many([("c", "m", np.ones(2)), ("d", "m", np.ones(2))])
            assert await aio.take_if_complete(["a", "b"]) == [None, None]
            queue.complete([answer(r) for r in queue.read("w", 10, 0)])
            both = await aio.take_if_complete(["a", "b"])
            assert [r.request_id for r in both if r is not None] == ["a", "b"]
            np.testing.assert_array_equal(both[1].array, np.full(2, 6.0))  # type: ignore[union-attr]
            assert queue.results_of(["a", "b"]) == [None, None]  # taken
        finally:
            await aio.aclose()

    asyncio.run(run())
    assert queue.depth() == 0


# -- notifications ----------------------------------------------------------------------------


def async_client(server: RedisServer) -> redis.asyncio.Redis:
    kwargs = server.client().get_connection_kwargs()
    return redis.asyncio.Redis(
        host=server.host,
        port=server.port,
        password=kwargs["password"],
        ssl=True,
        ssl_ca_certs=str(kwargs["ssl_ca_certs"]),
        ssl_cert_reqs="required",
    )


def slow_fallback(server: RedisServer, queue: ServingQueue) -> ResultNotifier:
    """A notifier whose fallback poll (300 s) is far longer than any test waits: a wait that
    ends in time ended by a notification."""
    return ResultNotifier(
        async_client(server), queue.notify_channel, fallback_initial_s=300, fallback_max_s=300
    )


async def complete_later(queue: ServingQueue, delay_s: float) -> None:
    """A worker answering everything, `delay_s` from now, in a thread (as a worker process)."""
    await asyncio.sleep(delay_s)
    await asyncio.to_thread(lambda: queue.complete([answer(r) for r in queue.read("w", 10, 0)]))


def test_a_waiting_call_wakes_when_its_result_is_stored(
    redis_server: RedisServer, deployment: str
) -> None:
    queue = make_queue(redis_server, deployment)

    async def run() -> None:
        notifier = await slow_fallback(redis_server, queue).start()
        try:
            assert notifier.subscribed
            queue.submit("r1", "m", np.ones(2))
            worker = asyncio.create_task(complete_later(queue, 0.2))
            await asyncio.wait_for(notifier.wait(["r1"], 0, 600.0), 10.0)
            await worker
            assert notifier.messages == 1
        finally:
            await notifier.aclose()

    asyncio.run(run())
    assert queue.take_if_complete(["r1"])[0] is not None


def test_a_result_stored_before_the_wait_starts_is_not_waited_for(
    redis_server: RedisServer, deployment: str
) -> None:
    queue = make_queue(redis_server, deployment)

    async def run() -> None:
        notifier = await slow_fallback(redis_server, queue).start()
        try:
            queue.submit_many([("r1", "m", np.ones(2)), ("r2", "m", np.ones(2))])
            await complete_later(queue, 0.0)
            for _ in range(500):
                if notifier.messages:
                    break
                await asyncio.sleep(0.01)
            await asyncio.wait_for(notifier.wait(["r2"], 0, 600.0), 1.0)  # remembered
        finally:
            await notifier.aclose()

    asyncio.run(run())


def test_without_notifications_the_wait_ends_at_the_fallback(
    redis_server: RedisServer, deployment: str
) -> None:
    queue = make_queue(redis_server, deployment)
    notifier = ResultNotifier(
        async_client(redis_server),
        queue.notify_channel,
        fallback_initial_s=0.01,
        fallback_max_s=0.01,
    )

    async def run() -> None:
        try:  # nobody answers "nobody": the 10 ms fallback ends the wait, long before 5 s
            await asyncio.wait_for(notifier.wait(["nobody"], 0, 600.0), 5.0)
        finally:
            await notifier.aclose()

    asyncio.run(run())


@pytest.mark.slow
def test_notifications_resume_after_redis_restarts(tmp_path: Path) -> None:
    with running_redis(tmp_path) as (_ws, server):
        queue = make_queue(server, "restarting")

        async def run() -> None:
            notifier = await slow_fallback(server, queue).start()
            try:
                await asyncio.to_thread(server.kill)
                await asyncio.to_thread(server.restart)
                for _ in range(400):  # the listener backs off and resubscribes by itself
                    if notifier.subscribed:
                        subscribers = await asyncio.to_thread(
                            lambda: server.client().pubsub_numsub(queue.notify_channel)
                        )
                        if subscribers and int(subscribers[0][1]):
                            break
                    await asyncio.sleep(0.05)
                else:
                    pytest.fail("the notifier did not resubscribe")
                fresh = make_queue(server, "restarting")
                fresh.submit("after", "m", np.ones(2))
                worker = asyncio.create_task(complete_later(fresh, 0.1))
                await asyncio.wait_for(notifier.wait(["after"], 0, 600.0), 10.0)
                await worker
            finally:
                await notifier.aclose()

        asyncio.run(run())
