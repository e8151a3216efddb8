"""What a file is, from its first bytes: ppml's streaming format, Parquet (plaintext or with an
encrypted footer), or anything else. The one place that reads a data file's magic."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from ppml.crypto.stream import MAGIC

__all__ = [
    "PARQUET_ENCRYPTED_MAGIC",
    "PARQUET_PLAIN_MAGIC",
    "FileKind",
    "detect_file_kind",
    "sniff",
]

PARQUET_PLAIN_MAGIC = b"PAR1"
PARQUET_ENCRYPTED_MAGIC = b"PARE"  # Parquet Modular Encryption, encrypted footer

FileKind = Literal["stream", "parquet", "encrypted-parquet", "plain"]


def sniff(path: Path) -> FileKind:
    """'stream' (ppml streaming format), 'parquet' (a plaintext Parquet file's magic),
    'encrypted-parquet' (an encrypted footer's magic) or 'plain' (anything else)."""
    with open(path, "rb") as fh:
        head = fh.read(len(MAGIC))
    if head == MAGIC:
        return "stream"
    if head[:4] == PARQUET_PLAIN_MAGIC:
        return "parquet"
    if head[:4] == PARQUET_ENCRYPTED_MAGIC:
        return "encrypted-parquet"
    return "plain"


def detect_file_kind(path: Path) -> str:
    """'stream' (ppml streaming format), 'parquet' (any Parquet, encrypted or not) or 'plain'."""
    kind = sniff(path)
    return "parquet" if kind == "encrypted-parquet" else kind
