"""Parquet Modular Encryption, opened by ppml itself: footers, key material and column chunks.

pyarrow reads encrypted Parquet through its `CryptoFactory`, which calls back into Python to
unwrap keys from whatever thread needs them -- a scan thread included. This module reads the
same files on the calling thread instead, with AES-GCM from pyca/cryptography:

- `PMEFile` parses a file's plaintext crypto metadata, unwraps the footer key (the key-encryption
  key through the given ``unwrap`` -- the KMS client -- and the data key locally, as pyarrow's key
  tools do), and decrypts and authenticates the footer;
- `PMEFile.column_key_materials` lists the wrapped key-encryption keys columns need, so a caller can
  have each one unwrapped (and refused) before any scan starts;
- `PMEFile.write_plaintext` decrypts the column chunks of chosen columns and writes them, with a
  plaintext footer, as an ordinary Parquet file -- for an engine's own Parquet reader, into memory
  (`ppml.engines.sql` writes it to an anonymous memory file, never to a file system).

Every module read is authenticated with the AAD the specification gives it (file identifier,
module type, row group, column and page ordinals), so a page moved, dropped, replayed from another
file or another place, or altered fails with `IntegrityError`; every byte of a column chunk must be
consumed by its authenticated pages. Only AES_GCM_V1 with ppml's key material (internal storage,
"PKMT1") is read; a column that is not encrypted is refused.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ppml.data.kinds import PARQUET_ENCRYPTED_MAGIC, PARQUET_PLAIN_MAGIC
from ppml.data.pme_pages import (
    COLUMN_META,
    FOOTER,
    NONCE,
    TAG,
    Chunk,
    Writer,
    decrypt_pages,
    open_module,
    pwrite_all,
)
from ppml.data.pme_thrift import (
    T_BINARY,
    T_FALSE,
    T_I16,
    T_I32,
    T_I64,
    T_LIST,
    T_STRUCT,
    T_TRUE,
    Decoder,
    Raw,
    Struct,
    decode_file_metadata,
    encode_struct,
    field,
    optional,
)
from ppml.errors import InputNotFound, IntegrityError, NotEncrypted, UsageError

__all__ = ["KeyMaterial", "PMEFile", "Unwrap"]

Unwrap = Callable[[str, str], bytes]
"""(wrapped key text, master key id) -> key: the KMS client's unwrap."""

_MAX_FOOTER_BYTES = 64 * 1024 * 1024

# --------------------------------------------------------------------------- key material


@dataclass(frozen=True, slots=True)
class KeyMaterial:
    """One key's material as pyarrow stores it in the file (internal storage, double wrapping):
    the data key wrapped under a key-encryption key, which is wrapped by the KMS."""

    master_key_id: str
    wrapped_kek: str
    kek_id: bytes
    wrapped_dek: bytes

    @classmethod
    def parse(cls, raw: bytes) -> KeyMaterial:
        try:
            doc = json.loads(raw)
            if (
                not isinstance(doc, dict)
                or doc.get("keyMaterialType") != "PKMT1"
                or doc.get("internalStorage") is not True
                or doc.get("doubleWrapping") is not True
            ):
                raise ValueError("not ppml's key material")
            master = doc["masterKeyID"]
            wrapped_kek = doc["wrappedKEK"]
            if not isinstance(master, str) or not isinstance(wrapped_kek, str):
                raise ValueError("key material fields are not strings")
            kek_id = base64.b64decode(doc["keyEncryptionKeyID"], validate=True)
            wrapped_dek = base64.b64decode(doc["wrappedDEK"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error, RecursionError):
            raise IntegrityError() from None
        return cls(master, wrapped_kek, kek_id, wrapped_dek)


# --------------------------------------------------------------------------- the file

_Job = tuple[int, int, Struct, bytes]  # row group, leaf column, column metadata, data key


def _copied_meta(meta: Struct, copied: Chunk, start: int) -> Struct:
    """A column chunk's metadata for its plaintext copy at `start`."""
    new_meta = dict(meta)
    for field_id in (10, 14, 15):  # index page and bloom filter: not copied
        new_meta.pop(field_id, None)
    new_meta[7] = (T_I64, copied.size)
    new_meta[9] = (T_I64, start + copied.data_offset)
    if copied.dictionary_offset is not None:
        new_meta[11] = (T_I64, start + copied.dictionary_offset)
    else:
        new_meta.pop(11, None)
    return new_meta


class PMEFile:
    """An encrypted Parquet file (encrypted footer, AES_GCM_V1) opened with keys from `unwrap`.

    Opening reads the tail, asks `unwrap` for the footer's key-encryption key (a refusal is
    raised here, as `unwrap` raised it) and authenticates the footer. Column keys are asked for
    only when a column under them is written out (or by `unwrap_column_keys`).
    """

    def __init__(self, path: Path, unwrap: Unwrap) -> None:
        self.path = Path(path)
        self._unwrap = unwrap
        self._deks: dict[bytes, bytes] = {}
        self._fd = _open_file(self.path)
        try:
            self._open()
        except BaseException:
            os.close(self._fd)
            raise

    def close(self) -> None:
        """Close the file and forget its keys."""
        self.release_file()
        self._deks.clear()

    def release_file(self) -> None:
        """Close the file, keeping what was read of it; a later read opens it again (what it
        reads is authenticated as anything else: a file swapped meanwhile does not decrypt)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> PMEFile:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- footer

    def _open(self) -> None:
        info = os.fstat(self._fd)
        if stat.S_ISDIR(info.st_mode):
            raise UsageError("is a directory, not a Parquet file", path=self.path)
        size = info.st_size
        head = self._pread(4, 0)
        tail = self._pread(8, size - 8) if size >= 12 else b""
        if head == PARQUET_PLAIN_MAGIC and tail[4:] == PARQUET_PLAIN_MAGIC:
            raise NotEncrypted("a plaintext Parquet file, not an encrypted one", path=self.path)
        if head != PARQUET_ENCRYPTED_MAGIC:
            if tail[4:] == PARQUET_ENCRYPTED_MAGIC:
                raise self._integrity()  # an encrypted Parquet file, altered
            raise UsageError("not a Parquet file", path=self.path)
        if tail[4:] != PARQUET_ENCRYPTED_MAGIC:
            raise self._integrity()  # cut short
        length = int.from_bytes(tail[:4], "little")
        if not 0 < length <= min(size - 12, _MAX_FOOTER_BYTES):
            raise self._integrity()
        self._footer_start = size - 8 - length
        blob = self._pread(length, self._footer_start)
        try:
            decoder = Decoder(blob)
            crypto = decoder.struct()
            footer_module = memoryview(blob)[decoder.pos :]
            algorithm = field(crypto, 1, T_STRUCT)
            gcm = field(algorithm, 1, T_STRUCT)  # AES_GCM_V1; AES_GCM_CTR_V1 is not read
            if optional(gcm, 3, T_TRUE) or optional(gcm, 3, T_FALSE):
                raise UsageError(
                    "the file's AAD prefix is not stored in it; ppml cannot read it", path=self.path
                )
            prefix = optional(gcm, 1, T_BINARY) or b""
            self._file_aad = bytes(prefix) + bytes(field(gcm, 2, T_BINARY))
            footer_key = KeyMaterial.parse(field(crypto, 2, T_BINARY))
        except (ValueError, IndexError, KeyError, TypeError):
            raise self._integrity() from None
        self.footer_key = footer_key
        self._footer_dek = self._dek(footer_key)
        footer = self._decrypt_module(footer_module, self._footer_dek, self._aad(FOOTER))
        try:
            self.metadata, self._row_groups = decode_file_metadata(footer)
            self._schema = field(self.metadata, 2, T_LIST)[1]
            self._leaves, self._top = _leaves(self._schema)
        except (ValueError, IndexError, KeyError, TypeError):
            raise self._integrity() from None

    @property
    def columns(self) -> list[str]:
        """The top-level column names, in file order."""
        return list(self._top)

    @property
    def num_row_groups(self) -> int:
        return len(self._row_groups)

    def column_key_materials(self, columns: Iterable[str] | None = None) -> list[KeyMaterial]:
        """The distinct key materials of `columns` (default: all), footer key excluded when a
        column uses it."""
        leaves = self._selected_leaves(columns)
        seen: dict[tuple[str, str], KeyMaterial] = {}
        for group in self._row_groups:
            for leaf in leaves:
                material = self._column_key(group.chunk(leaf))
                if material is not None:
                    seen.setdefault((material.master_key_id, material.wrapped_kek), material)
        return list(seen.values())

    def column_key_leaves(self, columns: Iterable[str] | None = None) -> list[int]:
        """Unwrap (through `unwrap`, refusals raised here) the column keys `columns` need other
        than the footer's, and return one leaf column index per distinct key, from the first
        row group."""
        leaves = self._selected_leaves(columns)
        found: dict[tuple[str, str], int] = {}
        for group in self._row_groups[:1]:
            for leaf in leaves:
                material = self._column_key(group.chunk(leaf))
                if material is not None:
                    key = (material.master_key_id, material.wrapped_kek)
                    if key not in found:
                        self._dek(material)
                        found[key] = leaf
        for material in self.column_key_materials(columns):  # every row group's keys, too
            self._dek(material)
        return list(found.values())

    def unwrap_column_keys(self, columns: Iterable[str] | None = None) -> None:
        """Have `unwrap` unwrap now every key the columns need (refusals raised here)."""
        for material in self.column_key_materials(columns):
            self._dek(material)

    # ---------------------------------------------------------------- plaintext

    def plaintext_footer_schema_only(self) -> bytes:
        """A plaintext Parquet file with this file's schema and no row groups (for schemas)."""
        meta = {k: v for k, v in self.metadata.items() if k not in (8, 9)}
        meta[3] = (T_I64, 0)
        meta[4] = (T_LIST, (T_STRUCT, []))
        out = bytearray(PARQUET_PLAIN_MAGIC)
        footer = bytearray()
        encode_struct(meta, footer)
        out += footer
        out += len(footer).to_bytes(4, "little")
        out += PARQUET_PLAIN_MAGIC
        return bytes(out)

    def write_plaintext(
        self,
        out: int | BinaryIO,
        columns: Sequence[str] | None = None,
        *,
        pool: Executor | None = None,
    ) -> int:
        """Write the chosen top-level `columns` (default: all) as a plaintext Parquet file to
        `out`, every page decrypted and authenticated first; returns the file's size.

        Column keys are unwrapped first, on this thread. With a `pool`, column chunks are
        decrypted on its threads (AES-GCM runs without the GIL). When `out` is a file
        descriptor, each chunk is written where the encrypted file has it, by the thread that
        decrypted it (the columns left out are holes); a file object is written in order.
        """
        leaves = self._selected_leaves(columns)
        jobs = self._chunk_jobs(leaves)
        direct = isinstance(out, int)
        buffers = threading.local()

        def copy(job: _Job) -> Chunk:
            if not direct:
                return self._copy_chunk(*job)
            assert isinstance(out, int)
            size = field(job[2], 7, T_I64)
            buffer: bytearray | None = getattr(buffers, "buffer", None)
            if buffer is None or len(buffer) < size:
                buffer = buffers.buffer = bytearray(max(size, 1 << 20))
            with memoryview(buffer) as target:
                chunk = self._copy_chunk(*job, target)
                pwrite_all(out, [target[: chunk.size]], chunk.start)
            return chunk

        results = pool.map(copy, jobs) if pool is not None else map(copy, jobs)
        writer = Writer(out, self._footer_start if direct else 0)
        if direct:
            assert isinstance(out, int)
            pwrite_all(out, [PARQUET_PLAIN_MAGIC], 0)
        else:
            writer.write([PARQUET_PLAIN_MAGIC])
        groups = self._copied_row_groups(jobs, results, None if direct else writer)
        footer = bytearray()
        encode_struct(self._plaintext_metadata(groups, columns, leaves), footer)
        writer.write([footer, len(footer).to_bytes(4, "little") + PARQUET_PLAIN_MAGIC])
        return writer.pos

    def _chunk_jobs(self, leaves: Sequence[int]) -> list[_Job]:
        """(row group, leaf, column metadata, data key) of each chunk to copy, in file order."""
        jobs: list[_Job] = []
        for rg_index, group in enumerate(self._row_groups):
            ordinal = optional(group.fields, 7, T_I16)
            if ordinal is not None and ordinal != rg_index:
                raise self._integrity()
            if len(group.spans) != len(self._leaves):
                raise self._integrity()
            for leaf in leaves:
                try:
                    chunk = group.chunk(leaf)
                except (ValueError, IndexError):
                    raise self._integrity() from None
                meta, dek = self._column_meta(chunk, rg_index, leaf)
                jobs.append((rg_index, leaf, meta, dek))
        return jobs

    def _copied_row_groups(
        self, jobs: Sequence[_Job], results: Iterable[Chunk], writer: Writer | None
    ) -> list[Struct]:
        """The plaintext file's row groups, their chunks where `results` put them (or written
        now, in order, through `writer`)."""
        groups: list[Struct] = []
        new_chunks: list[Struct] = []
        group_start: int | None = None
        group_size = 0
        for index, ((rg_index, _leaf, meta, _dek), copied) in enumerate(
            zip(jobs, results, strict=True)
        ):
            if writer is None:
                start = copied.start
            else:
                start = writer.pos
                writer.write(copied.parts)
            group_start = start if group_start is None else min(group_start, start)
            group_size += copied.size
            new_chunks.append({2: (T_I64, start), 3: (T_STRUCT, _copied_meta(meta, copied, start))})
            if index + 1 == len(jobs) or jobs[index + 1][0] != rg_index:
                group = self._row_groups[rg_index]
                new_group = {k: v for k, v in group.fields.items() if k in (2, 3)}
                new_group[1] = (T_LIST, (T_STRUCT, new_chunks))
                new_group[5] = (T_I64, group_start)
                new_group[6] = (T_I64, group_size)
                groups.append(new_group)
                new_chunks = []
                group_start = None
                group_size = 0
        return groups

    def _plaintext_metadata(
        self, groups: list[Struct], columns: Sequence[str] | None, leaves: Sequence[int]
    ) -> Struct:
        """The plaintext footer: this file's metadata with `groups`, pruned to `columns`."""
        meta = {k: v for k, v in self.metadata.items() if k not in (8, 9)}
        meta[4] = (T_LIST, (T_STRUCT, groups))
        if columns is not None:
            meta[2] = (T_LIST, (T_STRUCT, _pruned_schema(self._schema, set(columns))))
            orders = optional(self.metadata, 7, T_LIST)
            if orders is not None:
                meta[7] = (T_LIST, (orders[0], [orders[1][i] for i in leaves]))
            kv = optional(self.metadata, 5, T_LIST)
            if kv is not None:  # the stored Arrow schema names every column: drop it
                kept = [e for e in kv[1] if optional(e, 1, T_BINARY) != b"ARROW:schema"]
                meta[5] = (T_LIST, (T_STRUCT, kept))
        return meta

    # ---------------------------------------------------------------- internals

    def _selected_leaves(self, columns: Iterable[str] | None) -> list[int]:
        if columns is None:
            return list(range(len(self._leaves)))
        wanted = set(columns)
        unknown = wanted - set(self._top)
        if unknown:
            raise UsageError(f"unknown columns: {', '.join(sorted(unknown))}", path=self.path)
        return [i for i, top in enumerate(self._leaves) if top in wanted]

    def _column_key(self, chunk: Struct) -> KeyMaterial | None:
        raw = optional(chunk, 8, T_STRUCT)
        if raw is None:
            raise UsageError("the file has a column that is not encrypted", path=self.path)
        try:
            crypto = Decoder(raw).struct(1) if type(raw) is Raw else raw
        except (ValueError, IndexError):
            raise self._integrity() from None
        with_column_key = optional(crypto, 2, T_STRUCT)
        if with_column_key is None:
            if optional(crypto, 1, T_STRUCT) is None:
                raise self._integrity()
            return None
        try:
            return KeyMaterial.parse(field(with_column_key, 2, T_BINARY))
        except (KeyError, TypeError):
            raise self._integrity() from None

    def _column_meta(self, chunk: Struct, rg: int, leaf: int) -> tuple[Struct, bytes]:
        material = self._column_key(chunk)
        if material is None:
            try:
                raw = field(chunk, 3, T_STRUCT)
                return (Decoder(raw).shallow() if type(raw) is Raw else raw), self._footer_dek
            except (KeyError, TypeError, ValueError, IndexError):
                raise self._integrity() from None
        dek = self._dek(material)
        try:
            sealed = field(chunk, 9, T_BINARY)
        except (KeyError, TypeError):
            raise self._integrity() from None
        plain = self._decrypt_module(memoryview(sealed), dek, self._aad(COLUMN_META, rg, leaf))
        try:
            return Decoder(plain).shallow(), dek
        except (ValueError, IndexError):
            raise self._integrity() from None

    def _copy_chunk(
        self, rg: int, leaf: int, meta: Struct, dek: bytes, target: memoryview | None = None
    ) -> Chunk:
        """Decrypt one column chunk page by page, with its pages' headers' sizes rewritten:
        into `target` (at least the chunk's encrypted size), or as parts; offsets relative to
        the chunk."""
        try:
            size = field(meta, 7, T_I64)
            data_offset = field(meta, 9, T_I64)
            dict_offset = optional(meta, 11, T_I64)
        except (KeyError, TypeError):
            raise self._integrity() from None
        has_dictionary = dict_offset is not None and 0 < dict_offset < data_offset
        start = dict_offset if has_dictionary else data_offset
        assert start is not None
        if not 4 <= start <= start + size <= self._footer_start or size <= 0:
            raise self._integrity()
        raw = self._pread(size, start)
        if len(raw) != size:
            raise self._integrity()
        rg_col = self._file_aad, rg.to_bytes(2, "little") + leaf.to_bytes(2, "little")
        try:
            return decrypt_pages(memoryview(raw), start, dek, rg_col, has_dictionary, target)
        except IntegrityError:
            raise self._integrity() from None

    def _decrypt_module(self, module: memoryview, dek: bytes, aad: bytes) -> bytes:
        try:
            plain, used = open_module(AESGCM(dek), module, 0, aad)
        except IntegrityError:
            raise self._integrity() from None
        if used != len(module):
            raise self._integrity()
        return plain

    def _aad(self, module: int, rg: int | None = None, col: int | None = None) -> bytes:
        aad = self._file_aad + bytes((module,))
        if rg is not None and col is not None:
            aad += rg.to_bytes(2, "little") + col.to_bytes(2, "little")
        return aad

    def _dek(self, material: KeyMaterial) -> bytes:
        known = self._deks.get(material.wrapped_dek)
        if known is not None:
            return known
        kek = self._unwrap(material.wrapped_kek, material.master_key_id)
        sealed = material.wrapped_dek
        if len(kek) not in (16, 24, 32) or len(sealed) < NONCE + TAG:
            raise self._integrity()
        try:
            dek = AESGCM(kek).decrypt(sealed[:NONCE], sealed[NONCE:], material.kek_id)
        except InvalidTag:
            raise self._integrity() from None
        if len(dek) not in (16, 24, 32):
            raise self._integrity()
        self._deks[material.wrapped_dek] = dek
        return dek

    def _pread(self, n: int, offset: int) -> bytes:
        if offset < 0:
            raise self._integrity()
        if self._fd < 0:
            self._fd = _open_file(self.path)
        return os.pread(self._fd, n, offset)

    def _integrity(self) -> IntegrityError:
        return IntegrityError(path=self.path)


def _open_file(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InputNotFound("no such file", path=path) from None
    except IsADirectoryError:
        raise UsageError("is a directory, not a Parquet file", path=path) from None


# --------------------------------------------------------------------------- schema


def _leaves(schema: list[Struct]) -> tuple[list[str], list[str]]:
    """For each leaf column (file order), its top-level column's name; and the top-level names."""
    if not schema:
        raise ValueError("empty schema")
    leaves: list[str] = []
    top: list[str] = []
    index = 1

    def walk(top_name: str) -> None:
        nonlocal index
        element = schema[index]
        index += 1
        children = optional(element, 5, T_I32) or 0
        if children == 0:
            leaves.append(top_name)
        for _ in range(children):
            walk(top_name)

    for _ in range(optional(schema[0], 5, T_I32) or 0):
        name = bytes(field(schema[index], 4, T_BINARY)).decode()
        top.append(name)
        walk(name)
    if index != len(schema):
        raise ValueError("schema elements left over")
    return leaves, top


def _pruned_schema(schema: list[Struct], keep: set[str]) -> list[Struct]:
    out: list[Struct] = []
    index = 1

    def subtree() -> list[Struct]:
        nonlocal index
        element = schema[index]
        index += 1
        items = [element]
        for _ in range(optional(element, 5, T_I32) or 0):
            items.extend(subtree())
        return items

    kept_top = 0
    for _ in range(optional(schema[0], 5, T_I32) or 0):
        name = bytes(field(schema[index], 4, T_BINARY)).decode()
        items = subtree()
        if name in keep:
            out.extend(items)
            kept_top += 1
    root = dict(schema[0])
    root[5] = (T_I32, kept_top)
    return [root, *out]
