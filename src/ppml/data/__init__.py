"""Encrypted datasets: files encrypted at rest, read and written as Arrow, pandas or polars.

pyarrow, pandas and polars are imported only when a table function needs them, so that the
file commands start fast.
"""

from __future__ import annotations

from ppml.data.files import (
    content_type_for,
    create_encrypted,
    decrypt_file,
    encrypt_file,
    open_encrypted,
    output_directory,
    read_stream_header,
    rewrap_file,
)
from ppml.data.paths import (
    PATH_FORMATS,
    PathResult,
    Rewrapped,
    decrypt_path,
    describe,
    encrypt_path,
    rewrap_path,
)
from ppml.data.tables import (
    TableFormat,
    detect_file_kind,
    read_pandas,
    read_polars,
    read_table,
    write_pandas,
    write_polars,
    write_table,
)

__all__ = [
    "PATH_FORMATS",
    "PathResult",
    "Rewrapped",
    "TableFormat",
    "content_type_for",
    "create_encrypted",
    "decrypt_file",
    "decrypt_path",
    "describe",
    "detect_file_kind",
    "encrypt_file",
    "encrypt_path",
    "open_encrypted",
    "output_directory",
    "read_pandas",
    "read_polars",
    "read_stream_header",
    "read_table",
    "rewrap_file",
    "rewrap_path",
    "write_pandas",
    "write_polars",
    "write_table",
]
