"""Streams of more than one batch are written from a second thread (`_WriteBehind`): the bytes
are the same as written in line, only verified plaintext is ever written, and an error on
either side stops both threads and surfaces in the caller's."""

from __future__ import annotations

import errno
import io
import os
import threading
from typing import BinaryIO

import pytest

from ppml.crypto import stream
from ppml.crypto.envelope import DataKey, WrappedKey
from ppml.crypto.stream import decrypt_stream, encrypt_stream, new_header
from ppml.errors import IntegrityError

DEK = DataKey(bytes(range(32)), WrappedKey("k", 1, b"w" * 60))
SEG = 1024  # a batch (1 MiB) is 1024 segments
BATCH = stream._IO_BATCH_BYTES


class _InLine:
    """`_WriteBehind`'s interface, writing in the caller's thread: the reference."""

    def __init__(self, dst: BinaryIO, size: int, depth: int = 3) -> None:
        self._dst, self._buf = dst, memoryview(bytearray(size))

    def buffer(self) -> memoryview:
        return self._buf

    def write(self, buf: memoryview, n: int) -> None:
        self._dst.write(buf[:n])

    def close(self) -> None:
        pass

    def abandon(self) -> None:
        pass


def _writers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ppml-write-behind"]


@pytest.mark.parametrize("size", [0, 1, BATCH - 1, BATCH, BATCH + 1, 2 * BATCH, 3 * BATCH + 17])
def test_the_bytes_are_those_written_in_line(size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(size)
    header = new_header(DEK, segment_size=SEG)
    behind = io.BytesIO()
    encrypt_stream(io.BytesIO(data), behind, DEK, header=header)
    monkeypatch.setattr(stream, "_WriteBehind", _InLine)
    in_line = io.BytesIO()
    encrypt_stream(io.BytesIO(data), in_line, DEK, header=header)
    assert behind.getvalue() == in_line.getvalue()
    assert len(behind.getvalue()) == header.ciphertext_size(size)
    monkeypatch.undo()
    out = io.BytesIO()
    decrypt_stream(io.BytesIO(behind.getvalue()), out, lambda w: DEK.plaintext)
    assert out.getvalue() == data
    assert _writers() == []


class _FailingSink(io.BytesIO):
    """Fails (disk full) from its `fail_at`-th write on."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.writes = 0
        self.fail_at = fail_at

    def write(self, data: object) -> int:
        self.writes += 1
        if self.writes >= self.fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)  # type: ignore[arg-type]


def test_a_failed_write_surfaces_in_the_caller_and_stops_the_thread() -> None:
    sink = _FailingSink(fail_at=3)  # the header, one batch, then the disk is full
    with pytest.raises(OSError) as info:
        encrypt_stream(io.BytesIO(os.urandom(5 * BATCH)), sink, DEK, segment_size=SEG)
    assert info.value.errno == errno.ENOSPC
    assert sink.writes == 3  # nothing written after the failure
    assert _writers() == []


def test_only_verified_batches_are_written_and_a_bad_one_stops_everything() -> None:
    data = os.urandom(4 * BATCH)
    blob = io.BytesIO()
    encrypt_stream(io.BytesIO(data), blob, DEK, segment_size=SEG)
    _, header_len = stream.read_header(io.BytesIO(blob.getvalue()))
    tampered = bytearray(blob.getvalue())
    batch_ct = (BATCH // SEG) * (SEG + stream.TAG_SIZE)
    tampered[header_len + 2 * batch_ct + 5] ^= 1  # in the third batch
    out = io.BytesIO()
    with pytest.raises(IntegrityError):
        decrypt_stream(io.BytesIO(bytes(tampered)), out, lambda w: DEK.plaintext)
    # Whatever was written is verified plaintext from the start: some of the two batches before
    # the bad one (those not yet written when it failed are dropped), nothing of it or after.
    written = out.getvalue()
    assert written == data[: len(written)] and len(written) in (0, BATCH, 2 * BATCH)
    assert _writers() == []


def test_an_error_in_the_caller_stops_the_thread() -> None:
    def progress(n: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        encrypt_stream(
            io.BytesIO(os.urandom(3 * BATCH)),
            io.BytesIO(),
            DEK,
            segment_size=SEG,
            progress=progress,
        )
    assert _writers() == []
