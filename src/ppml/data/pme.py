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
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ppml.errors import InputNotFound, IntegrityError, NotEncrypted, UsageError

__all__ = ["KeyMaterial", "PMEFile", "Unwrap"]

Unwrap = Callable[[str, str], bytes]
"""(wrapped key text, master key id) -> key: the KMS client's unwrap."""

_MAGIC_ENCRYPTED = b"PARE"
_MAGIC_PLAIN = b"PAR1"
_MAX_FOOTER_BYTES = 64 * 1024 * 1024
_MAX_CHUNK_BYTES = 1 << 34
_NONCE = 12
_TAG = 16
_LENGTH = 4
_MODULE_OVERHEAD = _LENGTH + _NONCE + _TAG

# Module types (Parquet Modular Encryption, "AAD suffix").
_FOOTER, _COLUMN_META, _DATA_PAGE, _DICT_PAGE = 0, 1, 2, 3
_DATA_PAGE_HEADER, _DICT_PAGE_HEADER = 4, 5

# Parquet's PageType.
_PAGE_DATA, _PAGE_INDEX, _PAGE_DICTIONARY, _PAGE_DATA_V2 = 0, 1, 2, 3

# Thrift compact protocol types.
_T_TRUE, _T_FALSE, _T_BYTE, _T_I16, _T_I32, _T_I64, _T_DOUBLE = 1, 2, 3, 4, 5, 6, 7
_T_BINARY, _T_LIST, _T_SET, _T_STRUCT = 8, 9, 10, 12
_MAX_DEPTH = 32

Struct = dict[int, tuple[int, Any]]
"""A decoded Thrift struct: field id -> (compact type, value)."""


class _Raw(bytes):
    """A struct or list value kept as its encoded bytes: decoded only if looked into, written
    back as it was (statistics, encodings, paths: what a plaintext copy passes through)."""

    __slots__ = ()


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
        if head == _MAGIC_PLAIN and tail[4:] == _MAGIC_PLAIN:
            raise NotEncrypted("a plaintext Parquet file, not an encrypted one", path=self.path)
        if head != _MAGIC_ENCRYPTED:
            if tail[4:] == _MAGIC_ENCRYPTED:
                raise self._integrity()  # an encrypted Parquet file, altered
            raise UsageError("not a Parquet file", path=self.path)
        if tail[4:] != _MAGIC_ENCRYPTED:
            raise self._integrity()  # cut short
        length = int.from_bytes(tail[:4], "little")
        if not 0 < length <= min(size - 12, _MAX_FOOTER_BYTES):
            raise self._integrity()
        self._footer_start = size - 8 - length
        blob = self._pread(length, self._footer_start)
        try:
            decoder = _Decoder(blob)
            crypto = decoder.struct()
            footer_module = memoryview(blob)[decoder.pos :]
            algorithm = _field(crypto, 1, _T_STRUCT)
            gcm = _field(algorithm, 1, _T_STRUCT)  # AES_GCM_V1; AES_GCM_CTR_V1 is not read
            if _optional(gcm, 3, _T_TRUE) or _optional(gcm, 3, _T_FALSE):
                raise UsageError(
                    "the file's AAD prefix is not stored in it; ppml cannot read it", path=self.path
                )
            prefix = _optional(gcm, 1, _T_BINARY) or b""
            self._file_aad = bytes(prefix) + bytes(_field(gcm, 2, _T_BINARY))
            footer_key = KeyMaterial.parse(_field(crypto, 2, _T_BINARY))
        except (ValueError, IndexError, KeyError, TypeError):
            raise self._integrity() from None
        self.footer_key = footer_key
        self._footer_dek = self._dek(footer_key)
        footer = self._decrypt_module(footer_module, self._footer_dek, self._aad(_FOOTER))
        try:
            self.metadata, self._row_groups = _decode_file_metadata(footer)
            self._schema = _field(self.metadata, 2, _T_LIST)[1]
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
        meta[3] = (_T_I64, 0)
        meta[4] = (_T_LIST, (_T_STRUCT, []))
        out = bytearray(_MAGIC_PLAIN)
        footer = bytearray()
        _encode_struct(meta, footer)
        out += footer
        out += len(footer).to_bytes(4, "little")
        out += _MAGIC_PLAIN
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
        keep_top = None if columns is None else set(columns)
        jobs: list[tuple[int, int, Struct, bytes]] = []
        for rg_index, group in enumerate(self._row_groups):
            ordinal = _optional(group.fields, 7, _T_I16)
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
        direct = isinstance(out, int)
        buffers = threading.local()

        def copy(job: tuple[int, int, Struct, bytes]) -> _Chunk:
            if not direct:
                return self._copy_chunk(*job)
            assert isinstance(out, int)
            size = _field(job[2], 7, _T_I64)
            buffer: bytearray | None = getattr(buffers, "buffer", None)
            if buffer is None or len(buffer) < size:
                buffer = buffers.buffer = bytearray(max(size, 1 << 20))
            with memoryview(buffer) as target:
                chunk = self._copy_chunk(*job, target)
                _pwrite_all(out, [target[: chunk.size]], chunk.start)
            return chunk

        results = pool.map(copy, jobs) if pool is not None else map(copy, jobs)
        writer = _Writer(out, self._footer_start if direct else 0)
        if direct:
            assert isinstance(out, int)
            _pwrite_all(out, [_MAGIC_PLAIN], 0)
        else:
            writer.write([_MAGIC_PLAIN])
        groups: list[Struct] = []
        new_chunks: list[Struct] = []
        group_start: int | None = None
        group_size = 0
        for index, ((rg_index, _leaf, meta, _dek), copied) in enumerate(
            zip(jobs, results, strict=True)
        ):
            if direct:
                start = copied.start
            else:
                start = writer.pos
                writer.write(copied.parts)
            group_start = start if group_start is None else min(group_start, start)
            group_size += copied.size
            new_meta = dict(meta)
            for field_id in (10, 14, 15):  # index page and bloom filter: not copied
                new_meta.pop(field_id, None)
            new_meta[7] = (_T_I64, copied.size)
            new_meta[9] = (_T_I64, start + copied.data_offset)
            if copied.dictionary_offset is not None:
                new_meta[11] = (_T_I64, start + copied.dictionary_offset)
            else:
                new_meta.pop(11, None)
            new_chunks.append({2: (_T_I64, start), 3: (_T_STRUCT, new_meta)})
            if index + 1 == len(jobs) or jobs[index + 1][0] != rg_index:
                group = self._row_groups[rg_index]
                new_group = {k: v for k, v in group.fields.items() if k in (2, 3)}
                new_group[1] = (_T_LIST, (_T_STRUCT, new_chunks))
                new_group[5] = (_T_I64, group_start)
                new_group[6] = (_T_I64, group_size)
                groups.append(new_group)
                new_chunks = []
                group_start = None
                group_size = 0
        meta = {k: v for k, v in self.metadata.items() if k not in (8, 9)}
        meta[4] = (_T_LIST, (_T_STRUCT, groups))
        if keep_top is not None:
            meta[2] = (_T_LIST, (_T_STRUCT, _pruned_schema(self._schema, keep_top)))
            orders = _optional(self.metadata, 7, _T_LIST)
            if orders is not None:
                meta[7] = (_T_LIST, (orders[0], [orders[1][i] for i in leaves]))
            kv = _optional(self.metadata, 5, _T_LIST)
            if kv is not None:  # the stored Arrow schema names every column: drop it
                kept = [e for e in kv[1] if _optional(e, 1, _T_BINARY) != b"ARROW:schema"]
                meta[5] = (_T_LIST, (_T_STRUCT, kept))
        footer = bytearray()
        _encode_struct(meta, footer)
        writer.write([footer, len(footer).to_bytes(4, "little") + _MAGIC_PLAIN])
        return writer.pos

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
        raw = _optional(chunk, 8, _T_STRUCT)
        if raw is None:
            raise UsageError("the file has a column that is not encrypted", path=self.path)
        try:
            crypto = _Decoder(raw).struct(1) if type(raw) is _Raw else raw
        except (ValueError, IndexError):
            raise self._integrity() from None
        with_column_key = _optional(crypto, 2, _T_STRUCT)
        if with_column_key is None:
            if _optional(crypto, 1, _T_STRUCT) is None:
                raise self._integrity()
            return None
        try:
            return KeyMaterial.parse(_field(with_column_key, 2, _T_BINARY))
        except (KeyError, TypeError):
            raise self._integrity() from None

    def _column_meta(self, chunk: Struct, rg: int, leaf: int) -> tuple[Struct, bytes]:
        material = self._column_key(chunk)
        if material is None:
            try:
                raw = _field(chunk, 3, _T_STRUCT)
                return (_Decoder(raw).shallow() if type(raw) is _Raw else raw), self._footer_dek
            except (KeyError, TypeError, ValueError, IndexError):
                raise self._integrity() from None
        dek = self._dek(material)
        try:
            sealed = _field(chunk, 9, _T_BINARY)
        except (KeyError, TypeError):
            raise self._integrity() from None
        plain = self._decrypt_module(memoryview(sealed), dek, self._aad(_COLUMN_META, rg, leaf))
        try:
            return _Decoder(plain).shallow(), dek
        except (ValueError, IndexError):
            raise self._integrity() from None

    def _copy_chunk(
        self, rg: int, leaf: int, meta: Struct, dek: bytes, target: memoryview | None = None
    ) -> _Chunk:
        """Decrypt one column chunk page by page, with its pages' headers' sizes rewritten:
        into `target` (at least the chunk's encrypted size), or as parts; offsets relative to
        the chunk."""
        try:
            size = _field(meta, 7, _T_I64)
            data_offset = _field(meta, 9, _T_I64)
            dict_offset = _optional(meta, 11, _T_I64)
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
        view = memoryview(raw)
        aesgcm = AESGCM(dek)
        at = 0
        page = 0
        parts: list[bytes] = []
        written = 0
        new_dict: int | None = None
        new_data: int | None = None
        rg_col = self._file_aad, rg.to_bytes(2, "little") + leaf.to_bytes(2, "little")
        while at < size:
            dictionary = at == 0 and has_dictionary
            if dictionary:
                header_aad = _module_aad(rg_col, _DICT_PAGE_HEADER, None)
                page_aad = _module_aad(rg_col, _DICT_PAGE, None)
            else:
                if page > 0x7FFF:
                    raise self._integrity()
                header_aad = _module_aad(rg_col, _DATA_PAGE_HEADER, page)
                page_aad = _module_aad(rg_col, _DATA_PAGE, page)
                page += 1
            header_plain, used = self._module_at(aesgcm, view, at, header_aad)
            at += used
            nonce, sealed, used = self._module_parts(view, at)
            at += used
            body_size = len(sealed) - _TAG
            try:
                kind, header = _rewrite_page_header(header_plain, used, body_size)
            except (ValueError, IndexError, KeyError, TypeError):
                raise self._integrity() from None
            if dictionary != (kind == _PAGE_DICTIONARY) or kind not in (
                _PAGE_DATA,
                _PAGE_DICTIONARY,
                _PAGE_DATA_V2,
            ):
                raise self._integrity()
            if dictionary:
                new_dict = written
            elif new_data is None:
                new_data = written
            try:
                if target is None:
                    parts.append(header)
                    parts.append(aesgcm.decrypt(nonce, sealed, page_aad))
                else:
                    # Plaintext is never longer than its modules: it fits the chunk's size.
                    here = written
                    target[here : here + len(header)] = header
                    here += len(header)
                    aesgcm.decrypt_into(nonce, sealed, page_aad, target[here : here + body_size])
            except InvalidTag:
                raise self._integrity() from None
            written += len(header) + body_size
        if at != size or new_data is None:
            raise self._integrity()
        return _Chunk(parts, start, written, new_dict, new_data)

    def _module_parts(self, view: memoryview, at: int) -> tuple[memoryview, memoryview, int]:
        """The nonce and sealed bytes of the module at `at`, and the module's length."""
        if at + _MODULE_OVERHEAD > len(view):
            raise self._integrity()
        length = int.from_bytes(view[at : at + _LENGTH], "little")
        end = at + _LENGTH + length
        if length < _NONCE + _TAG or end > len(view):
            raise self._integrity()
        return (
            view[at + _LENGTH : at + _LENGTH + _NONCE],
            view[at + _LENGTH + _NONCE : end],
            end - at,
        )

    def _module_at(
        self, aesgcm: AESGCM, view: memoryview, at: int, aad: bytes
    ) -> tuple[bytes, int]:
        """The module at `at`, decrypted and authenticated, and its length."""
        nonce, sealed, used = self._module_parts(view, at)
        try:
            return aesgcm.decrypt(nonce, sealed, aad), used
        except InvalidTag:
            raise self._integrity() from None

    def _decrypt_module(self, module: memoryview, dek: bytes, aad: bytes) -> bytes:
        plain, used = self._module_at(AESGCM(dek), module, 0, aad)
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
        if len(kek) not in (16, 24, 32) or len(sealed) < _NONCE + _TAG:
            raise self._integrity()
        try:
            dek = AESGCM(kek).decrypt(sealed[:_NONCE], sealed[_NONCE:], material.kek_id)
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


@dataclass(slots=True)
class _Chunk:
    parts: list[bytes]
    start: int  # where the encrypted file has the chunk
    size: int
    dictionary_offset: int | None
    data_offset: int


class _Writer:
    """Sequential writes to a file object, or to a file descriptor from `pos` on."""

    def __init__(self, out: int | BinaryIO, pos: int = 0) -> None:
        self.pos = pos
        self._out = out

    def write(self, parts: Sequence[bytes | bytearray]) -> None:
        if isinstance(self._out, int):
            _pwrite_all(self._out, parts, self.pos)
            self.pos += sum(len(p) for p in parts)
            return
        for part in parts:
            self._out.write(part)
            self.pos += len(part)


def _pwrite_all(fd: int, parts: Sequence[bytes | bytearray | memoryview], offset: int) -> None:
    pending = [memoryview(p) for p in parts if len(p)]
    while pending:
        done = os.pwritev(fd, pending[:_IOV_MAX], offset)
        if done <= 0:
            raise OSError("short write to a memory file")
        offset += done
        while done:
            head = pending[0]
            if done >= len(head):
                done -= len(head)
                pending.pop(0)
            else:
                pending[0] = head[done:]
                done = 0


_IOV_MAX = 512


def _module_aad(rg_col: tuple[bytes, bytes], module: int, page: int | None) -> bytes:
    file_aad, ordinals = rg_col
    aad = file_aad + bytes((module,)) + ordinals
    return aad if page is None else aad + page.to_bytes(2, "little")


def _rewrite_page_header(plain: bytes, sealed_size: int, size: int) -> tuple[int, bytes]:
    """A decrypted page header with compressed_page_size set to the plaintext size (it held
    the size of the encrypted module) and no CRC (it would be of the encrypted page); the
    header's page type. Writers put fields 1-3 first: those are patched in place."""
    decoder = _Decoder(plain)
    fields: list[int] = []
    values: list[int] = []
    for expected in (0x15, 0x15, 0x15):  # fields 1, 2, 3 as i32, each one id after the last
        if plain[decoder.pos] != expected:
            return _rewrite_page_header_slowly(plain, sealed_size, size)
        decoder.pos += 1
        fields.append(decoder.pos)
        zigzag = decoder.varint()
        values.append((zigzag >> 1) ^ -(zigzag & 1))
    if values[2] != sealed_size:
        raise ValueError("page size does not match its module")
    end3 = decoder.pos
    rest: bytes = plain[end3:]
    if plain[end3] == 0x15:  # field 4, the CRC: dropped; the next field's delta grows by one
        decoder.pos = end3 + 1
        decoder.varint()
        after = decoder.pos
        following = plain[after]
        delta = following >> 4
        if following != 0 and (delta == 0 or delta == 15):
            return _rewrite_page_header_slowly(plain, sealed_size, size)
        if following == 0:
            rest = plain[after:]
        else:
            rest = bytes((((delta + 1) << 4) | (following & 0x0F),)) + plain[after + 1 :]
    encoded = bytearray(plain[: fields[2]])
    _varint(size << 1, encoded)
    encoded += rest
    return values[0], bytes(encoded)


def _rewrite_page_header_slowly(plain: bytes, sealed_size: int, size: int) -> tuple[int, bytes]:
    header = _Decoder(plain).struct()
    if _field(header, 3, _T_I32) != sealed_size:
        raise ValueError("page size does not match its module")
    header[3] = (_T_I32, size)
    header.pop(4, None)
    out = bytearray()
    _encode_struct(header, out)
    return _field(header, 1, _T_I32), bytes(out)


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
        children = _optional(element, 5, _T_I32) or 0
        if children == 0:
            leaves.append(top_name)
        for _ in range(children):
            walk(top_name)

    for _ in range(_optional(schema[0], 5, _T_I32) or 0):
        name = bytes(_field(schema[index], 4, _T_BINARY)).decode()
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
        for _ in range(_optional(element, 5, _T_I32) or 0):
            items.extend(subtree())
        return items

    kept_top = 0
    for _ in range(_optional(schema[0], 5, _T_I32) or 0):
        name = bytes(_field(schema[index], 4, _T_BINARY)).decode()
        items = subtree()
        if name in keep:
            out.extend(items)
            kept_top += 1
    root = dict(schema[0])
    root[5] = (_T_I32, kept_top)
    return [root, *out]


# --------------------------------------------------------------------------- thrift compact


def _field(struct_: Struct, field_id: int, kind: int) -> Any:
    found_kind, value = struct_[field_id]
    if found_kind != kind and not (kind in (_T_TRUE, _T_FALSE) and found_kind in (1, 2)):
        raise TypeError(f"field {field_id} has type {found_kind}, not {kind}")
    return value


def _optional(struct_: Struct, field_id: int, kind: int) -> Any:
    if field_id not in struct_:
        return None
    return _field(struct_, field_id, kind)


class _Decoder:
    """Thrift's compact protocol, decoded into `Struct` values (lists as (element type, items))."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes | memoryview) -> None:
        self.data = data
        self.pos = 0

    def varint(self) -> int:
        data = self.data
        pos = self.pos
        byte = data[pos]
        pos += 1
        if byte < 0x80:
            self.pos = pos
            return byte
        result = byte & 0x7F
        shift = 7
        while True:
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                self.pos = pos
                return result
            shift += 7
            if shift > 63:
                raise ValueError("varint too long")

    def value(self, kind: int, depth: int) -> Any:
        if kind in (_T_I32, _T_I64, _T_I16):
            zigzag = self.varint()
            return (zigzag >> 1) ^ -(zigzag & 1)
        if kind == _T_BINARY:
            length = self.varint()
            end = self.pos + length
            if end > len(self.data):
                raise ValueError("binary runs past the end")
            value = bytes(self.data[self.pos : end])
            self.pos = end
            return value
        if kind == _T_STRUCT:
            return self.struct(depth + 1)
        if kind in (_T_LIST, _T_SET):
            if depth > _MAX_DEPTH:
                raise ValueError("nesting too deep")
            header = self.data[self.pos]
            self.pos += 1
            count, element = header >> 4, header & 0x0F
            if count == 15:
                count = self.varint()
            if count > len(self.data):
                raise ValueError("list longer than the data")
            if element in (_T_TRUE, _T_FALSE):
                items = [self.data[self.pos + i] == _T_TRUE for i in range(count)]
                self.pos += count
                return (element, items)
            return (element, [self.value(element, depth + 1) for _ in range(count)])
        if kind == _T_BYTE:
            byte = self.data[self.pos]
            self.pos += 1
            return byte
        if kind == _T_DOUBLE:
            raw = bytes(self.data[self.pos : self.pos + 8])
            if len(raw) != 8:
                raise ValueError("double runs past the end")
            self.pos += 8
            return raw
        raise ValueError(f"unsupported thrift type {kind}")

    def headers(self, depth: int = 0) -> Iterator[tuple[int, int]]:
        """(field id, type) of each field of the struct here; the caller reads each value."""
        if depth > _MAX_DEPTH:
            raise ValueError("nesting too deep")
        field_id = 0
        while True:
            header = self.data[self.pos]
            self.pos += 1
            if header == 0:
                return
            delta = header >> 4
            if delta:
                field_id += delta
            else:
                zigzag = self.varint()
                field_id = (zigzag >> 1) ^ -(zigzag & 1)
            yield field_id, header & 0x0F

    def list_header(self, element: int) -> int:
        header = self.data[self.pos]
        self.pos += 1
        count = header >> 4
        if header & 0x0F != element:
            raise ValueError("unexpected list element type")
        if count == 15:
            count = self.varint()
        if count > len(self.data):
            raise ValueError("list longer than the data")
        return count

    def shallow(self) -> Struct:
        """The struct here with its struct and list values left encoded (`_Raw`)."""
        out: Struct = {}
        data = self.data
        for field_id, kind in self.headers(1):
            if kind in (_T_TRUE, _T_FALSE):
                out[field_id] = (kind, kind == _T_TRUE)
            elif kind in (_T_STRUCT, _T_LIST, _T_SET):
                start = self.pos
                self.pos = _skip_value(data, start, kind, 1)
                out[field_id] = (kind, _Raw(data[start : self.pos]))
            else:
                out[field_id] = (kind, self.value(kind, 1))
        return out

    def struct(self, depth: int = 0) -> Struct:
        if depth > _MAX_DEPTH:
            raise ValueError("nesting too deep")
        out: Struct = {}
        field_id = 0
        data = self.data
        while True:
            header = data[self.pos]
            self.pos += 1
            if header == 0:
                return out
            kind = header & 0x0F
            delta = header >> 4
            if delta:
                field_id += delta
            else:
                zigzag = self.varint()
                field_id = (zigzag >> 1) ^ -(zigzag & 1)
            if kind in (_T_TRUE, _T_FALSE):
                out[field_id] = (kind, kind == _T_TRUE)
            else:
                out[field_id] = (kind, self.value(kind, depth))


class _RowGroup:
    """A row group's own fields, and where each of its column chunks lies in the footer: a
    chunk is decoded only when asked for (a query reads a few of a table's columns)."""

    __slots__ = ("_chunks", "_data", "fields", "spans")

    def __init__(self, data: bytes, fields: Struct, spans: list[tuple[int, int]]) -> None:
        self._data = data
        self.fields = fields
        self.spans = spans
        self._chunks: dict[int, Struct] = {}

    def chunk(self, index: int) -> Struct:
        found = self._chunks.get(index)
        if found is None:
            start, end = self.spans[index]
            decoder = _Decoder(self._data)
            decoder.pos = start
            found = decoder.shallow()
            if decoder.pos != end:
                raise ValueError("column chunk span mismatch")
            self._chunks[index] = found
        return found


def _decode_file_metadata(data: bytes) -> tuple[Struct, list[_RowGroup]]:
    """FileMetaData with its row groups apart (field 4, lazily decoded), as `_RowGroup`s."""
    decoder = _Decoder(data)
    meta: Struct = {}
    groups: list[_RowGroup] = []
    for field_id, kind in decoder.headers():
        if field_id == 4 and kind == _T_LIST:
            for _ in range(decoder.list_header(_T_STRUCT)):
                groups.append(_decode_row_group(decoder))
        elif kind in (_T_TRUE, _T_FALSE):
            meta[field_id] = (kind, kind == _T_TRUE)
        else:
            meta[field_id] = (kind, decoder.value(kind, 1))
    if decoder.pos != len(data):
        raise ValueError("bytes after the footer")
    return meta, groups


def _decode_row_group(decoder: _Decoder) -> _RowGroup:
    fields: Struct = {}
    spans: list[tuple[int, int]] = []
    data = decoder.data
    for field_id, kind in decoder.headers(1):
        if field_id == 1 and kind == _T_LIST:
            for _ in range(decoder.list_header(_T_STRUCT)):
                start = decoder.pos
                decoder.pos = _skip_struct(data, start, 3)
                spans.append((start, decoder.pos))
        elif kind in (_T_TRUE, _T_FALSE):
            fields[field_id] = (kind, kind == _T_TRUE)
        else:
            fields[field_id] = (kind, decoder.value(kind, 2))
    return _RowGroup(bytes(data) if isinstance(data, memoryview) else data, fields, spans)


def _skip_struct(data: bytes | memoryview, pos: int, depth: int) -> int:
    """The position after the struct at `pos`, read without building anything."""
    if depth > _MAX_DEPTH:
        raise ValueError("nesting too deep")
    while True:
        header = data[pos]
        pos += 1
        if header == 0:
            return pos
        if not header >> 4:  # long form: the field id follows as a varint
            while data[pos] & 0x80:
                pos += 1
            pos += 1
        kind = header & 0x0F
        if kind > _T_FALSE:
            pos = _skip_value(data, pos, kind, depth)


def _skip_value(data: bytes | memoryview, pos: int, kind: int, depth: int) -> int:
    if kind in (_T_I32, _T_I64, _T_I16):
        while data[pos] & 0x80:
            pos += 1
        return pos + 1
    if kind == _T_BINARY:
        length, pos = _read_varint(data, pos)
        if pos + length > len(data):
            raise ValueError("binary runs past the end")
        return pos + length
    if kind == _T_STRUCT:
        return _skip_struct(data, pos, depth + 1)
    if kind in (_T_LIST, _T_SET):
        if depth > _MAX_DEPTH:
            raise ValueError("nesting too deep")
        header = data[pos]
        pos += 1
        count, element = header >> 4, header & 0x0F
        if count == 15:
            count, pos = _read_varint(data, pos)
        if element in (_T_TRUE, _T_FALSE, _T_BYTE):
            return pos + count
        if count > len(data):
            raise ValueError("list longer than the data")
        for _ in range(count):
            pos = _skip_value(data, pos, element, depth + 1)
        return pos
    if kind == _T_BYTE:
        return pos + 1
    if kind == _T_DOUBLE:
        return pos + 8
    raise ValueError(f"unsupported thrift type {kind}")


def _read_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _varint(value: int, out: bytearray) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _encode_value(kind: int, value: Any, out: bytearray) -> None:
    if type(value) is _Raw:
        out += value
    elif kind in (_T_I32, _T_I64, _T_I16):
        _varint((value << 1) ^ (value >> 63), out)
    elif kind == _T_BINARY:
        _varint(len(value), out)
        out += value
    elif kind == _T_STRUCT:
        _encode_struct(value, out)
    elif kind in (_T_LIST, _T_SET):
        element, items = value
        count = len(items)
        if count < 15:
            out.append((count << 4) | element)
        else:
            out.append(0xF0 | element)
            _varint(count, out)
        if element in (_T_TRUE, _T_FALSE):
            out += bytes(_T_TRUE if item else _T_FALSE for item in items)
        else:
            for item in items:
                _encode_value(element, item, out)
    elif kind == _T_BYTE:
        out.append(value & 0xFF)
    elif kind == _T_DOUBLE:
        out += value
    else:
        raise ValueError(f"unsupported thrift type {kind}")


def _encode_struct(struct_: Struct, out: bytearray) -> None:
    last = 0
    for field_id in sorted(struct_):
        kind, value = struct_[field_id]
        if kind in (_T_TRUE, _T_FALSE):
            kind = _T_TRUE if value else _T_FALSE
        delta = field_id - last
        if 0 < delta <= 15:
            out.append((delta << 4) | kind)
        else:
            out.append(kind)
            _varint((field_id << 1) ^ (field_id >> 63), out)
        last = field_id
        if kind not in (_T_TRUE, _T_FALSE):
            _encode_value(kind, value, out)
    out.append(0)
