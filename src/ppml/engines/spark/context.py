"""`PPMLContext`: PySpark over encrypted files, as ordinary DataFrames.

```python
ctx = PPMLContext(app_name="sales")
df = ctx.read().csv("people.csv.ppml", header=True)
ctx.write(df, key="sales").mode("overwrite").parquet("out")
```

The driver holds the key provider (`ppml.api.key_provider()`: attested under `ppml run`, else
the workspace's KMS, or one given as ``keys=``). It plans each read and write and gives every
partition only the keys of its own file; see `ppml.engines.spark.datasource`.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ppml.crypto.envelope import DataKeyProvider, WrappedKey
from ppml.crypto.stream import ContentType, plaintext_size
from ppml.errors import (
    ConfigurationError,
    IntegrityError,
    OutputExists,
    UsageError,
)

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import StructType

    from ppml.engines.spark.datasource import CsvOptions, ReleasedKey

__all__ = ["PPMLContext", "PPMLReader", "PPMLWriter"]

DEFAULT_SPLIT_BYTES = 128 << 20
_SAMPLE_BYTES = 1 << 20
_FORMAT_TYPES = {
    "csv": (ContentType.CSV,),
    "json": (ContentType.JSON,),
    "text": (ContentType.TEXT, ContentType.CSV, ContentType.JSON),
}


class PPMLContext:
    """A SparkSession plus the keys to read and write encrypted files."""

    def __init__(
        self,
        app_name: str = "ppml",
        *,
        spark: SparkSession | None = None,
        keys: DataKeyProvider | None = None,
        master: str | None = None,
    ) -> None:
        if spark is None:
            from pyspark.sql import SparkSession

            # The Python workers must import ppml: run them with this interpreter.
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
            builder = SparkSession.builder.appName(app_name)
            if master is not None:
                builder = builder.master(master)
            builder = _with_kms_client_jar(builder)
            spark = builder.getOrCreate()
        self._spark = spark
        self._keys = keys

    @property
    def spark(self) -> SparkSession:
        return self._spark

    @property
    def keys(self) -> DataKeyProvider:
        if self._keys is None:
            from ppml.api import key_provider

            self._keys = key_provider()
        return self._keys

    def read(self) -> PPMLReader:
        """A reader for encrypted (or plain) CSV, JSON lines, text and Parquet."""
        return PPMLReader(self)

    def write(self, df: DataFrame, *, key: str) -> PPMLWriter:
        """A writer that encrypts every part file under a fresh data key of the named `key`."""
        return PPMLWriter(self, df, key)

    def stop(self) -> None:
        self._spark.stop()


def _with_kms_client_jar(builder: Any) -> Any:
    """Put ppml's Parquet KMS client on the class path of a Spark this process will start, with
    the quiet driver `ppml spark-submit` gives (`_quiet_driver`).

    An existing JVM (``spark-submit``, an earlier session) keeps its class path: `ppml
    spark-submit` adds the jar itself; elsewhere encrypted Parquet is read by the Python reader.
    """
    from pyspark import SparkContext

    from ppml.engines.spark.jvm import kms_client_jar

    if SparkContext._gateway is not None:
        return builder
    # Under spark-submit (a JVM that started this Python, or PYSPARK_SUBMIT_ARGS that ppml or
    # the user wrote) the driver's settings are made already.
    if "PYSPARK_GATEWAY_PORT" not in os.environ and "PYSPARK_SUBMIT_ARGS" not in os.environ:
        builder = _quiet_driver(builder)
    jar = kms_client_jar()
    return builder.config("spark.jars", str(jar)) if jar.is_file() else builder


def _quiet_driver(builder: Any) -> Any:
    """ppml's driver logging, Spark's progress bar on a terminal only and a local master's
    driver on the loopback address, where the builder does not say otherwise."""
    from ppml.engines.spark.launcher import driver_log4j2, local_ip_for

    given = getattr(builder, "_options", {})  # pyspark keeps the builder's settings there
    if "spark.driver.extraJavaOptions" not in given and driver_log4j2().is_file():
        builder = builder.config(
            "spark.driver.extraJavaOptions", f"-Dlog4j2.configurationFile={driver_log4j2()}"
        )
    if "spark.ui.showConsoleProgress" not in given:
        builder = builder.config("spark.ui.showConsoleProgress", str(sys.stderr.isatty()).lower())
    local_ip = local_ip_for(str(given.get("spark.master", "local[*]")))
    if local_ip is not None:
        os.environ.setdefault("SPARK_LOCAL_IP", local_ip)
    return builder


def _part_files(paths: Sequence[Path]) -> list[Path]:
    from ppml.data.tree import part_files

    return [f.absolute() for path in paths for f in part_files(path)]


class PPMLReader:
    """Like `spark.read`, for files that may be encrypted (detected per file)."""

    def __init__(self, ctx: PPMLContext) -> None:
        self._ctx = ctx
        self._options: dict[str, str] = {}
        self._schema: StructType | str | None = None

    def option(self, key: str, value: object) -> PPMLReader:
        self._options[key.lower()] = str(value)
        return self

    def options(self, **options: object) -> PPMLReader:
        for key, value in options.items():
            self.option(key, value)
        return self

    def schema(self, schema: StructType | str) -> PPMLReader:
        self._schema = schema
        return self

    def _flag(self, name: str, default: bool = False) -> bool:
        return self._options.get(name.lower(), str(default)).lower() == "true"

    def csv(self, path: str | Path | Sequence[str | Path], **options: object) -> DataFrame:
        self.options(**options)
        return self._load("csv", path)

    def json(self, path: str | Path | Sequence[str | Path], **options: object) -> DataFrame:
        self.options(**options)
        return self._load("json", path)

    def text(self, path: str | Path | Sequence[str | Path], **options: object) -> DataFrame:
        self.options(**options)
        return self._load("text", path)

    def parquet(self, path: str | Path | Sequence[str | Path], **options: object) -> DataFrame:
        self.options(**options)
        return self._load("parquet", path)

    # ----------------------------------------------------------------------- planning

    def _load(self, fmt: str, path: str | Path | Sequence[str | Path]) -> DataFrame:
        from ppml.engines.spark.datasource import CsvOptions, ReadSpec, register_read

        paths = [Path(path)] if isinstance(path, str | Path) else [Path(p) for p in path]
        files = _part_files(paths)
        csv = CsvOptions(
            header=self._flag("header"),
            sep=self._options.get("sep", self._options.get("delimiter", ",")),
            quote=self._options.get("quote", '"'),
            multi_line=self._flag("multiLine"),
            escape=self._options.get("escape"),
            null_value=self._options.get("nullvalue"),
        )
        from ppml.engines.spark.partitioning import discover

        found = discover(paths, files)
        if fmt == "parquet" and self._spark_parquet_reader():
            return self._load_parquet_natively(files, paths if found else [])
        if fmt == "parquet":
            schema, partitions = self._plan_parquet(files)
        else:
            planned = [self._plan_stream(f, fmt, csv) for f in files]
            partitions = [p for parts, _ in planned for p in parts]
            schema = self._given_schema() or self._infer(fmt, csv, files, [k for _, k in planned])
        names: tuple[str, ...] = ()
        if found is not None:
            schema, names = _with_partition_fields(schema, found), found.names
            for part in partitions:
                part.values = found.values[Path(part.path)]
        spec = ReadSpec(fmt, schema.json(), tuple(partitions), csv, names)
        name = register_read(self._ctx.spark, spec)
        return self._ctx.spark.read.format(name).schema(schema).load()

    def _given_schema(self) -> StructType | None:
        if self._schema is None:
            return None
        from pyspark.sql.types import StructType

        if isinstance(self._schema, StructType):
            return self._schema
        parsed = StructType.fromDDL(self._schema)
        if not isinstance(parsed, StructType):
            raise UsageError("a schema is a struct type (DDL such as 'name STRING, age INT')")
        return parsed

    def _split_bytes(self) -> int:
        value = int(self._options.get("maxpartitionbytes", DEFAULT_SPLIT_BYTES))
        if value <= 0:
            raise UsageError("maxPartitionBytes must be positive")
        return value

    def _unwrap(self, wrapped: WrappedKey, cache: dict[WrappedKey, ReleasedKey]) -> ReleasedKey:
        from ppml.engines.spark.datasource import ReleasedKey

        if wrapped not in cache:
            cache[wrapped] = ReleasedKey(wrapped, self._ctx.keys.unwrap(wrapped))
        return cache[wrapped]

    def _plan_stream(
        self, path: Path, fmt: str, csv: CsvOptions
    ) -> tuple[list[Any], ReleasedKey | None]:
        from ppml.data.files import annotate_errors, read_stream_header
        from ppml.data.kinds import detect_file_kind
        from ppml.engines.spark.datasource import StreamPartition

        kind = detect_file_kind(path)
        key: ReleasedKey | None = None
        if kind == "parquet":
            raise UsageError(f"a Parquet file: read it with .parquet(), not .{fmt}()", path=path)
        if kind == "stream":
            header, header_len = read_stream_header(path)
            if header.content_type not in _FORMAT_TYPES[fmt]:
                raise UsageError(
                    f"holds {header.content_type.name.lower()} content, not {fmt}", path=path
                )
            with annotate_errors(path):
                key = self._unwrap(header.wrapped, {})
            size = plaintext_size(header, header_len, path.stat().st_size)
            if size < 0:
                raise IntegrityError(path=path)
            unit = header.segment_size
        else:
            size = path.stat().st_size
            unit = 1
        if (fmt == "csv" and csv.multi_line) or size == 0:
            return [StreamPartition(str(path), 0, size, key)], key
        step = max(unit, self._split_bytes() // unit * unit)
        parts = [
            StreamPartition(str(path), start, min(start + step, size), key)
            for start in range(0, size, step)
        ]
        return parts, key

    def _sample(self, path: Path, key: ReleasedKey | None, whole: bool) -> bytes:
        """The first whole lines (about a megabyte; everything when `whole`) of a file."""
        from ppml.crypto.stream import StreamReader

        with open(path, "rb") as raw:
            if key is None:
                data = raw.read() if whole else raw.read(_SAMPLE_BYTES)
                at_end = whole or not raw.read(1)
            else:
                reader = StreamReader(raw, lambda _w: key.plaintext)
                data = reader.read() if whole else reader.read(_SAMPLE_BYTES)
                at_end = reader.tell() >= reader.size
        if not at_end and b"\n" in data:
            data = data[: data.rfind(b"\n") + 1]
        return data

    def _infer(
        self, fmt: str, csv: CsvOptions, files: list[Path], keys: list[ReleasedKey | None]
    ) -> StructType:
        import io

        import pyarrow as pa
        from pyspark.sql.types import StringType, StructField, StructType

        if fmt == "text":
            return StructType([StructField("value", StringType(), True)])
        if fmt == "csv":
            import pyarrow.csv as pacsv

            data = self._sample(files[0], keys[0], csv.multi_line)
            table = pacsv.read_csv(
                io.BytesIO(data),
                read_options=pacsv.ReadOptions(autogenerate_column_names=not csv.header),
                parse_options=csv.parse_options(),
            )
            names = (
                table.column_names if csv.header else [f"_c{i}" for i in range(table.num_columns)]
            )
            if not self._flag("inferSchema"):
                return StructType([StructField(n, StringType(), True) for n in names])
            schema = pa.schema(
                [pa.field(n, f.type) for n, f in zip(names, table.schema, strict=True)]
            )
            return _to_spark(schema)
        import pyarrow.json as pajson

        tables = [
            pajson.read_json(io.BytesIO(self._sample(f, k, False)))
            for f, k in zip(files[:16], keys[:16], strict=True)
            if f.stat().st_size
        ]
        if not tables:
            return StructType([])
        merged = pa.unify_schemas([t.schema for t in tables], promote_options="permissive")
        ordered = pa.schema(sorted(merged, key=lambda f: f.name))
        return _to_spark(ordered)

    def _spark_parquet_reader(self) -> bool:
        """Whether Parquet is read by Spark's own reader (``ppml.reader``: auto, spark, python).

        Spark's reader prunes columns, pushes filters down and decodes on the JVM; ``auto``
        uses it whenever the session's JVM has ppml's KMS client class.
        """
        from ppml.engines.spark.jvm import kms_client_jar, load_kms_client

        choice = self._options.get("ppml.reader", "auto").lower()
        if choice not in ("auto", "spark", "python"):
            raise UsageError("ppml.reader is one of auto, spark, python")
        if choice == "python":
            return False
        available = load_kms_client(self._ctx.spark)
        if choice == "spark" and not available:
            raise ConfigurationError(
                "Spark's JVM cannot load ppml's Parquet KMS client: start the session with "
                f"spark.jars={kms_client_jar()} (PPMLContext and `ppml spark-submit` do)"
            )
        return available

    def _load_parquet_natively(self, files: list[Path], partitioned: list[Path]) -> DataFrame:
        """Read with Spark's Parquet reader, each encrypted file's keys released by the driver
        (partition columns found by Spark under the one root in `partitioned`)."""
        import pyarrow.parquet as pq

        from ppml.data.files import annotate_errors
        from ppml.data.parquet import ParquetScanSession, is_encrypted_parquet
        from ppml.engines.spark.jvm import scan_options

        encrypted: list[Path] = []
        plain: list[Path] = []
        for f in files:
            (encrypted if is_encrypted_parquet(f) else plain).append(f)
        schemas = []
        keys: dict[tuple[str, str], bytes] = {}
        if encrypted:
            with ParquetScanSession(self._ctx.keys) as session:
                for path in encrypted:
                    with annotate_errors(path):
                        schema, _groups = session.inspect(path)
                        schemas.append(schema.remove_metadata())
                keys = session.released_key_encryption_keys()
        for path in plain:
            with annotate_errors(path):
                schemas.append(pq.read_schema(path).remove_metadata())
        options = {k: v for k, v in self._options.items() if not k.startswith("ppml.")}
        options.pop("maxpartitionbytes", None)
        if partitioned:
            if len(partitioned) != 1 or not partitioned[0].is_dir():
                raise UsageError("partitioned Parquet is read from one directory at a time")
            options.setdefault("basepath", str(partitioned[0].absolute()))
        if any(not s.equals(schemas[0]) for s in schemas[1:]):
            options.setdefault("mergeschema", "true")
        given = self._given_schema()
        frames = []
        for group, extra in ((encrypted, scan_options(keys)), (plain, {})):
            if not group:
                continue
            reader = self._ctx.spark.read.options(**options, **extra)
            if given is not None:
                reader = reader.schema(given)
            frames.append(reader.parquet(*(str(f) for f in group)))
        if len(frames) == 1:
            return frames[0]
        return frames[0].unionByName(frames[1], allowMissingColumns=True)

    def _plan_parquet(self, files: list[Path]) -> tuple[StructType, list[Any]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from ppml.data.files import annotate_errors
        from ppml.data.parquet import ParquetScanSession, is_encrypted_parquet
        from ppml.engines.spark.datasource import ParquetPartition, ReleasedKey

        schemas: list[pa.Schema] = []
        partitions: list[Any] = []
        for path in files:
            if not is_encrypted_parquet(path):
                with pq.ParquetFile(path) as pf:
                    schemas.append(pf.schema_arrow)
                    groups = pf.num_row_groups
                keys = None
            else:
                recorder = _Recorder(self._ctx.keys)
                with annotate_errors(path), ParquetScanSession(recorder) as session:
                    schema, groups = session.inspect(path)
                    schemas.append(schema)
                keys = tuple(ReleasedKey(w, k) for w, k in recorder.keys.items())
            ranges: list[tuple[int, ...]] = [(i,) for i in range(groups)] or [()]
            partitions.extend(ParquetPartition(str(path), r, keys) for r in ranges)
        given = self._given_schema()
        if given is not None:
            return given, partitions
        merged = pa.unify_schemas(schemas, promote_options="permissive")
        merged = merged.remove_metadata()
        return _to_spark(merged), partitions


def _with_partition_fields(schema: StructType, found: Any) -> StructType:
    """`schema` with the discovered partition columns at the end (replacing any same-named
    column of the files), as Spark's partition discovery adds them."""
    from pyspark.sql.types import (
        DateType,
        DoubleType,
        IntegerType,
        LongType,
        StringType,
        StructField,
        StructType,
    )

    types = {"integer": IntegerType(), "long": LongType(), "double": DoubleType(),
             "date": DateType(), "string": StringType()}  # fmt: skip
    kept = [f for f in schema.fields if f.name not in found.names]
    added = [StructField(n, types[t], True) for n, t in zip(found.names, found.types, strict=True)]
    return StructType(kept + added)


def _to_spark(schema: pa.Schema) -> StructType:
    import pyarrow as pa
    from pyspark.sql.pandas.types import from_arrow_schema

    def spark_compatible(t: pa.DataType) -> pa.DataType:
        # Types Spark has no Arrow mapping for, read as their plain equivalents.
        if pa.types.is_null(t) or pa.types.is_string_view(t) or pa.types.is_large_string(t):
            return pa.string()
        if pa.types.is_binary_view(t) or pa.types.is_large_binary(t):
            return pa.binary()
        return t

    fixed = pa.schema([pa.field(f.name, spark_compatible(f.type)) for f in schema])
    return from_arrow_schema(fixed, prefer_timestamp_ntz=False)


class _Recorder:
    """A provider for the driver's planning: unwraps through `inner` and keeps what it got."""

    def __init__(self, inner: DataKeyProvider) -> None:
        self._inner = inner
        self.keys: dict[WrappedKey, bytes] = {}

    def generate_data_key(self, key_name: str) -> Any:
        raise UsageError("planning a read does not make data keys")

    def unwrap(self, wrapped: WrappedKey) -> bytes:
        key = self._inner.unwrap(wrapped)
        self.keys[wrapped] = key
        return key


# Spark's option names (lower case) per format, for writing. Options Spark's readers take are
# accepted and ignored by the writer, as Spark does; a name Spark does not know is refused (a
# typo would otherwise change sensitive output silently).
_CSV_WRITE = frozenset(
    {"sep", "delimiter", "quote", "escape", "escapequotes", "quoteall", "nullvalue",
     "emptyvalue", "dateformat", "timestampformat", "timestampntzformat",
     "ignoreleadingwhitespace", "ignoretrailingwhitespace", "chartoescapequoteescaping",
     "header", "encoding", "charset", "compression", "codec", "linesep"}
)  # fmt: skip
_JSON_WRITE = frozenset(
    {"dateformat", "timestampformat", "timestampntzformat", "ignorenullfields", "encoding",
     "charset", "compression", "codec", "linesep", "pretty", "timezone"}
)  # fmt: skip
_TEXT_WRITE = frozenset({"compression", "codec", "linesep"})
_PARQUET_WRITE = frozenset({"compression", "parquet.compression"})
_READ_ONLY = frozenset(
    {"inferschema", "samplingratio", "enforceschema", "mode", "columnnameofcorruptrecord",
     "multiline", "maxcolumns", "maxcharspercolumn", "unescapedquotehandling", "comment",
     "nanvalue", "positiveinf", "negativeinf", "locale", "prefersdecimal", "allowcomments",
     "allowunquotedfieldnames", "allowsinglequotes", "allownumericleadingzeros",
     "allowbackslashescapingAnyCharacter".lower(), "allownonnumericnumbers",
     "allowunquotedcontrolchars", "primitivesasstring", "dropfieldifallnull", "wholetext",
     "mergeschema", "pathglobfilter", "recursivefilelookup", "modifiedbefore", "modifiedafter",
     "maxpartitionbytes", "datetimerebasemode", "int96rebasemode", "timezone", "path"}
)  # fmt: skip
_WRITE_OPTIONS = {"csv": _CSV_WRITE, "json": _JSON_WRITE, "text": _TEXT_WRITE,
                  "parquet": _PARQUET_WRITE}  # fmt: skip
_PARQUET_CODECS = {"none": "none", "uncompressed": "none", "snappy": "snappy", "gzip": "gzip",
                   "zstd": "zstd", "lz4": "lz4", "lz4_raw": "lz4", "brotli": "brotli"}  # fmt: skip


_PARTITION_TYPES = frozenset({"string", "integer", "long", "short", "byte", "boolean", "date"})


def _column(name: str) -> Any:
    from pyspark.sql import functions as F

    return F.col("`" + name.replace("`", "``") + "`")


def _planned_partitions(df: DataFrame, parts: tuple[str, ...], tasks: int) -> tuple[Any, ...]:
    """For each write task, the partition directories of its rows: one small Spark job over
    the same (hash-partitioned) plan as the write, so each directory gets its own fresh key."""
    from pyspark.sql import functions as F

    from ppml.engines.spark.partitioning import partition_dir

    task = "__ppml_task"
    rows = df.select(*map(_column, parts), F.spark_partition_id().alias(task)).distinct().collect()
    per_task: dict[int, list[str]] = {}
    for row in rows:
        values = [row[i] for i in range(len(parts))]
        per_task.setdefault(row[task], []).append(partition_dir(parts, values))
    return tuple(tuple(sorted(per_task.get(t, []))) for t in range(tasks))


class PPMLWriter:
    """Like `df.write`: a directory of part files, each under a fresh data key.

    Spark's writer surface: `mode`, `option`/`options`, keyword options on `csv`, `json`,
    `text` and `parquet` (and `format(...).save(path)`). CSV and JSON lines are made by Spark
    itself (``to_csv``/``to_json`` with the writer's options: sep, quote, escape, quoteAll,
    nullValue, dateFormat, timestampFormat, ignoreNullFields, ...), so the text is what Spark's
    own writer would put in a file, then encrypted part by part. ``header`` (CSV) puts the
    column names first in every part, as Spark does. Compression: Parquet's codecs (snappy by
    default, gzip, zstd, lz4, brotli, none); encrypted CSV, JSON and text are not compressed
    (``none``/``uncompressed`` only).
    """

    _MODES = ("overwrite", "append", "ignore", "error", "errorifexists", "default")

    def __init__(self, ctx: PPMLContext, df: DataFrame, key: str) -> None:
        from ppml.crypto.envelope import validate_key_name

        self._ctx = ctx
        self._df = df
        self._key = validate_key_name(key)
        self._mode = "error"
        self._format: str | None = None
        self._options: dict[str, str] = {}
        self._partition_by: tuple[str, ...] = ()

    def partitionBy(self, *cols: str | Sequence[str]) -> PPMLWriter:
        """Write each row under ``col=value/`` directories of these columns (string, integer,
        boolean or date), as Spark does: one part per partition value and task."""
        names: list[str] = []
        for c in cols:
            names.extend([c] if isinstance(c, str) else list(c))
        fields = {f.name: f for f in self._df.schema.fields}
        for n in names:
            if n not in fields:
                raise UsageError(
                    f"partition column `{n}` not found in schema {self._df.schema.simpleString()}"
                )
            kind = fields[n].dataType.typeName()
            if kind not in _PARTITION_TYPES:
                raise UsageError(
                    f"partition column `{n}` is {kind}: partitionBy takes string, integer, "
                    "boolean or date columns"
                )
        if names and len(set(names)) == len(fields):
            raise UsageError("cannot use all columns for partition columns")
        if len(set(names)) != len(names):
            raise UsageError(f"a partition column is named twice: {', '.join(names)}")
        self._partition_by = tuple(names)
        return self

    def mode(self, mode: str | None) -> PPMLWriter:
        if mode is None:
            return self
        if mode.lower() not in self._MODES:
            accepted = ", ".join(f"'{m}'" for m in self._MODES)
            raise UsageError(f"unknown save mode: {mode}. Accepted save modes are {accepted}.")
        self._mode = "error" if mode.lower() in ("default", "errorifexists") else mode.lower()
        return self

    def option(self, key: str, value: object) -> PPMLWriter:
        if value is None:
            return self
        text = str(value).lower() if isinstance(value, bool) else str(value)
        self._options[key.lower()] = text
        return self

    def options(self, **options: object) -> PPMLWriter:
        for key, value in options.items():
            self.option(key, value)
        return self

    def format(self, source: str) -> PPMLWriter:
        if source.lower() not in _WRITE_OPTIONS:
            raise UsageError(f"unknown format {source!r}: csv, json, text or parquet")
        self._format = source.lower()
        return self

    def save(self, path: str | Path, format: str | None = None, mode: str | None = None,
             **options: object) -> None:  # fmt: skip
        if format is not None:
            self.format(format)
        if self._format is None:
            raise UsageError("no format: call .format('csv'|'json'|'text'|'parquet') or .csv()")
        self._partitioned(options).mode(mode).options(**options)._save(self._format, Path(path))

    def csv(self, path: str | Path, mode: str | None = None, **options: object) -> None:
        self.mode(mode).options(**options)._save("csv", Path(path))

    def json(self, path: str | Path, mode: str | None = None, **options: object) -> None:
        self.mode(mode).options(**options)._save("json", Path(path))

    def _partitioned(self, options: dict[str, object]) -> PPMLWriter:
        given = options.pop("partitionBy", None)
        if given is not None:
            self.partitionBy(*([given] if isinstance(given, str) else list(given)))  # type: ignore[call-overload]
        return self

    def text(self, path: str | Path, mode: str | None = None, **options: object) -> None:
        from pyspark.sql.types import StringType

        fields = [f for f in self._df.schema.fields if f.name not in self._partition_by]
        if len(fields) != 1 or not isinstance(fields[0].dataType, StringType):
            raise UsageError("text output needs one string column")
        self.mode(mode).options(**options)._save("text", Path(path))

    def parquet(self, path: str | Path, mode: str | None = None, **options: object) -> None:
        self._partitioned(options).mode(mode).options(**options)._save("parquet", Path(path))

    def _checked_options(self, fmt: str) -> dict[str, str]:
        known = _WRITE_OPTIONS[fmt]
        unknown = sorted(k for k in self._options if k not in known and k not in _READ_ONLY)
        if unknown:
            raise UsageError(
                f"unknown {fmt} writer option(s) {', '.join(unknown)}: "
                f"known are {', '.join(sorted(known))}"
            )
        opts = {k: v for k, v in self._options.items() if k in known}
        codec = opts.pop("compression", opts.pop("codec", opts.pop("parquet.compression", None)))
        if codec is not None and fmt == "parquet":
            if codec.lower() not in _PARQUET_CODECS:
                raise UsageError(
                    f"Codec [{codec}] is not available. Known codecs are "
                    f"{', '.join(sorted(_PARQUET_CODECS))}."
                )
            opts["compression"] = _PARQUET_CODECS[codec.lower()]
        elif codec is not None and codec.lower() not in ("none", "uncompressed"):
            raise UsageError(
                f"compression {codec!r}: encrypted {fmt} parts are not compressed "
                "(none or uncompressed); Parquet takes snappy, gzip, zstd, lz4 or brotli"
            )
        for name in ("encoding", "charset"):
            if opts.get(name, "utf-8").lower().replace("_", "-") not in ("utf-8", "utf8"):
                raise UsageError(f"{name} {opts[name]!r}: encrypted text is UTF-8 only")
            opts.pop(name, None)
        if opts.pop("linesep", "\n") != "\n":
            raise UsageError("lineSep: encrypted parts end their lines with \\n only")
        if opts.pop("pretty", "false").lower() == "true":
            raise UsageError("pretty JSON spans lines: JSON parts hold one record per line")
        if "delimiter" in opts:
            opts["sep"] = opts.pop("delimiter")
        return opts

    def _save(self, fmt: str, out: Path) -> None:
        from ppml.data.files import output_directory

        plan = self._plan(fmt)
        if out.exists():
            if self._mode == "error":
                raise OutputExists("output exists (use mode('overwrite'))", path=out)
            if self._mode == "ignore":
                return
        if self._mode == "append" and out.exists():
            if not out.is_dir():
                raise UsageError("output exists and is not a directory", path=out)
            staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
            try:
                self._run(plan, staging)
                for part in sorted(p for p in staging.rglob("*") if p.is_file()):
                    target = out / part.relative_to(staging)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(part, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            return
        with output_directory(out, overwrite=True) as staging:
            self._run(plan, staging)

    def _plan(self, fmt: str) -> tuple[str, DataFrame, dict[str, Any]]:
        """The format, the DataFrame to write and the write's settings (options checked)."""
        from pyspark.sql import functions as F

        opts = self._checked_options(fmt)
        parts = self._partition_by
        df = self._df
        settings: dict[str, Any] = {"partition_columns": parts}
        if parts:  # rows of a partition value together (one file each), as Spark users do
            df = df.repartition(max(1, df.rdd.getNumPartitions()), *map(_column, parts))
        if fmt == "parquet":
            return fmt, df, {**settings, "parquet_options": tuple(sorted(opts.items()))}
        if fmt == "text":
            return fmt, df, settings
        header = opts.pop("header", "false").lower() == "true"
        if fmt == "csv":
            opts.setdefault("escape", opts.get("quote", '"'))  # RFC 4180, as ppml reads CSV
        data = [n for n in df.columns if n not in parts]
        row = F.struct(*map(_column, data))
        make = F.to_csv if fmt == "csv" else F.to_json
        lines = df.select(*map(_column, parts), make(row, opts).alias("value"))
        settings["lines"] = fmt
        if header:
            names = F.struct(*[F.lit(n).alias(f"c{i}") for i, n in enumerate(data)])
            first = self._ctx.spark.range(1).select(F.to_csv(names, opts)).first()
            settings["header"] = first[0] if first is not None else ""
        return fmt, lines, settings

    def _run(self, plan: tuple[str, DataFrame, dict[str, Any]], staging: Path) -> None:
        from pyspark.sql.pandas.types import to_arrow_schema

        from ppml._internal.fs import MARKER
        from ppml.engines.spark.datasource import WriteSpec, register_write, write_part

        fmt, df, settings = plan
        provider = self._ctx.keys
        tasks = df.rdd.getNumPartitions()
        parts = settings["partition_columns"]
        if parts:
            dirs = _planned_partitions(df, parts, tasks)
            settings["partition_dirs"] = dirs
            keys = tuple(tuple(provider.generate_data_key(self._key) for _ in d) for d in dirs)
        else:
            keys = tuple((provider.generate_data_key(self._key),) for _ in range(tasks))
        spec = WriteSpec(fmt, str(staging.absolute()), self._key, keys, **settings)
        name = register_write(self._ctx.spark, spec)
        df.write.format(name).mode("append").save()
        if parts:
            return  # Spark writes no file for an empty partitioned output either
        if not any(p for p in staging.iterdir() if p.name != MARKER):
            import pyarrow as pa

            empty = pa.Table.from_batches([], schema=to_arrow_schema(df.schema, timezone="UTC"))
            ext = {"csv": "csv", "json": "json", "text": "txt", "parquet": "parquet"}[fmt]
            write_part(empty, staging / f"part-00000.{ext}", provider, spec)
