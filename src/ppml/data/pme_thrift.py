"""The Thrift compact protocol, as far as Parquet's metadata needs it: decode a struct (lazily
where a copy passes values through), and encode one back."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

__all__ = [
    "MAX_DEPTH",
    "T_BINARY",
    "T_BYTE",
    "T_DOUBLE",
    "T_FALSE",
    "T_I16",
    "T_I32",
    "T_I64",
    "T_LIST",
    "T_SET",
    "T_STRUCT",
    "T_TRUE",
    "Decoder",
    "Raw",
    "RowGroup",
    "Struct",
    "decode_file_metadata",
    "encode_struct",
    "field",
    "optional",
    "write_varint",
]

# Thrift compact protocol types.
T_TRUE, T_FALSE, T_BYTE, T_I16, T_I32, T_I64, T_DOUBLE = 1, 2, 3, 4, 5, 6, 7
T_BINARY, T_LIST, T_SET, T_STRUCT = 8, 9, 10, 12
MAX_DEPTH = 32

Struct = dict[int, tuple[int, Any]]
"""A decoded Thrift struct: field id -> (compact type, value)."""


class Raw(bytes):
    """A struct or list value kept as its encoded bytes: decoded only if looked into, written
    back as it was (statistics, encodings, paths: what a plaintext copy passes through)."""

    __slots__ = ()


def field(struct_: Struct, field_id: int, kind: int) -> Any:
    found_kind, value = struct_[field_id]
    if found_kind != kind and not (kind in (T_TRUE, T_FALSE) and found_kind in (1, 2)):
        raise TypeError(f"field {field_id} has type {found_kind}, not {kind}")
    return value


def optional(struct_: Struct, field_id: int, kind: int) -> Any:
    if field_id not in struct_:
        return None
    return field(struct_, field_id, kind)


class Decoder:
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
        if kind in (T_I32, T_I64, T_I16):
            zigzag = self.varint()
            return (zigzag >> 1) ^ -(zigzag & 1)
        if kind == T_BINARY:
            length = self.varint()
            end = self.pos + length
            if end > len(self.data):
                raise ValueError("binary runs past the end")
            value = bytes(self.data[self.pos : end])
            self.pos = end
            return value
        if kind == T_STRUCT:
            return self.struct(depth + 1)
        if kind in (T_LIST, T_SET):
            if depth > MAX_DEPTH:
                raise ValueError("nesting too deep")
            header = self.data[self.pos]
            self.pos += 1
            count, element = header >> 4, header & 0x0F
            if count == 15:
                count = self.varint()
            if count > len(self.data):
                raise ValueError("list longer than the data")
            if element in (T_TRUE, T_FALSE):
                items = [self.data[self.pos + i] == T_TRUE for i in range(count)]
                self.pos += count
                return (element, items)
            return (element, [self.value(element, depth + 1) for _ in range(count)])
        if kind == T_BYTE:
            byte = self.data[self.pos]
            self.pos += 1
            return byte
        if kind == T_DOUBLE:
            raw = bytes(self.data[self.pos : self.pos + 8])
            if len(raw) != 8:
                raise ValueError("double runs past the end")
            self.pos += 8
            return raw
        raise ValueError(f"unsupported thrift type {kind}")

    def headers(self, depth: int = 0) -> Iterator[tuple[int, int]]:
        """(field id, type) of each field of the struct here; the caller reads each value."""
        if depth > MAX_DEPTH:
            raise ValueError("nesting too deep")
        field_id = 0
        while True:
            header = self.data[self.pos]
            self.pos += 1
            if header == 0:
                return
            field_id = self._field_id(header, field_id)
            yield field_id, header & 0x0F

    def _field_id(self, header: int, last: int) -> int:
        """The id of the field whose header byte is `header`, the field before it being `last`:
        a delta in the header, or (long form) the id itself as a zigzag varint after it."""
        delta = header >> 4
        if delta:
            return last + delta
        zigzag = self.varint()
        return (zigzag >> 1) ^ -(zigzag & 1)

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
        """The struct here with its struct and list values left encoded (`Raw`)."""
        out: Struct = {}
        data = self.data
        for field_id, kind in self.headers(1):
            if kind in (T_TRUE, T_FALSE):
                out[field_id] = (kind, kind == T_TRUE)
            elif kind in (T_STRUCT, T_LIST, T_SET):
                start = self.pos
                self.pos = _skip_value(data, start, kind, 1)
                out[field_id] = (kind, Raw(data[start : self.pos]))
            else:
                out[field_id] = (kind, self.value(kind, 1))
        return out

    def struct(self, depth: int = 0) -> Struct:
        if depth > MAX_DEPTH:
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
            field_id = self._field_id(header, field_id)
            if kind in (T_TRUE, T_FALSE):
                out[field_id] = (kind, kind == T_TRUE)
            else:
                out[field_id] = (kind, self.value(kind, depth))


class RowGroup:
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
            decoder = Decoder(self._data)
            decoder.pos = start
            found = decoder.shallow()
            if decoder.pos != end:
                raise ValueError("column chunk span mismatch")
            self._chunks[index] = found
        return found


def decode_file_metadata(data: bytes) -> tuple[Struct, list[RowGroup]]:
    """FileMetaData with its row groups apart (field 4, lazily decoded), as `RowGroup`s."""
    decoder = Decoder(data)
    meta: Struct = {}
    groups: list[RowGroup] = []
    for field_id, kind in decoder.headers():
        if field_id == 4 and kind == T_LIST:
            for _ in range(decoder.list_header(T_STRUCT)):
                groups.append(_decode_row_group(decoder))
        elif kind in (T_TRUE, T_FALSE):
            meta[field_id] = (kind, kind == T_TRUE)
        else:
            meta[field_id] = (kind, decoder.value(kind, 1))
    if decoder.pos != len(data):
        raise ValueError("bytes after the footer")
    return meta, groups


def _decode_row_group(decoder: Decoder) -> RowGroup:
    fields: Struct = {}
    spans: list[tuple[int, int]] = []
    data = decoder.data
    for field_id, kind in decoder.headers(1):
        if field_id == 1 and kind == T_LIST:
            for _ in range(decoder.list_header(T_STRUCT)):
                start = decoder.pos
                decoder.pos = _skip_struct(data, start, 3)
                spans.append((start, decoder.pos))
        elif kind in (T_TRUE, T_FALSE):
            fields[field_id] = (kind, kind == T_TRUE)
        else:
            fields[field_id] = (kind, decoder.value(kind, 2))
    return RowGroup(bytes(data) if isinstance(data, memoryview) else data, fields, spans)


def _skip_struct(data: bytes | memoryview, pos: int, depth: int) -> int:
    """The position after the struct at `pos`, read without building anything."""
    if depth > MAX_DEPTH:
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
        if kind > T_FALSE:
            pos = _skip_value(data, pos, kind, depth)


def _skip_value(data: bytes | memoryview, pos: int, kind: int, depth: int) -> int:
    if kind in (T_I32, T_I64, T_I16):
        while data[pos] & 0x80:
            pos += 1
        return pos + 1
    if kind == T_BINARY:
        length, pos = _read_varint(data, pos)
        if pos + length > len(data):
            raise ValueError("binary runs past the end")
        return pos + length
    if kind == T_STRUCT:
        return _skip_struct(data, pos, depth + 1)
    if kind in (T_LIST, T_SET):
        if depth > MAX_DEPTH:
            raise ValueError("nesting too deep")
        header = data[pos]
        pos += 1
        count, element = header >> 4, header & 0x0F
        if count == 15:
            count, pos = _read_varint(data, pos)
        if element in (T_TRUE, T_FALSE, T_BYTE):
            return pos + count
        if count > len(data):
            raise ValueError("list longer than the data")
        for _ in range(count):
            pos = _skip_value(data, pos, element, depth + 1)
        return pos
    if kind == T_BYTE:
        return pos + 1
    if kind == T_DOUBLE:
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


def write_varint(value: int, out: bytearray) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _encode_value(kind: int, value: Any, out: bytearray) -> None:
    if type(value) is Raw:
        out += value
    elif kind in (T_I32, T_I64, T_I16):
        write_varint((value << 1) ^ (value >> 63), out)
    elif kind == T_BINARY:
        write_varint(len(value), out)
        out += value
    elif kind == T_STRUCT:
        encode_struct(value, out)
    elif kind in (T_LIST, T_SET):
        element, items = value
        count = len(items)
        if count < 15:
            out.append((count << 4) | element)
        else:
            out.append(0xF0 | element)
            write_varint(count, out)
        if element in (T_TRUE, T_FALSE):
            out += bytes(T_TRUE if item else T_FALSE for item in items)
        else:
            for item in items:
                _encode_value(element, item, out)
    elif kind == T_BYTE:
        out.append(value & 0xFF)
    elif kind == T_DOUBLE:
        out += value
    else:
        raise ValueError(f"unsupported thrift type {kind}")


def encode_struct(struct_: Struct, out: bytearray) -> None:
    last = 0
    for field_id in sorted(struct_):
        kind, value = struct_[field_id]
        if kind in (T_TRUE, T_FALSE):
            kind = T_TRUE if value else T_FALSE
        delta = field_id - last
        if 0 < delta <= 15:
            out.append((delta << 4) | kind)
        else:
            out.append(kind)
            write_varint((field_id << 1) ^ (field_id >> 63), out)
        last = field_id
        if kind not in (T_TRUE, T_FALSE):
            _encode_value(kind, value, out)
    out.append(0)
