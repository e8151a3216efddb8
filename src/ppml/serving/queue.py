"""The serving queue on Redis Streams: the contract shared by the front end and the workers.

One stream per deployment (``ppml:serving:<deployment>:requests``) read by one consumer group
(``workers``): at-least-once delivery, each entry acknowledged (XACK) and deleted only after its
result is stored. Results are stored under ``ppml:serving:<deployment>:result:<request id>``
with SET NX (the first result wins, a redelivered request cannot overwrite it) and a TTL.
Entries of a dead worker are taken over with XAUTOCLAIM once idle for longer than the claim
timeout. The stream is bounded: `submit` refuses with `QueueFull` when the requests not yet
answered reach `max_length`, never trimming accepted work away.

Every payload (request input, result output) is sealed by a `PayloadCodec` (AES-GCM under the
deployment's key, bound to the deployment, the request id and the direction), so that Redis
holds no plaintext inputs or outputs.

The Redis layout, in full (``<p>`` is ``ppml:serving:<deployment>``):

- ``<p>:requests``: the stream; each entry has the fields ``id`` (request id), ``model`` and
  ``payload`` (the sealed input, bound to the request id and the model name too). Entries are
  deleted when answered, so its length is the number of requests accepted and not answered.
- ``<p>:accepted:<request id>``: the marker of an accepted id (value: its stream entry id, ``|``,
  the random token of the submission that added it). It has no TTL while the request is pending
  and gets ``result_ttl_s + 60`` seconds when answered (it outlives the result, so a resubmitted
  id can never be answered by a stale result); `submit` refuses an id whose marker exists with
  `DuplicateRequest`, unless the marker holds the same submission's token (the Redis client
  retried a call whose reply was lost: it was accepted, and the retry succeeds).
- ``<p>:result:<request id>``: the sealed result (an output array or an error text).
- ``<p>:done`` (a pub/sub channel): after each batch of stored results, their request ids,
  space-separated. Front ends subscribe to wake up waiting `/predict` calls; nothing depends on
  it for correctness (a lost message only delays an answer until the next poll).

Atomicity. `submit_many` is one Lua script (duplicate checks, length check, XADDs, markers):
Redis runs scripts atomically, so concurrent submitters can never overshoot `max_length`, a
multi-instance call is accepted whole or not at all, and it costs one round trip with no retry
loop (WATCH/MULTI would retry under contention). `complete` runs, per result, one script that
XACKs the entry and, only if it was still pending, stores the result with SET NX PX and starts
the marker's TTL, then XDELs the entry; the scripts of a batch go in one pipeline. A result is
therefore stored exactly when its entry stops being pending: a slow worker completing a request
that another worker already answered (after a reclaim) stores nothing, and a result the client
already took cannot reappear. `take_if_complete` reads a call's results and deletes them only
when all are there, in one script.

Entries that cannot be used (a payload that fails to open, missing fields) are never handed to a
worker: they are answered with the error result ``"integrity check failed"`` (when their request
id is usable) and acknowledged and deleted; the reason goes to the log. With `max_deliveries`
set, a reclaimed request delivered more often than that is answered with an error too (a
request that kills its workers must not circulate forever).

Redis client errors (connection lost, timeouts) propagate as ``redis.RedisError``: the caller
retries; nothing is lost, since accepted entries stay until answered. The client must be made
with ``decode_responses=False`` (payloads are binary); see `ppml.serving.redis_server`.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from ppml.data.payload import validate_deployment, validate_model, validate_request_id
from ppml.errors import IntegrityError, PPMLError, UsageError

if TYPE_CHECKING:
    import numpy as np
    import redis
    import redis.asyncio

    from ppml.data.payload import EncodedImage, PayloadCodec
    from ppml.serving.notify import ResultNotifier

    Input = np.ndarray | EncodedImage  # a request's input: an array, or an image file's bytes

__all__ = [
    "GROUP",
    "INTEGRITY_ERROR",
    "AsyncQueueOps",
    "DuplicateRequest",
    "QueueFull",
    "QueueLayout",
    "Request",
    "Result",
    "ServingQueue",
]

_log = logging.getLogger("ppml.serving")

GROUP: Final = "workers"
# The error text of a result whose request (or stored result) failed to open.
INTEGRITY_ERROR: Final = "integrity check failed"
_MARKER_MARGIN_S: Final = 60
_CLAIM_ROUNDS: Final = 16  # XAUTOCLAIM calls per reclaim (each scans up to 10 x count entries)

# KEYS: stream, then one marker per request. ARGV: max_length, submission token, then
# (request id, model, payload) per request. All or nothing: returns {0, added}, {-1, index of
# a duplicate (1-based)} or {-2, 0} (full). A marker holding this call's token is the same
# submission retried by the client library after a lost reply: accepted already, not a duplicate.
_SUBMIT_LUA: Final = """
local n = #KEYS - 1
local fresh = {}
for i = 1, n do
  local marker = redis.call('GET', KEYS[i + 1])
  if marker then
    local sep = string.find(marker, '|', 1, true)
    if not sep or string.sub(marker, sep + 1) ~= ARGV[2] then return {-1, i} end
  else
    fresh[#fresh + 1] = i
  end
end
if #fresh == 0 then return {0, 0} end
if redis.call('XLEN', KEYS[1]) + #fresh > tonumber(ARGV[1]) then return {-2, 0} end
for _, i in ipairs(fresh) do
  local a = 3 + (i - 1) * 3
  local id = redis.call('XADD', KEYS[1], '*', 'id', ARGV[a], 'model', ARGV[a + 1],
                        'payload', ARGV[a + 2])
  redis.call('SET', KEYS[i + 1], id .. '|' .. ARGV[2])
end
return {0, #fresh}
"""

# KEYS: result keys. Returns their values (MGET) and deletes them, but only when all exist.
_TAKE_IF_COMPLETE_LUA: Final = """
local values = redis.call('MGET', unpack(KEYS))
for i = 1, #KEYS do
  if not values[i] then return values end
end
redis.call('DEL', unpack(KEYS))
return values
"""

# KEYS: stream, result, marker. ARGV: group, entry id, sealed result, result TTL ms, marker TTL ms.
# Returns 1 if the result was stored, 0 if the entry was no longer pending (answered already).
_COMPLETE_LUA: Final = """
local stored = 0
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  if redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', ARGV[4]) then stored = 1 end
  redis.call('PEXPIRE', KEYS[3], ARGV[5])
end
redis.call('XDEL', KEYS[1], ARGV[2])
return stored
"""


class QueueFull(PPMLError):
    """The queue holds `max_length` unanswered requests: retry later (HTTP 503, Retry-After)."""


class DuplicateRequest(UsageError):
    """A request with this id was accepted already."""


@dataclass(frozen=True, slots=True)
class Request:
    """One request as a worker sees it: decrypted, with its stream entry for acknowledgement.
    `array` is the input: an array, or an `EncodedImage` that the worker decodes."""

    request_id: str
    model: str
    array: Input
    entry_id: str  # the stream entry id (for XACK / XDEL)
    deliveries: int  # 1 on first delivery, more after a reclaim


@dataclass(frozen=True, slots=True)
class Result:
    """A finished request: an output array, or an error message for the client (400-type)."""

    request_id: str
    array: np.ndarray | None
    error: str | None = None


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _require_binary(client: Any) -> None:
    kwargs: dict[str, Any] = getattr(client, "get_connection_kwargs", dict)()
    if kwargs.get("decode_responses"):
        raise UsageError("the Redis client must be made with decode_responses=False")


class QueueLayout:
    """What the blocking `ServingQueue` and the asyncio `AsyncQueueOps` share, with no I/O: the
    key names, the sealed arguments of a submission, the reading of the scripts' answers, the
    opening of stored results."""

    def __init__(self, deployment: str, codec: PayloadCodec, max_length: int) -> None:
        validate_deployment(deployment)
        if codec.deployment != deployment:
            raise UsageError(
                f"the codec is for deployment {codec.deployment!r}, not {deployment!r}"
            )
        if max_length < 1:
            raise UsageError("max_length must be at least 1")
        self.deployment = deployment
        self.codec = codec
        self.max_length = max_length
        self.prefix = f"ppml:serving:{deployment}"
        self.stream_key = f"{self.prefix}:requests"
        self.notify_channel = f"{self.prefix}:done"

    def result_key(self, request_id: str) -> str:
        return f"{self.prefix}:result:{request_id}"

    def marker_key(self, request_id: str) -> str:
        return f"{self.prefix}:accepted:{request_id}"

    def submission(
        self, requests: Sequence[tuple[str, str, Input]]
    ) -> tuple[list[str], list[str], list[Any]]:
        """(ids, KEYS, ARGV) of the submit script for `requests`, each payload sealed."""
        if not requests:
            raise UsageError("nothing to submit")
        ids = [validate_request_id(request_id) for request_id, _m, _a in requests]
        if len(set(ids)) != len(ids):
            raise UsageError("a request id appears twice in one submission")
        args: list[Any] = [self.max_length, secrets.token_hex(16)]
        for request_id, model, array in requests:
            validate_model(model)
            payload = self.codec.seal_input(request_id, array, model=model)
            args += [request_id, model, payload]
        return ids, [self.stream_key, *(self.marker_key(i) for i in ids)], args

    @staticmethod
    def submit_failed(exc: Exception) -> None:
        """Raise `QueueFull` for a script error that means back-pressure."""
        if str(exc).startswith("OOM"):  # maxmemory reached (noeviction): back-pressure
            raise QueueFull("the serving queue is out of memory; retry later") from None

    def submit_outcome(self, ids: Sequence[str], status: Any, index: Any) -> None:
        """Raise what the submit script's answer means (nothing when accepted)."""
        if status == -1:
            raise DuplicateRequest(
                f"a request with id {ids[int(index) - 1]!r} was accepted already"
            )
        if status == -2:
            raise QueueFull(
                f"the serving queue cannot take {len(ids)} more request(s): it holds up to "
                f"{self.max_length} unanswered requests; retry later"
            )

    def open_result(self, request_id: str, blob: Any) -> Result:
        """A stored result; one that fails to open is the error `INTEGRITY_ERROR`."""
        try:
            array, error = self.codec.open_result(request_id, blob)
        except IntegrityError:
            _log.warning(
                "serving %s: the stored result of %s failed to open", self.deployment, request_id
            )
            return Result(request_id, None, INTEGRITY_ERROR)
        return Result(request_id, array, error)

    def taken(self, ids: Sequence[str], blobs: Sequence[Any]) -> list[Result]:
        """The results of `ids` whose blob was there (`blobs` in the order of `ids`), opened."""
        return [
            self.open_result(request_id, blob)
            for request_id, blob in zip(ids, blobs, strict=True)
            if blob is not None
        ]

    def opened(self, ids: Sequence[str], blobs: Sequence[Any]) -> list[Result | None]:
        return [
            None if blob is None else self.open_result(i, blob)
            for i, blob in zip(ids, blobs, strict=True)
        ]


class ServingQueue:
    """The queue of one deployment. Thread-safe as far as the Redis client is.

    `max_deliveries` (default: no limit) answers a reclaimed request with an error once it has
    been delivered more than that many times.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        deployment: str,
        codec: PayloadCodec,
        max_length: int = 10_000,
        result_ttl_s: int = 3600,
        max_deliveries: int | None = None,
    ) -> None:
        layout = QueueLayout(deployment, codec, max_length)
        if result_ttl_s < 1:
            raise UsageError("result_ttl_s must be at least 1")
        if max_deliveries is not None and max_deliveries < 1:
            raise UsageError("max_deliveries must be at least 1 (or None for no limit)")
        _require_binary(client)
        self._client = client
        self.layout = layout
        self.deployment = deployment
        self.codec = codec
        self.max_length = max_length
        self.result_ttl_s = result_ttl_s
        self.max_deliveries = max_deliveries
        self.stream_key = layout.stream_key
        self.notify_channel = layout.notify_channel
        self._submit = client.register_script(_SUBMIT_LUA)
        self._complete = client.register_script(_COMPLETE_LUA)
        self._take_if_complete = client.register_script(_TAKE_IF_COMPLETE_LUA)

    def __repr__(self) -> str:
        return f"ServingQueue(deployment={self.deployment!r}, max_length={self.max_length})"

    def result_key(self, request_id: str) -> str:
        return self.layout.result_key(request_id)

    def marker_key(self, request_id: str) -> str:
        return self.layout.marker_key(request_id)

    # -- front end -----------------------------------------------------------------------------

    def ensure_group(self) -> None:
        """Create the stream and the consumer group if missing (idempotent)."""
        import redis

        try:
            # From id 0: requests submitted before the group existed are delivered too.
            self._client.xgroup_create(self.stream_key, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise

    def submit(self, request_id: str, model: str, array: Input) -> None:
        """Accept a request or raise `QueueFull` / `DuplicateRequest`; never drops silently."""
        self.submit_many([(request_id, model, array)])

    def submit_many(self, requests: Sequence[tuple[str, str, Input]]) -> None:
        """Accept all of `requests` ((request id, model, array) each) in one round trip, or
        none: `QueueFull` when they do not all fit, `DuplicateRequest` when one id was accepted
        before. Safe to retry after a lost reply (Redis clients retry by themselves): the
        submission's random token is stored with each marker, so the same call arriving twice
        is accepted once and answers success both times."""
        import redis

        ids, keys, args = self.layout.submission(requests)
        try:
            status, index = self._submit(keys=keys, args=args)
        except redis.ResponseError as exc:
            self.layout.submit_failed(exc)
            raise
        self.layout.submit_outcome(ids, status, index)

    def depth(self) -> int:
        """Requests accepted and not yet answered (waiting plus in flight)."""
        return int(self._client.xlen(self.stream_key))

    # -- workers -------------------------------------------------------------------------------

    def read(self, consumer: str, count: int, block_ms: int) -> list[Request]:
        """Up to `count` new requests for `consumer`, waiting at most `block_ms` for the first.

        `block_ms=0` does not wait (unlike Redis's BLOCK 0, which waits forever).
        """
        import redis

        self._check_consumer(consumer, count)
        if block_ms < 0:
            raise UsageError("block_ms must not be negative")
        block = block_ms if block_ms > 0 else None

        def xread() -> Any:
            return self._client.xreadgroup(
                GROUP, consumer, {self.stream_key: ">"}, count=count, block=block
            )

        try:
            response = xread()
        except redis.ResponseError as exc:
            if not str(exc).startswith("NOGROUP"):
                raise
            self.ensure_group()
            response = xread()
        entries: list[tuple[Any, Any]] = []
        for _stream, stream_entries in response or []:
            entries.extend(stream_entries)
        return self._accept(entries, {})

    def read_pending(self, consumer: str, count: int) -> list[Request]:
        """Up to `count` requests delivered to `consumer` earlier and not yet answered (its own
        pending list): what a worker lost when a read's reply was lost (the client library
        retried, or the connection broke) or when a previous process of the same name died."""
        self._check_consumer(consumer, count)
        response: Any = self._client.xreadgroup(
            GROUP, consumer, {self.stream_key: "0"}, count=count
        )
        entries: list[tuple[Any, Any]] = []
        for _stream, stream_entries in response or []:
            # An entry deleted while pending comes back with no fields: nothing to answer.
            entries.extend(e for e in stream_entries if e[1])
        return self._accept(entries, {})

    def reclaim(self, consumer: str, min_idle_ms: int, count: int) -> list[Request]:
        """Take over up to `count` requests delivered to others and idle for `min_idle_ms`."""
        self._check_consumer(consumer, count)
        if min_idle_ms < 0:
            raise UsageError("min_idle_ms must not be negative")
        claimed: list[tuple[Any, Any]] = []
        cursor: Any = "0-0"
        for _ in range(_CLAIM_ROUNDS):
            response = self._client.xautoclaim(
                self.stream_key,
                GROUP,
                consumer,
                min_idle_ms,
                start_id=cursor,
                count=count - len(claimed),
            )
            cursor = response[0]
            claimed.extend(e for e in response[1] if e[0] is not None and e[1] is not None)
            deleted = response[2] if len(response) > 2 else []
            for entry_id in deleted:
                # Deleted while pending (not by `complete`, which acknowledges first): the
                # request is gone; XAUTOCLAIM has removed it from the pending list.
                _log.warning(
                    "serving %s: pending entry %s was deleted; its request is lost",
                    self.deployment,
                    _text(entry_id),
                )
            if len(claimed) >= count or _text(cursor) == "0-0":
                break
        if not claimed:
            return []
        # XAUTOCLAIM does not report delivery counts: one pipelined XPENDING per entry does.
        pipe = self._client.pipeline(transaction=False)
        for entry_id, _fields in claimed:
            pipe.xpending_range(self.stream_key, GROUP, min=entry_id, max=entry_id, count=1)
        deliveries: dict[str, int] = {}
        for info in pipe.execute():
            for item in info:
                deliveries[_text(item["message_id"])] = int(item["times_delivered"])
        return self._accept(claimed, deliveries)

    def complete(self, requests: Sequence[tuple[Request, Result]]) -> None:
        """Store each result (SET NX with TTL), then XACK and XDEL its entry, in one pipeline.

        Each result goes through one atomic script (see the module docstring): a result whose
        entry is no longer pending (answered by another worker already) is not stored.
        """
        items: list[tuple[str, str, bytes]] = []
        for request, result in requests:
            if result.request_id != request.request_id:
                raise UsageError(
                    f"result for {result.request_id!r} given for request {request.request_id!r}"
                )
            blob = self.codec.seal_result(request.request_id, result.array, result.error)
            items.append((request.request_id, request.entry_id, blob))
        self._store(items)

    def _store(self, items: Sequence[tuple[str, str, bytes]]) -> None:
        if not items:
            return
        ttl_ms = self.result_ttl_s * 1000
        marker_ms = (self.result_ttl_s + _MARKER_MARGIN_S) * 1000
        pipe = self._client.pipeline(transaction=False)
        for request_id, entry_id, blob in items:
            self._complete(
                keys=[self.stream_key, self.result_key(request_id), self.marker_key(request_id)],
                args=[GROUP, entry_id, blob, ttl_ms, marker_ms],
                client=pipe,
            )
        # Front ends waiting for these results wake up on this message (and poll slowly as a
        # fallback: a message published while a subscriber reconnects is lost).
        pipe.publish(self.notify_channel, " ".join(request_id for request_id, _e, _b in items))
        for (request_id, _entry, _blob), stored in zip(items, pipe.execute()[:-1], strict=True):
            if not stored:
                _log.info(
                    "serving %s: request %s was answered already; this result is dropped",
                    self.deployment,
                    request_id,
                )

    # -- results -------------------------------------------------------------------------------

    def result(self, request_id: str) -> Result | None:
        """The stored result, or None while pending (or unknown, or expired)."""
        validate_request_id(request_id)
        blob = self._client.get(self.result_key(request_id))
        return None if blob is None else self.layout.open_result(request_id, blob)

    def results_of(self, request_ids: Sequence[str]) -> list[Result | None]:
        """`result` for each of `request_ids`, in order, in one round trip (MGET)."""
        ids = [validate_request_id(i) for i in request_ids]
        if not ids:
            return []
        return self.layout.opened(ids, self._client.mget([self.result_key(i) for i in ids]))

    def take_if_complete(self, request_ids: Sequence[str]) -> list[Result | None]:
        """`results_of(request_ids)`, in one round trip, and when every one of them is there
        they are also removed from Redis (atomically); while some are missing none is."""
        ids = [validate_request_id(i) for i in request_ids]
        if not ids:
            return []
        return self.layout.opened(
            ids, self._take_if_complete(keys=[self.result_key(i) for i in ids])
        )

    def asynchronous(self, client: redis.asyncio.Redis) -> AsyncQueueOps:
        """The front end's hot path (`submit_many`, `take_if_complete`) as coroutines over an
        asyncio Redis client connected like this queue's: no thread hop per call."""
        return AsyncQueueOps(self, client)

    def take_results(self, request_ids: Iterable[str] | None = None) -> list[Result]:
        """Finished results, removed from Redis as they are returned (all when ids is None).

        A stored result that fails to open is returned as an error `INTEGRITY_ERROR`.
        """
        if request_ids is None:
            prefix = self.result_key("")
            ids = []
            for key in self._client.scan_iter(match=prefix + "*", count=1000):
                request_id = _text(key)[len(prefix) :]
                try:
                    ids.append(validate_request_id(request_id))
                except UsageError:
                    _log.warning("serving %s: ignoring a malformed result key", self.deployment)
        else:
            ids = [validate_request_id(i) for i in dict.fromkeys(request_ids)]
        if not ids:
            return []
        pipe = self._client.pipeline(transaction=False)
        for request_id in ids:
            pipe.getdel(self.result_key(request_id))
        return self.layout.taken(ids, pipe.execute())

    # -- internals -----------------------------------------------------------------------------

    @staticmethod
    def _check_consumer(consumer: str, count: int) -> None:
        if not isinstance(consumer, str) or not consumer or len(consumer) > 128:
            raise UsageError("a consumer name must be 1-128 characters")
        if count < 1:
            raise UsageError("count must be at least 1")

    def _accept(
        self, entries: Sequence[tuple[Any, Any]], deliveries: dict[str, int]
    ) -> list[Request]:
        """Open the entries; answer the unusable ones with an error and drop them."""
        good: list[Request] = []
        rejected: list[tuple[str, str, bytes]] = []
        dropped: list[str] = []
        for raw_id, fields in entries:
            entry_id = _text(raw_id)
            request_id, model, payload = (
                fields.get(b"id"),
                fields.get(b"model"),
                fields.get(b"payload"),
            )
            try:
                if request_id is None or model is None or payload is None:
                    raise IntegrityError()
                request_id = validate_request_id(_text(request_id))
            except (IntegrityError, UsageError, UnicodeDecodeError):
                _log.warning("serving %s: entry %s is malformed", self.deployment, entry_id)
                dropped.append(entry_id)
                continue
            try:
                model = validate_model(_text(model))
                array = self.codec.open_input(request_id, payload, model=model)
            except (IntegrityError, UsageError, UnicodeDecodeError):
                _log.warning(
                    "serving %s: request %s (entry %s) failed its integrity check",
                    self.deployment,
                    request_id,
                    entry_id,
                )
                rejected.append(
                    (request_id, entry_id, self.codec.seal_error(request_id, INTEGRITY_ERROR))
                )
                continue
            count = deliveries.get(entry_id, 1)
            if self.max_deliveries is not None and count > self.max_deliveries:
                _log.warning(
                    "serving %s: request %s was delivered %d times; answering with an error",
                    self.deployment,
                    request_id,
                    count,
                )
                message = f"the request failed {count - 1} times in the workers; not retried"
                rejected.append((request_id, entry_id, self.codec.seal_error(request_id, message)))
                continue
            good.append(Request(request_id, model, array, entry_id, count))
        self._store(rejected)
        if dropped:
            pipe = self._client.pipeline(transaction=True)
            pipe.xack(self.stream_key, GROUP, *dropped)
            pipe.xdel(self.stream_key, *dropped)
            pipe.execute()
        return good


class AsyncQueueOps:
    """What the front end does with a `ServingQueue` (`submit_many`, `take_if_complete`,
    `result`, `take_results` of given ids, `depth`) as coroutines: the same scripts, keys,
    codec and errors, over a `redis.asyncio.Redis` client."""

    def __init__(self, queue: ServingQueue, client: redis.asyncio.Redis) -> None:
        _require_binary(client)
        self.queue = queue
        self.layout = queue.layout
        self._client = client
        self._submit = client.register_script(_SUBMIT_LUA)
        self._take_if_complete = client.register_script(_TAKE_IF_COMPLETE_LUA)

    async def submit_many(self, requests: Sequence[tuple[str, str, Input]]) -> None:
        import redis

        ids, keys, args = self.layout.submission(requests)
        try:
            status, index = await self._submit(keys=keys, args=args)
        except redis.ResponseError as exc:
            self.layout.submit_failed(exc)
            raise
        self.layout.submit_outcome(ids, status, index)

    async def take_if_complete(self, request_ids: Sequence[str]) -> list[Result | None]:
        ids = [validate_request_id(i) for i in request_ids]
        if not ids:
            return []
        keys = [self.layout.result_key(i) for i in ids]
        return self.layout.opened(ids, await self._take_if_complete(keys=keys))

    async def result(self, request_id: str) -> Result | None:
        validate_request_id(request_id)
        blob = await self._client.get(self.layout.result_key(request_id))
        return None if blob is None else self.layout.open_result(request_id, blob)

    async def take_results(self, request_ids: Sequence[str]) -> list[Result]:
        ids = [validate_request_id(i) for i in dict.fromkeys(request_ids)]
        if not ids:
            return []
        pipe = self._client.pipeline(transaction=False)
        for request_id in ids:
            pipe.getdel(self.layout.result_key(request_id))
        return self.layout.taken(ids, await pipe.execute())

    async def depth(self) -> int:
        return int(await self._client.xlen(self.layout.stream_key))

    def result_notifier(self, **options: Any) -> ResultNotifier:
        """A `ResultNotifier` on the queue's notification channel over this client (it starts
        with its first wait); the options go to its constructor."""
        from ppml.serving.notify import ResultNotifier

        return ResultNotifier(self._client, self.layout.notify_channel, **options)

    async def aclose(self) -> None:
        await self._client.aclose()
