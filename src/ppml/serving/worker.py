"""The serving worker: read requests from the deployment's queue, batch them, predict, answer.

One loop per process: every `reclaim_interval_s` take over requests idle for longer than the
claim timeout (their worker died), then gather a batch of new requests (blocking `block_ms` for
the first), run the model and `complete` the batch. SIGTERM (or `Worker.stop`) ends the loop
after the current batch is answered; a request read but not answered stays pending in the
consumer group and is reclaimed, so stopping never loses one. Queue errors (Redis restarting)
are logged and retried with a capped backoff; on start and after each queue error the worker
first takes back its own pending requests (a read whose reply was lost, or a previous process of
the same consumer name that died), without waiting for the claim timeout.

`main(argv)` is the process entry (`python -m ppml.serving.worker MODEL --deployment NAME ...`),
started by `ppml serving up`, typically under `ppml run --tee sim`: keys (for the model, the
payload key and the Redis password files) come from `ppml.api.key_provider()`, so from the key
broker after attestation.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Protocol

from ppml._internal.clock import MonotonicClock
from ppml.crypto.envelope import DataKeyProvider
from ppml.errors import PPMLError, UsageError
from ppml.serving.batching import BatchSettings, Predictor, Preprocess, gather, run_batch
from ppml.serving.contract import (
    QueueConfig,
    add_queue_arguments,
    child_key_provider,
    open_async_client,
    open_queue,
    parse_shape,
    queue_config,
    read_secret_file,
    redis_options,
    signal_ready,
)
from ppml.serving.image import ImageSpec
from ppml.serving.queue import Request, Result

__all__ = [
    "QueueConfig",
    "QueueFactory",
    "Worker",
    "WorkerQueue",
    "WorkerSettings",
    "WorkerStats",
    "main",
    "open_async_client",
    "open_queue",
    "read_secret_file",
    "redis_options",
]

_log = logging.getLogger(__name__)


class WorkerQueue(Protocol):
    """The part of `ServingQueue` a worker uses."""

    def ensure_group(self) -> None: ...

    def read(self, consumer: str, count: int, block_ms: int) -> list[Request]: ...

    def read_pending(self, consumer: str, count: int) -> list[Request]: ...
    def reclaim(self, consumer: str, min_idle_ms: int, count: int) -> list[Request]: ...

    def complete(self, requests: Sequence[tuple[Request, Result]]) -> None: ...


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """`block_ms`: how long a read waits for a first request (also the longest a stop waits).
    `claim_timeout_ms`: a request idle that long in another consumer is taken over.
    `reclaim_interval_s`: how often to look for such requests. `max_backoff_s`: the longest
    pause after a queue error."""

    consumer: str
    batch: BatchSettings = field(default_factory=BatchSettings)
    block_ms: int = 1000
    claim_timeout_ms: int = 60_000
    reclaim_interval_s: float = 30.0
    max_backoff_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.consumer or len(self.consumer) > 128:
            raise UsageError("a consumer name must be 1-128 characters")
        if not 1 <= self.block_ms <= 60_000:
            raise UsageError("the read block must be between 1 and 60000 ms")
        if self.claim_timeout_ms < 1:
            raise UsageError("the claim timeout must be at least 1 ms")
        if self.reclaim_interval_s < 0 or self.max_backoff_s < 0:
            raise UsageError("intervals must not be negative")


@dataclass(slots=True)
class WorkerStats:
    """Counters since the worker started."""

    batches: int = 0
    requests: int = 0
    errors: int = 0  # requests answered with an error
    reclaimed: int = 0
    recovered: int = 0  # its own pending requests taken back after a failure or on start
    queue_failures: int = 0


class Worker:
    """The loop of one worker over one queue and one model (see the module docstring)."""

    def __init__(
        self,
        queue: WorkerQueue,
        model: Predictor,
        settings: WorkerSettings,
        *,
        model_name: str | None = None,
        preprocess: Preprocess | None = None,
        clock: MonotonicClock = time.monotonic,
        sleep: Callable[[float], object] | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self._queue = queue
        self._preprocess = preprocess
        self._on_ready = on_ready
        self._model = model
        self._settings = settings
        self._model_name = model_name
        self._clock = clock
        self._stop = threading.Event()
        self._sleep = sleep if sleep is not None else self._stop.wait
        self._next_reclaim: float | None = None  # None: reclaim on the first iteration
        # Take back our own pending requests first: on start (a previous process of this name
        # died) and after a queue failure (a read whose reply was lost delivered requests).
        self._recover = True
        self._unsent: list[tuple[Request, Result]] = []
        self.stats = WorkerStats()

    @property
    def settings(self) -> WorkerSettings:
        return self._settings

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        """Ask the loop to end after the current batch (safe from a signal handler)."""
        self._stop.set()

    def run(self) -> WorkerStats:
        """Serve until `stop()`; returns the counters."""
        self._queue.ensure_group()
        _log.info(
            "worker %s serving model %s (batches of up to %d, %d ms wait)",
            self._settings.consumer,
            self._model.name,
            self._settings.batch.max_batch_size,
            self._settings.batch.max_wait_ms,
        )
        if self._on_ready is not None:
            self._on_ready()
        failures = 0
        while not self._stop.is_set():
            try:
                self.run_once()
                failures = 0
            except Exception as exc:  # the queue (Redis) failed: retry, never lose requests
                failures += 1
                self.stats.queue_failures += 1
                self._recover = True
                delay = min(self._settings.max_backoff_s, 0.1 * 2 ** min(failures - 1, 16))
                _log.warning(
                    "worker %s: queue operation failed (%s); retrying in %.1f s",
                    self._settings.consumer,
                    type(exc).__name__,
                    delay,
                )
                self._sleep(delay)
        if self._unsent:
            try:
                self._flush()
            except Exception as exc:
                # Still pending in the consumer group: another worker reclaims them.
                _log.warning(
                    "worker %s: %d answered requests could not be stored (%s); they stay "
                    "pending for another worker",
                    self._settings.consumer,
                    len(self._unsent),
                    type(exc).__name__,
                )
        _log.info(
            "worker %s stopped: %d requests in %d batches (%d errors)",
            self._settings.consumer,
            self.stats.requests,
            self.stats.batches,
            self.stats.errors,
        )
        return self.stats

    def run_once(self) -> int:
        """One iteration: reclaim when due, then one gathered batch. Returns requests answered."""
        # Results computed before a queue failure go first (no recomputation, no reclaim wait).
        answered = self._flush()
        if self._recover:
            answered += self._recover_own()
        if self._reclaim_due():
            answered += self._reclaim()
        if self._stop.is_set():
            return answered
        s = self._settings
        consumer = s.consumer
        batch = gather(
            lambda count, block_ms: self._queue.read(consumer, count, block_ms),
            s.batch,
            first_wait_ms=s.block_ms,
            clock=self._clock,
            stop=self._stop.is_set,
        )
        return answered + self._process(batch)

    def _recover_own(self) -> int:
        s = self._settings
        answered = 0
        while not self._stop.is_set():
            requests = self._queue.read_pending(s.consumer, s.batch.max_batch_size)
            if requests:
                _log.info("worker %s took back %d of its own requests", s.consumer, len(requests))
                self.stats.recovered += len(requests)
            answered += self._process(requests)
            if len(requests) < s.batch.max_batch_size:
                break
        self._recover = False
        return answered

    def _reclaim_due(self) -> bool:
        return self._next_reclaim is None or self._clock() >= self._next_reclaim

    def _reclaim(self) -> int:
        s = self._settings
        count = s.batch.max_batch_size
        requests = self._queue.reclaim(s.consumer, s.claim_timeout_ms, count)
        if len(requests) < count:
            # All taken: look again after the interval. A full batch means there may be more:
            # look again on the next iteration.
            self._next_reclaim = self._clock() + s.reclaim_interval_s
        if requests:
            _log.info("worker %s took over %d idle requests", s.consumer, len(requests))
            self.stats.reclaimed += len(requests)
        return self._process(requests)

    def _process(self, requests: Sequence[Request]) -> int:
        if not requests:
            return 0
        self._unsent = run_batch(
            self._model, requests, model_name=self._model_name, preprocess=self._preprocess
        )
        return self._flush()

    def _flush(self) -> int:
        """Store the computed results; kept for the next try when the queue fails."""
        done = self._unsent
        if not done:
            return 0
        self._queue.complete(done)
        self._unsent = []
        self.stats.batches += 1
        self.stats.requests += len(done)
        self.stats.errors += sum(1 for _, result in done if result.error is not None)
        return len(done)


# -- the process entry --------------------------------------------------------------------------


QueueFactory = Callable[[QueueConfig, DataKeyProvider], WorkerQueue]


def _shape(text: str) -> tuple[int | None, ...]:
    try:
        return parse_shape(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _image_spec(text: str) -> ImageSpec:
    try:
        return ImageSpec.from_json(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ppml.serving.worker",
        description="Serve an encrypted model from a ppml serving queue (Redis streams).",
    )
    p.add_argument("model", type=Path, help="the ppml-encrypted model file")
    add_queue_arguments(p)
    p.add_argument("--runtime", choices=("onnx", "torchscript"), default="onnx")
    p.add_argument("--model-name", help="the name requests use (default: from the file name)")
    p.add_argument("--input-shape", type=_shape, help="TorchScript: one instance's shape")
    p.add_argument("--input-dtype", default="float32", help="TorchScript: the input dtype")
    p.add_argument(
        "--image-spec",
        type=_image_spec,
        help="take image inputs, preprocessed so (ppml.serving.image.ImageSpec as JSON)",
    )
    p.add_argument("--intra-op-threads", type=int, default=1)
    p.add_argument("--redis-ca", type=Path, help="CA certificate: connect with TLS")
    p.add_argument("--consumer", default=f"{socket.gethostname()}-{os.getpid()}")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-wait-ms", type=int, default=5)
    p.add_argument("--block-ms", type=int, default=1000)
    p.add_argument("--claim-timeout-ms", type=int, default=60_000)
    p.add_argument("--reclaim-interval-s", type=float, default=30.0)
    p.add_argument("--max-deliveries", type=int, default=5)
    p.add_argument(
        "--insecure-allow-plaintext-model",
        action="store_true",
        help="development only: accept a model file that is not encrypted",
    )
    p.add_argument(
        "--keys-from-stdin",
        action="store_true",
        help="development, no TEE: read the data keys that `ppml serving up` unwrapped for this "
        "worker from stdin (a JSON bundle on a pipe) instead of asking a KMS",
    )
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def main(
    argv: Sequence[str] | None = None,
    *,
    queue_factory: QueueFactory | None = None,
    provider: DataKeyProvider | None = None,
) -> int:
    """Run a worker until SIGTERM/SIGINT; returns the process exit code (a `PPMLError`'s
    family code, 0 after a clean stop)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if provider is None:
            provider = child_key_provider(args.keys_from_stdin)
        return _serve(args, provider, queue_factory or open_queue)
    except PPMLError as exc:
        _log.error("%s", exc.diagnostics())
        return exc.exit_code


def _serve(args: argparse.Namespace, provider: DataKeyProvider, factory: QueueFactory) -> int:
    from ppml.serving.model import load_model

    settings = WorkerSettings(
        consumer=args.consumer,
        batch=BatchSettings(args.max_batch_size, args.max_wait_ms),
        block_ms=args.block_ms,
        claim_timeout_ms=args.claim_timeout_ms,
        reclaim_interval_s=args.reclaim_interval_s,
    )
    model = load_model(
        args.model,
        provider,
        runtime=args.runtime,
        name=args.model_name,
        intra_op_threads=args.intra_op_threads,
        input_shape=args.input_shape,
        input_dtype=args.input_dtype,
        insecure_allow_plaintext=args.insecure_allow_plaintext_model,
    )
    spec: ImageSpec | None = args.image_spec
    if spec is not None:  # the settings must fit the model the worker loaded
        spec.check_model(model.input_shape[1:], model.input_dtype.name)
    config = queue_config(
        args, max_deliveries=args.max_deliveries if args.max_deliveries > 0 else None
    )
    queue = factory(config, provider)
    # Only an explicit --model-name makes requests naming another model fail.
    worker = Worker(
        queue,
        model,
        settings,
        model_name=args.model_name,
        preprocess=spec.preprocess if spec is not None else None,
        on_ready=signal_ready,
    )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        _log.info(
            "worker %s: %s, finishing the current batch",
            settings.consumer,
            signal.Signals(signum).name,
        )
        worker.stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        worker.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
