"""Tables to and from encrypted files: CSV, JSON lines and text in the streaming format, Parquet
with Parquet Modular Encryption; as pyarrow Tables, pandas or polars DataFrames.

Reading detects what each file is (streaming-encrypted, PME Parquet, or plaintext), so a directory
of part files may mix them. Writing always encrypts.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import enum
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ppml.crypto.envelope import DataKeyProvider
from ppml.crypto.stream import DEFAULT_SEGMENT_SIZE, ContentType
from ppml.data.files import annotate_errors, create_encrypted, open_encrypted
from ppml.data.kinds import detect_file_kind
from ppml.data.tree import part_files
from ppml.errors import UsageError

if TYPE_CHECKING:
    import pandas as pd
    import polars as pl
    import pyarrow as pa

__all__ = [
    "TableFormat",
    "detect_file_kind",
    "json_default",
    "part_files",
    "read_pandas",
    "read_polars",
    "read_table",
    "write_pandas",
    "write_polars",
    "write_table",
]


class TableFormat(enum.StrEnum):
    CSV = "csv"
    JSON = "json"
    TEXT = "text"
    PARQUET = "parquet"

    @classmethod
    def parse(cls, name: str) -> TableFormat:
        try:
            return cls(name.lower())
        except ValueError:
            raise UsageError(
                f"unknown table format {name!r} (expected csv, json, text or parquet)"
            ) from None

    @classmethod
    def for_path(cls, path: Path) -> TableFormat:
        suffix = path.suffix.lower()
        for fmt, suffixes in _SUFFIXES.items():
            if suffix in suffixes:
                return fmt
        raise UsageError(
            f"cannot tell the table format from {path.name!r}: "
            "pass format= (csv, json, text or parquet)",
            path=path,
        )


_SUFFIXES = {
    TableFormat.CSV: (".csv",),
    TableFormat.JSON: (".json", ".jsonl", ".ndjson"),
    TableFormat.TEXT: (".txt", ".text"),
    TableFormat.PARQUET: (".parquet", ".pq"),
}


def read_table(
    path: Path | str,
    provider: DataKeyProvider,
    *,
    columns: Sequence[str] | None = None,
    format: TableFormat | str | None = None,
) -> pa.Table:
    """Read a file, or a directory of part files, into one Arrow table.

    The encoding of each file is read from the file (its header says CSV, JSON or text); `format`
    is needed only for plaintext files whose name does not tell.
    """
    import pyarrow as pa

    tables = [_read_one(p, provider, columns, format) for p in part_files(Path(path))]
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")


def _read_one(
    path: Path,
    provider: DataKeyProvider,
    columns: Sequence[str] | None,
    fmt: TableFormat | str | None,
) -> pa.Table:
    kind = detect_file_kind(path)
    with annotate_errors(path):
        if kind == "parquet":
            from ppml.data.parquet import read_parquet

            return read_parquet(path, provider, columns=columns)
        if kind == "stream":
            with open_encrypted(path, provider) as reader:
                ctype = reader.header.content_type
                table = _parse(io.BufferedReader(reader, 1 << 20), _format_of(ctype, path))
        else:
            given = TableFormat.parse(fmt) if isinstance(fmt, str) else fmt
            with open(path, "rb") as fh:
                table = _parse(fh, given or TableFormat.for_path(path))
    return table.select(list(columns)) if columns is not None else table


def _format_of(ctype: ContentType, path: Path) -> TableFormat:
    if ctype is ContentType.CSV:
        return TableFormat.CSV
    if ctype is ContentType.JSON:
        return TableFormat.JSON
    if ctype is ContentType.TEXT:
        return TableFormat.TEXT
    raise UsageError("holds raw bytes, not a table (encrypted as bytes)", path=path)


def _parse(fh: Any, fmt: TableFormat) -> pa.Table:
    import pyarrow as pa

    if fmt is TableFormat.CSV:
        import pyarrow.csv as pacsv

        return pacsv.read_csv(fh)
    if fmt is TableFormat.JSON:
        import pyarrow.json as pajson

        return pajson.read_json(fh)
    if fmt is TableFormat.TEXT:
        lines = fh.read().decode("utf-8").splitlines()
        return pa.table({"value": pa.array(lines, type=pa.string())})
    raise UsageError(f"{fmt} is not a streamed format")


def write_table(
    table: pa.Table,
    path: Path | str,
    provider: DataKeyProvider,
    *,
    key_name: str,
    format: TableFormat | str | None = None,
    column_keys: Mapping[str, Sequence[str]] | None = None,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    overwrite: bool = True,
) -> None:
    """Encrypt `table` into `path`; the format comes from `format` or the file's suffix.

    CSV, JSON lines and text go into the streaming format; Parquet uses Parquet Modular
    Encryption, with `column_keys` ({key name: [columns]}) putting columns under other keys.
    """
    path = Path(path)
    fmt = TableFormat.parse(format) if isinstance(format, str) else format
    fmt = fmt or TableFormat.for_path(path)
    if column_keys and fmt is not TableFormat.PARQUET:
        raise UsageError("column keys apply to Parquet only", path=path)
    if fmt is TableFormat.PARQUET:
        from ppml.data.parquet import write_parquet

        with annotate_errors(path):
            write_parquet(table, path, provider, key_name=key_name, column_keys=column_keys)
        return
    ctype = {
        TableFormat.CSV: ContentType.CSV,
        TableFormat.JSON: ContentType.JSON,
        TableFormat.TEXT: ContentType.TEXT,
    }[fmt]
    if fmt is TableFormat.TEXT:
        _check_text_table(table, path)
    with create_encrypted(
        path, provider, key_name, content_type=ctype, segment_size=segment_size, overwrite=overwrite
    ) as raw:
        sink = io.BufferedWriter(raw, 1 << 20)  # type: ignore[type-var]
        _serialize(table, sink, fmt)
        sink.flush()


def _check_text_table(table: pa.Table, path: Path) -> None:
    import pyarrow as pa

    if table.num_columns != 1 or not pa.types.is_string(table.schema.field(0).type):
        raise UsageError("a text file holds one string column (one row per line)", path=path)


def _serialize(table: pa.Table, sink: Any, fmt: TableFormat) -> None:
    if fmt is TableFormat.CSV:
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, sink)
    elif fmt is TableFormat.JSON:
        for batch in table.to_batches(max_chunksize=8192):
            for row in batch.to_pylist():
                sink.write(json.dumps(row, default=json_default, ensure_ascii=False).encode())
                sink.write(b"\n")
    else:
        for batch in table.to_batches(max_chunksize=65536):
            for line in batch.column(0).to_pylist():
                if line is not None and ("\n" in line or "\r" in line):
                    raise UsageError("a text row must not contain a line break")
                sink.write(("" if line is None else line).encode() + b"\n")


def json_default(value: object) -> object:
    """JSON for the Arrow values json cannot encode itself (dates, decimals, bytes, durations)."""
    if isinstance(value, _dt.datetime | _dt.date | _dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    raise TypeError(f"cannot write a {type(value).__name__} value as JSON")


def read_pandas(path: Path | str, provider: DataKeyProvider, **kwargs: Any) -> pd.DataFrame:
    """`read_table(...).to_pandas()`."""
    return read_table(path, provider, **kwargs).to_pandas()


def write_pandas(
    df: pd.DataFrame, path: Path | str, provider: DataKeyProvider, **kwargs: Any
) -> None:
    """Write a pandas DataFrame (its index is dropped) like `write_table`."""
    import pyarrow as pa

    write_table(pa.Table.from_pandas(df, preserve_index=False), path, provider, **kwargs)


def read_polars(path: Path | str, provider: DataKeyProvider, **kwargs: Any) -> pl.DataFrame:
    """`read_table` as a polars DataFrame."""
    import polars as pl

    frame = pl.from_arrow(read_table(path, provider, **kwargs))
    assert isinstance(frame, pl.DataFrame)
    return frame


def write_polars(
    df: pl.DataFrame, path: Path | str, provider: DataKeyProvider, **kwargs: Any
) -> None:
    """Write a polars DataFrame like `write_table`."""
    write_table(df.to_arrow(), path, provider, **kwargs)
