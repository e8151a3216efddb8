"""Waking `/predict` calls when their results are stored, instead of polling Redis.

Workers publish the request ids of every stored batch on the deployment's ``<p>:done`` channel
(`ServingQueue.notify_channel`). A front end runs one `ResultNotifier`: a thread subscribed to
that channel which sets the asyncio event of each waiting call whose ids it sees. Pub/sub is
at-most-once (a message published while the subscriber reconnects is lost), so the waiter also
wakes on a slow fallback poll; and ids seen in the last seconds are remembered, so a result
stored between a call's last look at Redis and its registration does not wait for that poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ppml.errors import UsageError

if TYPE_CHECKING:
    import redis

__all__ = ["ResultNotifier"]

_log = logging.getLogger("ppml.serving")

_LISTEN_TIMEOUT_S = 1.0


class _Watch:
    __slots__ = ("event", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.event = asyncio.Event()


class ResultNotifier:
    """A `ResultWaiter` (see `ppml.serving.frontend`) woken by the queue's notifications.

    `fallback_initial_s` .. `fallback_max_s` (doubling) bound how long a call waits without a
    notification before it looks at Redis anyway. `recent_s` / `recent_max` bound the memory of
    ids already notified. Start it with `start()` (or use it as a context manager); `close()`
    stops the thread.
    """

    def __init__(
        self,
        client: redis.Redis,
        channel: str,
        *,
        fallback_initial_s: float = 0.02,
        fallback_max_s: float = 0.2,
        recent_s: float = 10.0,
        recent_max: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
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
        self._lock = threading.Lock()
        self._watches: dict[str, set[_Watch]] = {}
        self._recent: OrderedDict[str, float] = OrderedDict()
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._thread: threading.Thread | None = None
        self.messages = 0  # notifications received (for tests and metrics)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, ready_timeout_s: float = 10.0) -> ResultNotifier:
        """Start listening; waits until subscribed (or `ready_timeout_s`, then polls only)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="ppml-serving-notify", daemon=True
            )
            self._thread.start()
            if not self._subscribed.wait(ready_timeout_s):
                _log.warning("result notifications not subscribed yet: polling until they are")
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=_LISTEN_TIMEOUT_S * 3)
            self._thread = None

    def __enter__(self) -> ResultNotifier:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def subscribed(self) -> bool:
        return self._subscribed.is_set()

    # -- the waiter ----------------------------------------------------------------------------

    async def wait(self, request_ids: Sequence[str], attempt: int, remaining_s: float) -> None:
        """Return when one of `request_ids` is notified (or was, recently), or after the
        fallback delay for this `attempt`, never past `remaining_s`."""
        delay = min(self._initial * (2 ** min(attempt, 30)), self._max, max(remaining_s, 0.0))
        if delay <= 0:
            return
        watch = _Watch(asyncio.get_running_loop())
        with self._lock:
            now = self._clock()
            if any(self._seen(i, now) for i in request_ids):
                return
            for request_id in request_ids:
                self._watches.setdefault(request_id, set()).add(watch)
        try:
            await asyncio.wait_for(watch.event.wait(), delay)
        except TimeoutError:
            pass
        finally:
            with self._lock:
                for request_id in request_ids:
                    watches = self._watches.get(request_id)
                    if watches is not None:
                        watches.discard(watch)
                        if not watches:
                            del self._watches[request_id]

    def _seen(self, request_id: str, now: float) -> bool:
        at = self._recent.get(request_id)
        return at is not None and now - at <= self._recent_s

    # -- the listener thread -------------------------------------------------------------------

    def notify(self, request_ids: Sequence[str]) -> None:
        """Wake the calls waiting for `request_ids` (what the listener does per message)."""
        woken: list[_Watch] = []
        with self._lock:
            now = self._clock()
            for request_id in request_ids:
                self._recent[request_id] = now
                self._recent.move_to_end(request_id)
                woken.extend(self._watches.get(request_id, ()))
            cutoff = now - self._recent_s
            while self._recent and (
                len(self._recent) > self._recent_max or next(iter(self._recent.values())) < cutoff
            ):
                self._recent.popitem(last=False)
        for watch in woken:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                watch.loop.call_soon_threadsafe(watch.event.set)

    def _run(self) -> None:
        import redis as redis_lib

        backoff = 0.1
        while not self._stop.is_set():
            pubsub: Any = None
            try:
                pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
                pubsub.subscribe(self.channel)
                self._subscribed.set()
                backoff = 0.1
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=_LISTEN_TIMEOUT_S)
                    if message is None or message.get("type") != "message":
                        continue
                    data = message.get("data")
                    text = data.decode("ascii", "replace") if isinstance(data, bytes) else ""
                    self.messages += 1
                    self.notify(text.split())
            except redis_lib.RedisError as exc:
                self._subscribed.clear()
                _log.warning(
                    "result notifications interrupted (%s); polling until resubscribed",
                    type(exc).__name__,
                )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(redis_lib.RedisError):
                        pubsub.close()
