"""PME's modules and pages: a module's nonce and sealed bytes, the AAD of a page, a column
chunk decrypted page by page with its pages' headers rewritten for plaintext, and the writes of
the plaintext copy."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ppml.data.pme_thrift import T_I32, Decoder, encode_struct, field, write_varint
from ppml.errors import IntegrityError

__all__ = [
    "COLUMN_META",
    "DATA_PAGE",
    "DATA_PAGE_HEADER",
    "DICT_PAGE",
    "DICT_PAGE_HEADER",
    "FOOTER",
    "NONCE",
    "TAG",
    "Chunk",
    "Writer",
    "decrypt_pages",
    "module_aad",
    "module_parts",
    "open_module",
    "pwrite_all",
    "rewrite_page_header",
]

NONCE = 12
TAG = 16
_LENGTH = 4
_MODULE_OVERHEAD = _LENGTH + NONCE + TAG

# Module types (Parquet Modular Encryption, "AAD suffix").
FOOTER, COLUMN_META, DATA_PAGE, DICT_PAGE = 0, 1, 2, 3
DATA_PAGE_HEADER, DICT_PAGE_HEADER = 4, 5

# Parquet's PageType.
_PAGE_DATA, _PAGE_INDEX, _PAGE_DICTIONARY, _PAGE_DATA_V2 = 0, 1, 2, 3
_PAGE_KINDS = (_PAGE_DATA, _PAGE_DICTIONARY, _PAGE_DATA_V2)


@dataclass(slots=True)
class Chunk:
    parts: list[bytes]
    start: int  # where the encrypted file has the chunk
    size: int
    dictionary_offset: int | None
    data_offset: int


def module_parts(view: memoryview, at: int) -> tuple[memoryview, memoryview, int]:
    """The nonce and sealed bytes of the module at `at`, and the module's length."""
    if at + _MODULE_OVERHEAD > len(view):
        raise IntegrityError()
    length = int.from_bytes(view[at : at + _LENGTH], "little")
    end = at + _LENGTH + length
    if length < NONCE + TAG or end > len(view):
        raise IntegrityError()
    return (
        view[at + _LENGTH : at + _LENGTH + NONCE],
        view[at + _LENGTH + NONCE : end],
        end - at,
    )


def open_module(aesgcm: AESGCM, view: memoryview, at: int, aad: bytes) -> tuple[bytes, int]:
    """The module at `at`, decrypted and authenticated, and its length."""
    nonce, sealed, used = module_parts(view, at)
    try:
        return aesgcm.decrypt(nonce, sealed, aad), used
    except InvalidTag:
        raise IntegrityError() from None


def decrypt_pages(
    view: memoryview,
    start: int,
    dek: bytes,
    rg_col: tuple[bytes, bytes],
    has_dictionary: bool,
    target: memoryview | None,
) -> Chunk:
    """The column chunk in `view` (found at `start` in the file), decrypted page by page with
    its pages' headers rewritten: into `target`, or as parts. `IntegrityError` (no path) for
    anything that does not authenticate or add up."""
    aesgcm = AESGCM(dek)
    size = len(view)
    at = page = written = 0
    parts: list[bytes] = []
    new_dict: int | None = None
    new_data: int | None = None
    while at < size:
        dictionary = at == 0 and has_dictionary
        if dictionary:
            header_aad = module_aad(rg_col, DICT_PAGE_HEADER, None)
            page_aad = module_aad(rg_col, DICT_PAGE, None)
        else:
            if page > 0x7FFF:
                raise IntegrityError()
            header_aad = module_aad(rg_col, DATA_PAGE_HEADER, page)
            page_aad = module_aad(rg_col, DATA_PAGE, page)
            page += 1
        header_plain, used = open_module(aesgcm, view, at, header_aad)
        at += used
        nonce, sealed, used = module_parts(view, at)
        at += used
        body_size = len(sealed) - TAG
        try:
            kind, header = rewrite_page_header(header_plain, used, body_size)
        except (ValueError, IndexError, KeyError, TypeError):
            raise IntegrityError() from None
        if dictionary != (kind == _PAGE_DICTIONARY) or kind not in _PAGE_KINDS:
            raise IntegrityError()
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
            raise IntegrityError() from None
        written += len(header) + body_size
    if at != size or new_data is None:
        raise IntegrityError()
    return Chunk(parts, start, written, new_dict, new_data)


class Writer:
    """Sequential writes to a file object, or to a file descriptor from `pos` on."""

    def __init__(self, out: int | BinaryIO, pos: int = 0) -> None:
        self.pos = pos
        self._out = out

    def write(self, parts: Sequence[bytes | bytearray]) -> None:
        if isinstance(self._out, int):
            pwrite_all(self._out, parts, self.pos)
            self.pos += sum(len(p) for p in parts)
            return
        for part in parts:
            self._out.write(part)
            self.pos += len(part)


def pwrite_all(fd: int, parts: Sequence[bytes | bytearray | memoryview], offset: int) -> None:
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


def module_aad(rg_col: tuple[bytes, bytes], module: int, page: int | None) -> bytes:
    file_aad, ordinals = rg_col
    aad = file_aad + bytes((module,)) + ordinals
    return aad if page is None else aad + page.to_bytes(2, "little")


def rewrite_page_header(plain: bytes, sealed_size: int, size: int) -> tuple[int, bytes]:
    """A decrypted page header with compressed_page_size set to the plaintext size (it held
    the size of the encrypted module) and no CRC (it would be of the encrypted page); the
    header's page type. Writers put fields 1-3 first: those are patched in place."""
    decoder = Decoder(plain)
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
    write_varint(size << 1, encoded)
    encoded += rest
    return values[0], bytes(encoded)


def _rewrite_page_header_slowly(plain: bytes, sealed_size: int, size: int) -> tuple[int, bytes]:
    header = Decoder(plain).struct()
    if field(header, 3, T_I32) != sealed_size:
        raise ValueError("page size does not match its module")
    header[3] = (T_I32, size)
    header.pop(4, None)
    out = bytearray()
    encode_struct(header, out)
    return field(header, 1, T_I32), bytes(out)
