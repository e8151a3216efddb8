"""The footer reader: what an encrypted Parquet file says without any key (its magics, and the
named key of its footer, from the plaintext FileCryptoMetaData before the encrypted footer)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ppml.data.kinds import PARQUET_ENCRYPTED_MAGIC, PARQUET_PLAIN_MAGIC
from ppml.data.parquet.kms import parse_wrapped
from ppml.errors import InputNotFound, IntegrityError, NotEncrypted, UsageError

__all__ = [
    "FooterKey",
    "classify",
    "is_encrypted_parquet",
    "parquet_footer_key",
    "require_encrypted",
]

# Magic at both ends plus the 4-byte footer length.
_MIN_FILE_BYTES = 12
_MAX_FOOTER_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class FooterKey:
    """The named key (and version) that protects a file's footer, readable without any key."""

    key_name: str
    version: int


def is_encrypted_parquet(path: Path) -> bool:
    """True when `path` is a Parquet file with an encrypted footer (magic ``PARE`` at both ends)."""
    return classify(Path(path)) == "encrypted"


def parquet_footer_key(path: Path) -> FooterKey:
    """The named key (and version) of an encrypted file's footer, read without any key.

    Column keys are recorded inside the encrypted footer, so they cannot be listed without it.
    """
    path = Path(path)
    require_encrypted(path)
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(size - 8)
            footer_len = int.from_bytes(fh.read(4), "little")
            if not 0 < footer_len <= min(size - _MIN_FILE_BYTES, _MAX_FOOTER_BYTES):
                raise ValueError("footer length out of range")
            fh.seek(size - 8 - footer_len)
            footer = fh.read(footer_len)
        material = json.loads(_file_crypto_key_metadata(footer))
        name = material["masterKeyID"]
        wrapped = parse_wrapped(material["wrappedKEK"], name)[0]
    except (
        ValueError,
        KeyError,
        TypeError,
        IndexError,
        RecursionError,
        IntegrityError,
        UsageError,
    ):
        raise IntegrityError(path=path) from None
    return FooterKey(wrapped.key_name, wrapped.version)


def classify(path: Path) -> Literal["encrypted", "plain", "truncated", "other"]:
    """Look at both magics; a file that starts as encrypted Parquet but does not end so is cut."""
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
            size = fh.seek(0, os.SEEK_END)
            tail = b""
            if size >= _MIN_FILE_BYTES:
                fh.seek(size - 4)
                tail = fh.read(4)
    except FileNotFoundError:
        raise InputNotFound("no such file", path=path) from None
    except IsADirectoryError:
        raise UsageError("is a directory, not a Parquet file", path=path) from None
    if head == PARQUET_ENCRYPTED_MAGIC:
        return "encrypted" if tail == PARQUET_ENCRYPTED_MAGIC else "truncated"
    if head == PARQUET_PLAIN_MAGIC and tail == PARQUET_PLAIN_MAGIC:
        return "plain"
    return "other"


def require_encrypted(path: Path) -> None:
    kind = classify(path)
    if kind == "truncated":
        raise IntegrityError(path=path)
    if kind == "plain":
        raise NotEncrypted("a plaintext Parquet file, not an encrypted one", path=path)
    if kind == "other":
        raise UsageError("not a Parquet file", path=path)


def _file_crypto_key_metadata(footer: bytes) -> bytes:
    """The footer key metadata: field 2 of the Thrift (compact) FileCryptoMetaData struct."""
    reader = _CompactReader(footer)
    found: bytes | None = None
    for field_id, field_type in reader.fields():
        if field_id == 2 and field_type == _T_BINARY:
            found = reader.binary()
        else:
            reader.skip(field_type)
    if found is None:
        raise ValueError("no footer key metadata")
    return found


_T_TRUE, _T_FALSE, _T_BYTE, _T_I16, _T_I32, _T_I64, _T_DOUBLE = 1, 2, 3, 4, 5, 6, 7
_T_BINARY, _T_LIST, _T_SET, _T_STRUCT = 8, 9, 10, 12
_MAX_DEPTH = 16


class _CompactReader:
    """Just enough of the Thrift compact protocol to walk the plaintext FileCryptoMetaData."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def _byte(self) -> int:
        value = self._data[self._pos]  # IndexError on truncation, caught by the caller
        self._pos += 1
        return value

    def varint(self) -> int:
        result = shift = 0
        while True:
            byte = self._byte()
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise ValueError("varint too long")

    def binary(self) -> bytes:
        length = self.varint()
        end = self._pos + length
        if end > len(self._data):
            raise ValueError("binary runs past the end")
        value = self._data[self._pos : end]
        self._pos = end
        return value

    def fields(self, depth: int = 0) -> Iterator[tuple[int, int]]:
        if depth > _MAX_DEPTH:
            raise ValueError("nesting too deep")
        field_id = 0
        while True:
            header = self._byte()
            if header == 0:
                return
            delta, field_type = header >> 4, header & 0x0F
            if delta:
                field_id += delta
            else:
                zigzag = self.varint()
                field_id = (zigzag >> 1) ^ -(zigzag & 1)
            yield field_id, field_type

    def skip(self, field_type: int, depth: int = 0, *, in_collection: bool = False) -> None:
        if depth > _MAX_DEPTH:
            raise ValueError("nesting too deep")
        if field_type in (_T_TRUE, _T_FALSE):
            if in_collection:  # a field's bool lives in its header; a list element is a byte
                self._byte()
        elif field_type == _T_BYTE:
            self._byte()
        elif field_type in (_T_I16, _T_I32, _T_I64):
            self.varint()
        elif field_type == _T_DOUBLE:
            self._pos += 8
        elif field_type == _T_BINARY:
            self.binary()
        elif field_type in (_T_LIST, _T_SET):
            header = self._byte()
            count, element_type = header >> 4, header & 0x0F
            if count == 15:
                count = self.varint()
            for _ in range(count):
                self.skip(element_type, depth + 1, in_collection=True)
        elif field_type == _T_STRUCT:
            for _, inner_type in self.fields(depth + 1):
                self.skip(inner_type, depth + 1)
        else:
            raise ValueError(f"unsupported thrift type {field_type}")
