"""Encrypted sources and sinks for PyFlink jobs (this module runs in Flink's environment).

Sources:

- `read_encrypted_files`: ppml's encrypted files (the streaming format: text, CSV, JSON lines) as
  a stream of lines, bounded, or watching directories for new files (``monitor_interval``).
  Flink's file source lists the files and checkpoints which are done; a Python operator opens
  each file, authenticates and decrypts it segment by segment. Exactly once: a restored job
  reads every file that a completed checkpoint had not covered, from its start, and no other.
- `read_encrypted_parquet`: encrypted Parquet files (PME), bounded, as a stream of rows (JSON
  objects); only the keys of the footer and of the selected columns are asked for. Exactly once,
  as for the files above.
- `read_redis_stream`: a Redis stream whose entries hold payloads sealed with the serving
  queue's codec (`ppml.data.payload`) under a deployment's payload key, as a stream of text
  records. One reader polls the stream (``XREAD``), driven by a rate-limited tick source; the
  last entry id read is Flink state, so a restored job re-reads from the checkpoint's position:
  exactly once into Flink's state.

Sinks:

- `write_encrypted_files`: lines into encrypted part files (one fresh data key each) that
  appear under their final name only when the checkpoint covering them completes (Flink's file
  sink: hidden in-progress files hold ciphertext only). The lines of a part not yet written
  are Flink state, gathered in the JVM (`LineBatches`); a Python operator encrypts each part
  whole. Exactly once (with checkpointing, which ppml turns on).
- `write_redis_stream`: records sealed with the codec, appended with ``XADD``. At least once:
  after a failure the records since the last checkpoint are appended again (each carries a
  record id from the job's position, so a reader can drop repeats).

Keys: every operator gets its keys from the job's key relay (`ppml.engines.flink.relay`); the
ticket is read once, where the job is built, and travels inside the operators.
"""

from __future__ import annotations

import atexit
import io
import json
import os
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pyflink.common import Duration, Types, WatermarkStrategy
from pyflink.datastream import DataStream, DataStreamSink, StreamExecutionEnvironment
from pyflink.datastream.connectors import Sink, Source
from pyflink.datastream.connectors.file_system import BulkFormat, FileSource
from pyflink.datastream.functions import (
    FlatMapFunction,
    KeyedProcessFunction,
    MapFunction,
    RuntimeContext,
)
from pyflink.datastream.state import ValueStateDescriptor
from pyflink.java_gateway import get_gateway

from ppml.crypto.envelope import DataKeyProvider
from ppml.crypto.stream import ContentType, StreamReader, encrypt_stream, looks_encrypted
from ppml.data.files import annotate_errors
from ppml.engines.flink.config import make_scratch
from ppml.engines.flink.jobconf import RELAY_HOST_ENV, SCRATCH_ENV, TARGET_ENV
from ppml.engines.flink.records import RedisStream, open_record, seal_record
from ppml.engines.flink.relay import (
    KeyRelay,
    RelayTicket,
    check_key,
    one_line_errors,
    ticket_from_environment,
)
from ppml.errors import UsageError
from ppml.tee.runtime import AttestedKeyProvider, in_attested_run

__all__ = [
    "RedisStream",
    "job_keys",
    "read_encrypted_files",
    "read_encrypted_parquet",
    "read_redis_stream",
    "write_encrypted_files",
    "write_redis_stream",
]

_UNBOUNDED = 2**63 - 1  # ticks: Long.MAX_VALUE


_attested_relay: list[KeyRelay] = []
_relay_lock = threading.Lock()


def job_keys() -> RelayTicket:
    """The key relay's ticket of this job: under ``ppml flink run --tee``, a relay this
    (attested) process starts over its attested key provider, once; else the one `ppml flink
    run` left for the job."""
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = one_line_errors
    if not in_attested_run():
        return ticket_from_environment()
    with _relay_lock:
        if not _attested_relay:
            provider = AttestedKeyProvider.from_environment()
            relay = KeyRelay(provider, host=os.environ.get(RELAY_HOST_ENV, "127.0.0.1"))
            _attested_relay.append(relay.__enter__())
            atexit.register(relay.__exit__, None, None, None)
        return _attested_relay[0].ticket()


def _no_working_directory_on_path() -> None:
    """The interpreter PemJa embeds in a TaskManager puts its working directory ('') on
    ``sys.path``; operators import nothing from there (the cluster's processes also run in a
    private directory)."""
    sys.path[:] = [p for p in sys.path if p not in ("", ".")]


def _prepare_attested_job() -> None:
    """Under ``ppml flink run``: have PyFlink's environment built from ppml's configuration,
    on a mini-cluster or (attested) submitted to the cluster; under ``--tee``, first make
    Flink's scratch directories in the sandbox's /tmp (see `ppml.engines.flink.attested`)."""
    scratch = os.environ.get(SCRATCH_ENV)
    if scratch:
        make_scratch(Path(scratch))
        # The JVM that PyFlink starts embeds the interpreter that runs the operators. It must
        # not load the sandbox's import guard (its checks stop any process that is not the
        # measured interpreter, the JVM included): its path is Flink's `python.pythonpath`
        # alone (the measured environment's site-packages and ppml), no user site.
        os.environ.pop("PYTHONPATH", None)
        os.environ["PYTHONNOUSERSITE"] = "1"
    target = os.environ.get(TARGET_ENV)
    if target in ("local", "remote"):
        _jvm().org.ppml.flink.ConfiguredContext.install(target)


def _jvm() -> Any:
    return get_gateway().jvm


# -- encrypted files -----------------------------------------------------------------------------


def _roots(paths: tuple[str | Path, ...]) -> tuple[str, ...]:
    return tuple(str(Path(p).absolute()) for p in paths)


def _linked(path: str, roots: tuple[str, ...]) -> bool:
    """Whether `path`, listed below one of `roots`, is a link or lies below one (a link could
    lead out of the tree: such files are skipped, as ``ppml encrypt`` skips them)."""
    for root in roots:
        if path == root or path.startswith(root.rstrip("/") + "/"):
            relative = os.path.relpath(path, root)
            expected = os.path.normpath(os.path.join(os.path.realpath(root), relative))
            return os.path.realpath(path) != expected
    return True


class _DecryptLines(FlatMapFunction):
    """A file's path -> its lines, authenticated and decrypted segment by segment."""

    def __init__(self, ticket: RelayTicket, roots: tuple[str, ...]) -> None:
        self._ticket = ticket
        self._roots = roots
        self._keys: DataKeyProvider | None = None

    def open(self, runtime_context: RuntimeContext) -> None:
        self._keys = self._ticket.provider()

    def flat_map(self, value: str) -> Iterator[str]:
        path = value.removeprefix("file:")
        assert self._keys is not None
        if _linked(path, self._roots):
            return
        if not looks_encrypted(path):
            raise UsageError("not a ppml-encrypted file", path=path)
        with annotate_errors(Path(path)), open(path, "rb") as raw:
            reader = StreamReader(raw, self._keys)
            text = io.TextIOWrapper(io.BufferedReader(reader, 1 << 20), encoding="utf-8")
            for line in text:
                yield line.rstrip("\r\n")


def read_encrypted_files(
    env: StreamExecutionEnvironment,
    *paths: str | Path,
    monitor_interval: float | None = None,
    ticket: RelayTicket | None = None,
) -> DataStream:
    """The lines of the encrypted files in `paths` (files or directories, read recursively;
    hidden files, links and files below a link are skipped). With `monitor_interval`
    (seconds) the directories are watched for new files and the stream does not end."""
    if not paths:
        raise UsageError("read_encrypted_files needs at least one path")
    ticket = ticket or job_keys()
    builder = FileSource.for_bulk_file_format(
        BulkFormat(_jvm().org.ppml.flink.FilePaths()), *(str(Path(p).absolute()) for p in paths)
    )
    if monitor_interval is not None:
        builder = builder.monitor_continuously(Duration.of_millis(int(monitor_interval * 1000)))
    files = env.from_source(builder.build(), WatermarkStrategy.no_watermarks(), "encrypted files")
    return files.flat_map(_DecryptLines(ticket, _roots(paths)), output_type=Types.STRING()).name(
        "decrypt"
    )


class _ParquetRows(FlatMapFunction):
    """An encrypted Parquet file's path -> its rows as JSON objects (PME: the footer and each
    selected column authenticated and decrypted, only their keys asked for)."""

    def __init__(
        self, ticket: RelayTicket, columns: list[str] | None, roots: tuple[str, ...]
    ) -> None:
        self._ticket = ticket
        self._columns = columns
        self._roots = roots
        self._keys: DataKeyProvider | None = None

    def open(self, runtime_context: RuntimeContext) -> None:
        self._keys = self._ticket.provider()

    def flat_map(self, value: str) -> Iterator[str]:
        from ppml.data.parquet import read_parquet

        path = Path(value.removeprefix("file:"))
        assert self._keys is not None
        if _linked(str(path), self._roots):
            return
        with annotate_errors(path):
            table = read_parquet(path, self._keys, columns=self._columns)
        for batch in table.to_batches(max_chunksize=4096):
            for row in batch.to_pylist():
                yield json.dumps(row, default=str, separators=(",", ":"))


def read_encrypted_parquet(
    env: StreamExecutionEnvironment,
    *paths: str | Path,
    columns: list[str] | None = None,
    ticket: RelayTicket | None = None,
) -> DataStream:
    """The rows of the encrypted Parquet files in `paths` (files or directories; bounded) as
    JSON objects, one per record (dates, decimals and the like as text): all columns, or only
    `columns`, whose keys alone are asked for."""
    if not paths:
        raise UsageError("read_encrypted_parquet needs at least one path")
    ticket = ticket or job_keys()
    source = FileSource.for_bulk_file_format(
        BulkFormat(_jvm().org.ppml.flink.FilePaths()), *(str(Path(p).absolute()) for p in paths)
    ).build()
    files = env.from_source(source, WatermarkStrategy.no_watermarks(), "encrypted parquet")
    rows = _ParquetRows(ticket, columns, _roots(paths))
    return files.flat_map(rows, output_type=Types.STRING()).name("decrypt parquet")


class _EncryptPart(MapFunction):
    """A part's lines (the JVM's `LineBatches` gathered them) -> one whole encrypted file."""

    def __init__(self, ticket: RelayTicket, key: str, content: ContentType) -> None:
        self._ticket = ticket
        self._key = key
        self._content = content
        self._keys: DataKeyProvider | None = None

    def open(self, runtime_context: RuntimeContext) -> None:
        self._keys = self._ticket.provider()

    def map(self, value: str) -> bytes:
        assert self._keys is not None
        out = io.BytesIO()
        encrypt_stream(
            io.BytesIO(value.encode()),
            out,
            self._keys.generate_data_key(self._key),
            content_type=self._content,
        )
        return out.getvalue()


def write_encrypted_files(
    stream: DataStream,
    path: str | Path,
    *,
    key: str,
    records_per_part: int = 10_000,
    roll_interval: float = 60.0,
    content: str = "text",
    prefix: str = "part",
    suffix: str = ".enc",
    parallelism: int | None = None,
    ticket: RelayTicket | None = None,
) -> DataStreamSink:
    """Write the text records of `stream` as encrypted part files under `path` (named
    ``PREFIX-<id>-<n>SUFFIX``), each under a fresh data key of the named key `key`: a part holds
    `records_per_part` lines, or what came within `roll_interval` seconds; `content` (text, csv
    or json) is recorded in each file's header for ``ppml decrypt`` and the readers."""
    if records_per_part < 1 or roll_interval <= 0:
        raise UsageError("records_per_part and roll_interval must be positive")
    ticket = ticket or job_keys()
    check_key(ticket, key)
    batches = _jvm().org.ppml.flink.LineBatches.apply(
        stream._j_data_stream, records_per_part, int(roll_interval * 1000), "part lines"
    )
    if parallelism is not None:
        batches.setParallelism(parallelism)
    parts = DataStream(batches).map(
        _EncryptPart(ticket, key, ContentType.parse(content)),
        output_type=Types.PRIMITIVE_ARRAY(Types.BYTE()),
    )
    # Its own task (thread): an embedded interpreter opened after another Python operator and
    # a Java one in the same chain can hang in its start-up (seen with onnxruntime loaded).
    parts = parts.name("encrypt parts").start_new_chain()
    if parallelism is not None:
        parts = parts.set_parallelism(parallelism)
    sink = _jvm().org.ppml.flink.EncryptedParts.sink(str(Path(path).absolute()), prefix, suffix)
    return parts.sink_to(Sink(sink)).name("encrypted part files")


# -- Redis streams -------------------------------------------------------------------------------


class _PollRedis(KeyedProcessFunction):
    """On each tick, the entries after the last one read (a checkpointed position)."""

    def __init__(self, ticket: RelayTicket, source: RedisStream, batch: int, start: str) -> None:
        self._ticket = ticket
        self._source = source
        self._batch = batch
        self._start = start

    def open(self, runtime_context: RuntimeContext) -> None:
        self._client, self._codec = self._source.connect(self._ticket.provider())
        self._last = runtime_context.get_state(ValueStateDescriptor("ppml-last-id", Types.STRING()))

    def close(self) -> None:
        self._client.close()

    def process_element(self, value: int, ctx: KeyedProcessFunction.Context) -> Iterator[str]:
        last = self._last.value() or self._start
        read = self._client.xread({self._source.stream: last}, count=self._batch)
        for _name, entries in read or []:
            for entry_id, fields in entries:
                record_id = fields[b"id"].decode()
                yield open_record(self._codec, record_id, fields[b"payload"])
                last = entry_id.decode()
            self._last.update(last)  # once per poll that read something


def read_redis_stream(
    env: StreamExecutionEnvironment,
    source: RedisStream,
    *,
    polls_per_second: float = 20.0,
    batch: int = 1000,
    start: str = "0",
    stop_after: float | None = None,
    ticket: RelayTicket | None = None,
) -> DataStream:
    """The text records of `source`'s stream, from entry id `start` ("0": the beginning; "$":
    only new ones): unbounded, or ending after `stop_after` seconds of polling (the input then
    ends as a bounded one does: windows fire, the sinks commit). Up to `batch` entries are read
    per poll. Records that fail to open (altered, or sealed for another stream) fail the job."""
    ticket = ticket or job_keys()
    if polls_per_second <= 0 or batch < 1:
        raise UsageError("polls_per_second and batch must be positive")
    polls = _UNBOUNDED if stop_after is None else max(1, int(stop_after * polls_per_second))
    ticks = env.from_source(
        Source(_jvm().org.ppml.flink.Ticks.source(float(polls_per_second), polls)),
        WatermarkStrategy.no_watermarks(),
        "redis poll ticks",
    ).set_parallelism(1)
    return (
        ticks.key_by(lambda _t: 0, key_type=Types.INT())
        .process(_PollRedis(ticket, source, batch, start), output_type=Types.STRING())
        .set_parallelism(1)
        .name(f"redis stream {source.stream}")
    )


class _XAdd(MapFunction):
    def __init__(self, ticket: RelayTicket, sink: RedisStream, maxlen: int | None) -> None:
        self._ticket = ticket
        self._sink = sink
        self._maxlen = maxlen

    def open(self, runtime_context: RuntimeContext) -> None:
        self._client, self._codec = self._sink.connect(self._ticket.provider())

    def close(self) -> None:
        self._client.close()

    def map(self, value: str) -> int:
        record_id = uuid.uuid4().hex
        blob = seal_record(self._codec, record_id, value)
        self._client.xadd(
            self._sink.stream, {"id": record_id, "payload": blob}, maxlen=self._maxlen
        )
        return 0


def write_redis_stream(
    stream: DataStream,
    sink: RedisStream,
    *,
    maxlen: int | None = None,
    ticket: RelayTicket | None = None,
) -> DataStreamSink:
    """Append each text record of `stream` to `sink`'s stream, sealed (at least once)."""
    ticket = ticket or job_keys()
    added = stream.map(_XAdd(ticket, sink, maxlen), output_type=Types.INT()).name(
        f"redis stream {sink.stream}"
    )
    discard = _jvm().org.apache.flink.streaming.api.functions.sink.v2.DiscardingSink()
    return added.sink_to(Sink(discard)).name("appended")


_no_working_directory_on_path()
_prepare_attested_job()
