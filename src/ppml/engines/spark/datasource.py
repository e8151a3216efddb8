"""Spark Python Data Sources over encrypted files: the executor side of `PPMLContext`.

The driver plans every read and write (`ppml.engines.spark.context`): it lists the files, reads
their headers, gets their data keys from the key provider and cuts the files into partitions.
Each plan is attached to a data source class made for that one read or write and registered
under a unique name; Spark pickles the class and its partitions and ships them to the Python
workers over its own channels. A partition carries only the data keys of its own file (a
write task only the fresh keys of its own part file), never the provider itself; its `repr`
shows no key, and no key goes into an option, the Spark conf or a log.

Splitting (CSV, JSON lines, text). A partition is a byte range ``[start, end)`` of a file's
plaintext; for an encrypted file both ends are segment boundaries, so a task decrypts only the
segments it reads (plus the one before `start`). A line belongs to the partition holding its
first byte: a partition that does not begin the file skips everything up to and including the
first line break at or after ``start - 1``, and reads on past ``end`` to the end of the line that
holds byte ``end - 1``. With ``multiLine`` CSV a record may span line breaks, so such files are
not split: one partition per file.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, Literal

import pyarrow as pa
from pyspark.sql.datasource import (
    DataSource,
    DataSourceArrowWriter,
    DataSourceReader,
    InputPartition,
    WriterCommitMessage,
)
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.types import StructType

from ppml.crypto.envelope import DataKey, WrappedKey
from ppml.crypto.stream import StreamReader
from ppml.errors import IntegrityError, KeyAccessError, PPMLError, UsageError

__all__ = [
    "CsvOptions",
    "ParquetPartition",
    "ReadSpec",
    "ReleasedKey",
    "ReleasedKeys",
    "StreamPartition",
    "WriteSpec",
    "register_read",
    "register_write",
    "write_part",
]

_BLOCK_BYTES = 4 << 20
"""Whole lines are parsed in blocks of about this size (a partition is streamed, not loaded)."""


@dataclass(frozen=True, slots=True)
class ReleasedKey:
    """A data key the driver unwrapped for one file; the plaintext never shows in a repr."""

    wrapped: WrappedKey
    plaintext: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class CsvOptions:
    """How CSV is parsed: Spark's reader options that apply (``escape`` unset: RFC 4180, a
    quote inside a quoted value doubled, as ppml's writer and every other ppml reader have it;
    a quote inside a value preceded by ``escape`` is read too)."""

    header: bool = False
    sep: str = ","
    quote: str = '"'
    multi_line: bool = False
    escape: str | None = None
    null_value: str | None = None

    def parse_options(self) -> Any:
        import pyarrow.csv as pacsv

        escape: str | Literal[False] = False
        if self.escape and self.escape != self.quote:
            escape = self.escape
        return pacsv.ParseOptions(
            delimiter=self.sep,
            quote_char=self.quote,
            escape_char=escape,
            double_quote=True,
            newlines_in_values=self.multi_line,
        )

    def null_values(self) -> list[str]:
        return [""] if self.null_value is None else ["", self.null_value]


class StreamPartition(InputPartition):
    """Bytes ``[start, end)`` of one file's plaintext (ppml stream format or plain)."""

    def __init__(
        self,
        path: str,
        start: int,
        end: int,
        key: ReleasedKey | None,
        values: tuple[Any, ...] = (),
    ) -> None:
        super().__init__(None)
        self.path = path
        self.start = start
        self.end = end
        self.key = key
        self.values = values  # the file's partition values (`ReadSpec.partition_names`)

    def __repr__(self) -> str:
        kind = "encrypted" if self.key is not None else "plain"
        return f"StreamPartition({self.path!r}, {self.start}..{self.end}, {kind})"


class ParquetPartition(InputPartition):
    """Some row groups of one Parquet file; `keys` are the file's unwrapped keys (PME)."""

    def __init__(
        self,
        path: str,
        row_groups: tuple[int, ...],
        keys: tuple[ReleasedKey, ...] | None,
        values: tuple[Any, ...] = (),
    ) -> None:
        super().__init__(None)
        self.path = path
        self.row_groups = row_groups
        self.keys = keys
        self.values = values

    def __repr__(self) -> str:
        kind = "encrypted" if self.keys is not None else "plain"
        return f"ParquetPartition({self.path!r}, row_groups={list(self.row_groups)}, {kind})"


@dataclass(frozen=True, slots=True)
class ReadSpec:
    """Everything a read needs, planned by the driver."""

    fmt: str
    schema_json: str
    partitions: tuple[InputPartition, ...]
    csv: CsvOptions = CsvOptions()
    partition_names: tuple[str, ...] = ()  # columns read from `col=value/` directories

    def __repr__(self) -> str:
        return f"ReadSpec({self.fmt}, {len(self.partitions)} partitions)"


@dataclass(frozen=True, slots=True)
class WriteSpec:
    """A write: the staging directory and, per task (partition id), its fresh data keys.

    ``lines``: the DataFrame is one string column of CSV or JSON lines that Spark made with the
    writer's options (``to_csv``/``to_json``), written under that content type after `header`.
    ``parquet_options``: for pyarrow's Parquet writer (compression).
    """

    fmt: str
    directory: str
    key_name: str
    keys: tuple[tuple[DataKey, ...], ...] = field(repr=False)
    lines: str | None = None
    header: str | None = None
    parquet_options: tuple[tuple[str, str], ...] = ()
    # partitionBy: the columns, and per task the directories its keys are for (as `keys`)
    partition_columns: tuple[str, ...] = ()
    partition_dirs: tuple[tuple[str, ...], ...] = ()


class ReleasedKeys:
    """A DataKeyProvider in a task: serves the keys the driver released to it and no others."""

    def __init__(self, keys: Sequence[ReleasedKey], fresh: Sequence[DataKey] = ()) -> None:
        self._keys = {k.wrapped: k.plaintext for k in keys}
        self._keys.update({k.wrapped: k.plaintext for k in fresh})
        self._fresh = list(fresh)

    def generate_data_key(self, key_name: str) -> DataKey:
        for i, key in enumerate(self._fresh):
            if key.wrapped.key_name == key_name:
                return self._fresh.pop(i)
        raise KeyAccessError(f"no data key of {key_name!r} was issued to this task")

    def unwrap(self, wrapped: WrappedKey) -> bytes:
        key = self._keys.get(wrapped)
        if key is None:
            raise KeyAccessError("a key this task needs was not released to it")
        return key


# --------------------------------------------------------------------------- reading


def _spark_schema(schema_json: str) -> StructType:
    return StructType.fromJson(json.loads(schema_json))


class _PerUseSource(DataSource):
    """A data source class made for one read or write: its name is set with its spec."""

    _name: ClassVar[str]

    @classmethod
    def name(cls) -> str:
        return cls._name


class PPMLReadSource(_PerUseSource):
    """Base of the per-read data source classes; `_spec` and `_name` are set per read."""

    _spec: ClassVar[ReadSpec]

    def schema(self) -> StructType:
        return _spark_schema(self._spec.schema_json)

    def reader(self, schema: StructType) -> DataSourceReader:
        return _Reader(self._spec, schema)


class _Reader(DataSourceReader):
    def __init__(self, spec: ReadSpec, schema: StructType) -> None:
        self._spec = spec
        self._schema = schema

    def partitions(self) -> Sequence[InputPartition]:
        return list(self._spec.partitions)

    def read(self, partition: InputPartition) -> Iterator[pa.RecordBatch]:
        full = to_arrow_schema(self._schema, timezone="UTC")
        names = self._spec.partition_names
        target = pa.schema([f for f in full if f.name not in names]) if names else full
        if isinstance(partition, ParquetPartition):
            batches = _read_parquet(partition, target)
        elif isinstance(partition, StreamPartition):
            batches = _read_stream(partition, self._spec, target)
        else:
            raise UsageError(f"unexpected partition {partition!r}")
        for batch in batches:
            yield _with_values(batch, dict(zip(names, partition.values, strict=True)), full)


def _with_values(batch: pa.RecordBatch, values: Mapping[str, Any], full: pa.Schema) -> Any:
    """`batch` with its file's partition values as constant columns, in `full`'s order."""
    if not values:
        return batch
    columns = [
        pa.array([values[f.name]] * batch.num_rows, type=f.type)
        if f.name in values
        else batch.column(f.name)
        for f in full
    ]
    return pa.RecordBatch.from_arrays(columns, schema=full)


def _open_plaintext(partition: StreamPartition) -> tuple[Any, BinaryIO | None]:
    raw = open(partition.path, "rb")  # noqa: SIM115 -- closed by the caller
    key = partition.key
    if key is None:
        return raw, None

    def resolve(wrapped: WrappedKey) -> bytes:
        if wrapped != key.wrapped:
            raise IntegrityError()
        return key.plaintext

    try:
        reader = StreamReader(raw, resolve)
    except BaseException:
        raw.close()
        raise
    return io.BufferedReader(reader, 1 << 20), raw


def line_blocks(fh: BinaryIO, start: int, end: int, block: int | None) -> Iterator[bytes]:
    """The whole lines that begin in ``[start, end)``, in blocks of about `block` bytes
    (all in one block when `block` is None). See the module docstring for the rule."""
    if start > 0:
        fh.seek(start - 1)
        pos = start - 1 + len(fh.readline())
    else:
        fh.seek(0)
        pos = 0
    carry = b""
    while pos < end:
        chunk = fh.read(end - pos if block is None else min(block, end - pos))
        if not chunk:
            break
        pos += len(chunk)
        data = carry + chunk
        carry = b""
        if pos >= end:
            if not data.endswith(b"\n"):
                data += fh.readline()
            yield data
            return
        cut = data.rfind(b"\n") + 1
        if cut:
            yield data[:cut]
            carry = data[cut:]
        else:
            carry = data
    if carry:
        yield carry


def _read_stream(
    partition: StreamPartition, spec: ReadSpec, target: pa.Schema
) -> Iterator[pa.RecordBatch]:
    fh, raw = _open_plaintext(partition)
    try:
        with fh:
            if partition.end == 0:
                fh.read(1)  # an empty encrypted file: still verify its one segment
                return
            block = None if spec.csv.multi_line else _BLOCK_BYTES
            first = partition.start == 0
            for data in line_blocks(fh, partition.start, partition.end, block):
                table = _parse_block(data, spec, target, skip_header=first and spec.csv.header)
                first = False
                yield from table.cast(target).to_batches()
    except PPMLError as exc:
        if exc.path is None:
            exc.path = partition.path
        raise
    finally:
        if raw is not None:
            raw.close()


def _parse_block(data: bytes, spec: ReadSpec, target: pa.Schema, *, skip_header: bool) -> pa.Table:
    if spec.fmt == "text":
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        values = [(ln[:-1] if ln.endswith(b"\r") else ln).decode("utf-8") for ln in lines]
        return pa.table({target.names[0]: pa.array(values, type=pa.string())})
    if spec.fmt == "json":
        import pyarrow.json as pajson

        options = pajson.ParseOptions(explicit_schema=target, unexpected_field_behavior="ignore")
        table = pajson.read_json(io.BytesIO(data), parse_options=options)
        return table.select(target.names)
    if spec.fmt == "csv":
        import pyarrow.csv as pacsv

        csv = spec.csv
        table = pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(
                column_names=target.names, skip_rows=1 if skip_header else 0
            ),
            parse_options=csv.parse_options(),
            convert_options=pacsv.ConvertOptions(
                column_types=target,
                null_values=csv.null_values(),
                strings_can_be_null=True,
                quoted_strings_can_be_null=True,  # as Spark: "" is the null value too
            ),
        )
        return table
    raise UsageError(f"not a line format: {spec.fmt}")


def _read_parquet(partition: ParquetPartition, target: pa.Schema) -> Iterator[pa.RecordBatch]:
    import pyarrow.parquet as pq

    path = Path(partition.path)
    if partition.keys is None:
        with pq.ParquetFile(path) as pf:
            for rg in partition.row_groups:
                yield from _conform(pf.read_row_group(rg), target).to_batches()
        return
    from ppml.data.parquet import ParquetScanSession

    with ParquetScanSession(ReleasedKeys(partition.keys)) as session:
        dataset = session.dataset([path])
        fragment = next(iter(dataset.get_fragments()))
        for rg in partition.row_groups:
            part = fragment.subset(row_group_ids=[rg])
            try:
                table = part.to_table()
            except (OSError, pa.ArrowException) as exc:
                raise session.located(session.failure or IntegrityError(), path) from exc
            yield from _conform(table, target).to_batches()


def _conform(table: pa.Table, target: pa.Schema) -> pa.Table:
    """`table` with exactly the columns of `target` (missing ones null), cast to its types."""
    columns = [
        table.column(f.name) if f.name in table.column_names else pa.nulls(len(table), f.type)
        for f in target
    ]
    return pa.Table.from_arrays(columns, schema=target.remove_metadata()).cast(target)


# --------------------------------------------------------------------------- writing


class PPMLWriteSource(_PerUseSource):
    """Base of the per-write data source classes; `_spec` and `_name` are set per write."""

    _spec: ClassVar[WriteSpec]

    def writer(self, schema: StructType, overwrite: bool) -> _Writer:
        return _Writer(self._spec, schema)


@dataclass(frozen=True)
class _Written(WriterCommitMessage):
    file: str | None


_EXTENSIONS = {"csv": "csv", "json": "json", "text": "txt", "parquet": "parquet"}


class _Writer(DataSourceArrowWriter):
    def __init__(self, spec: WriteSpec, schema: StructType) -> None:
        self._spec = spec
        self._schema = schema

    def write(self, iterator: Iterator[pa.RecordBatch]) -> WriterCommitMessage:  # type: ignore[override,unused-ignore]
        from pyspark import TaskContext

        context = TaskContext.get()
        task = context.partitionId() if context is not None else 0
        batches = [b for b in iterator if b.num_rows]
        if not batches:
            return _Written(None)
        if task >= len(self._spec.keys):
            raise UsageError("more write tasks than planned: no data key for this task")
        target = to_arrow_schema(self._schema, timezone="UTC")
        table = pa.Table.from_batches(batches).cast(target)
        name = f"part-{task:05d}-{uuid.uuid4().hex[:12]}.{_EXTENSIONS[self._spec.fmt]}"
        if self._spec.partition_columns:
            return _Written(_write_partitioned(table, task, name, self._spec))
        path = Path(self._spec.directory) / name
        provider = ReleasedKeys((), self._spec.keys[task])
        write_part(table, path, provider, self._spec)
        return _Written(name)


def _write_partitioned(table: pa.Table, task: int, name: str, spec: WriteSpec) -> str:
    """One part file per partition directory of the task's rows, each under its own planned
    fresh data key; the partition columns are in the directory names, not in the files."""
    from ppml.engines.spark.partitioning import partition_dir

    names = spec.partition_columns
    columns = [table.column(n).to_pylist() for n in names]
    groups: dict[str, list[int]] = {}
    for row, values in enumerate(zip(*columns, strict=True)):
        groups.setdefault(partition_dir(names, values), []).append(row)
    planned = dict(zip(spec.partition_dirs[task], spec.keys[task], strict=True))
    data = table.drop_columns(list(names))
    written = []
    for directory, rows in sorted(groups.items()):
        key = planned.get(directory)
        if key is None:
            raise UsageError(
                f"rows for partition {directory} that the write did not plan: "
                "is the DataFrame deterministic?"
            )
        out = Path(spec.directory) / directory
        out.mkdir(parents=True, exist_ok=True)
        write_part(data.take(rows), out / name, ReleasedKeys((), (key,)), spec)
        written.append(f"{directory}/{name}")
    return ";".join(written)


def write_part(table: pa.Table, path: Path, provider: Any, spec: WriteSpec) -> None:
    """One encrypted part file of `table` as `spec` says (also the driver's empty part)."""
    from ppml.crypto.stream import ContentType
    from ppml.data.files import create_encrypted
    from ppml.data.parquet import write_parquet
    from ppml.data.tables import write_table

    if spec.lines is not None:
        with create_encrypted(
            path, provider, spec.key_name, content_type=ContentType.parse(spec.lines)
        ) as raw:
            sink = io.BufferedWriter(raw, 1 << 20)  # type: ignore[type-var]
            if spec.header is not None:
                sink.write(spec.header.encode() + b"\n")
            for batch in table.to_batches(max_chunksize=65536):
                lines = [line or "" for line in batch.column(0).to_pylist()]
                if lines:
                    sink.write(("\n".join(lines) + "\n").encode())
            sink.flush()
    elif spec.fmt == "parquet" and spec.parquet_options:
        options: dict[str, Any] = dict(spec.parquet_options)
        write_parquet(table, path, provider, key_name=spec.key_name, **options)
    else:
        write_table(table, path, provider, key_name=spec.key_name, format=spec.fmt)


# --------------------------------------------------------------------------- registration


def _register(spark: Any, base: type[DataSource], prefix: str, attrs: Mapping[str, Any]) -> str:
    name = f"{prefix}_{uuid.uuid4().hex}"
    cls = type(f"{base.__name__}_{name}", (base,), {**attrs, "_name": name})
    spark.dataSource.register(cls)
    return name


def register_read(spark: Any, spec: ReadSpec) -> str:
    """Register a data source for one planned read; returns its format name."""
    return _register(spark, PPMLReadSource, "ppml_read", {"_spec": spec})


def register_write(spark: Any, spec: WriteSpec) -> str:
    """Register a data source for one planned write; returns its format name."""
    return _register(spark, PPMLWriteSource, "ppml_write", {"_spec": spec})
