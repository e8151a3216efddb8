"""Waking `/predict` calls when their results are stored, instead of polling Redis.

Workers publish the request ids of every stored batch on the deployment's ``<p>:done`` channel
(`ServingQueue.notify_channel`). A front end runs one `ResultNotifier`: a task on its event loop,
subscribed to that channel over an asyncio Redis client, which sets the event of each waiting
call whose ids it sees. It lives on the event loop on purpose: a listener thread would need the
GIL for every message while the loop thread holds it, and under load each handover costs up to
the interpreter's switch interval (5 ms), enough to fall behind and to stretch the tail latency.

Pub/sub is at-most-once (a message published while the subscriber reconnects is lost), so a
waiting call also wakes on a slow fallback poll; and ids seen in the last seconds are
remembered, so a result stored before a call starts waiting does not wait for that poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ppml._internal.clock import MonotonicClock
from ppml.errors import UsageError

if TYPE_CHECKING:
    import redis.asyncio

__all__ = ["ResultNotifier"]

_log = logging.getLogger("ppml.serving")

_LISTEN_TIMEOUT_S = 1.0


class ResultNotifier:
    """A `ResultWaiter` (see `ppml.server.serving_frontend`) woken by the queue's notifications.

    Use it from one event loop. The subscription starts with the first `wait` (or `start()`)
    and reconnects by itself; `aclose()` ends it. `fallback_initial_s` .. `fallback_max_s`
    (doubling) bound how long a call waits without a notification before it looks at Redis
    anyway. `recent_s` / `recent_max` bound the memory of ids already notified.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        channel: str,
        *,
        fallback_initial_s: float = 0.02,
        fallback_max_s: float = 0.2,
        recent_s: float = 10.0,
        recent_max: int = 100_000,
        clock: MonotonicClock = time.monotonic,
    ) -> None:
        if not 0 < fallback_initial_s <= fallback_max_s:
            raise UsageError("fallback waits must satisfy 0 < initial <= max")
        self._client = client
        self.channel = channel
        self._initial = fallback_initial_s
        self._max = fallback_max_s
        self._recent_s = recent_s
        self._recent_max = recent_max
        self._clock = clock
        self._watches: dict[str, set[asyncio.Event]] = {}
        self._recent: OrderedDict[str, float] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self._subscribed: asyncio.Event | None = None
        self.messages = 0  # notifications received (for tests and metrics)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, ready_timeout_s: float = 10.0) -> ResultNotifier:
        """Subscribe now and wait until subscribed (at most `ready_timeout_s`: until then,
        waiting calls fall back to polling)."""
        subscribed = self._ensure_started()
        try:
            await asyncio.wait_for(subscribed.wait(), ready_timeout_s)
        except TimeoutError:
            _log.warning("result notifications not subscribed yet: polling until they are")
        return self

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def subscribed(self) -> bool:
        return self._subscribed is not None and self._subscribed.is_set()

    def _ensure_started(self) -> asyncio.Event:
        if self._subscribed is None:
            self._subscribed = asyncio.Event()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(self._subscribed), name="ppml-serving-notify"
            )
        return self._subscribed

    # -- the waiter ----------------------------------------------------------------------------

    async def wait(self, request_ids: Sequence[str], attempt: int, remaining_s: float) -> None:
        """Return when one of `request_ids` is notified (or was, recently), or after the
        fallback delay for this `attempt`, never past `remaining_s`."""
        self._ensure_started()
        delay = min(self._initial * (2 ** min(attempt, 30)), self._max, max(remaining_s, 0.0))
        if delay <= 0:
            return
        now = self._clock()
        if any(self._seen(i, now) for i in request_ids):
            return
        event = asyncio.Event()
        for request_id in request_ids:
            self._watches.setdefault(request_id, set()).add(event)
        try:
            await asyncio.wait_for(event.wait(), delay)
        except TimeoutError:
            pass
        finally:
            for request_id in request_ids:
                watches = self._watches.get(request_id)
                if watches is not None:
                    watches.discard(event)
                    if not watches:
                        del self._watches[request_id]

    def _seen(self, request_id: str, now: float) -> bool:
        at = self._recent.get(request_id)
        return at is not None and now - at <= self._recent_s

    def notify(self, request_ids: Sequence[str]) -> None:
        """Wake the calls waiting for `request_ids` (what the listener does per message)."""
        now = self._clock()
        for request_id in request_ids:
            self._recent[request_id] = now
            self._recent.move_to_end(request_id)
            for event in self._watches.get(request_id, ()):
                event.set()
        cutoff = now - self._recent_s
        while self._recent and (
            len(self._recent) > self._recent_max or next(iter(self._recent.values())) < cutoff
        ):
            self._recent.popitem(last=False)

    # -- the listener task ---------------------------------------------------------------------

    async def _run(self, subscribed: asyncio.Event) -> None:
        import redis as redis_lib

        backoff = 0.1
        while True:
            pubsub: Any = None
            try:
                pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(self.channel)
                subscribed.set()
                backoff = 0.1
                while True:
                    message = await pubsub.get_message(timeout=_LISTEN_TIMEOUT_S)
                    if message is None or message.get("type") != "message":
                        continue
                    data = message.get("data")
                    text = data.decode("ascii", "replace") if isinstance(data, bytes) else ""
                    self.messages += 1
                    self.notify(text.split())
            except (redis_lib.RedisError, OSError) as exc:
                subscribed.clear()
                _log.warning(
                    "result notifications interrupted (%s); polling until resubscribed",
                    type(exc).__name__,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(redis_lib.RedisError, OSError):
                        await pubsub.aclose()
