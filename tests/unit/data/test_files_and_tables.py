"""Encrypted files and tables through the data layer (with an in-memory key provider)."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
from tests.support import MemoryKeyProvider, locked_directory

from ppml._internal import fs
from ppml.crypto.envelope import DataKey
from ppml.crypto.stream import ContentType
from ppml.data import (
    decrypt_file,
    encrypt_file,
    open_encrypted,
    output_directory,
    read_pandas,
    read_polars,
    read_stream_header,
    read_table,
    rewrap_file,
    write_pandas,
    write_polars,
    write_table,
)
from ppml.errors import (
    InputNotFound,
    IntegrityError,
    KeyNotFound,
    NotEncrypted,
    OutputExists,
    UsageError,
)

PEOPLE = pa.table(
    {
        "name": ["Michael", "Andy", "Justin"],
        "age": pa.array([None, 30, 19], type=pa.int64()),
    }
)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_encrypt_decrypt_file_round_trip(tmp_path: Path, provider: MemoryKeyProvider) -> None:
    src = tmp_path / "people.csv"
    src.write_bytes(b"name,age\nMichael,\nAndy,30\n")
    enc = tmp_path / "people.csv.ppml"
    header = encrypt_file(src, enc, provider, "sales", segment_size=16)
    assert header.content_type is ContentType.CSV
    assert header.key_name == "sales"
    assert b"Michael" not in enc.read_bytes()
    assert oct(enc.stat().st_mode & 0o777) == "0o600"
    out = tmp_path / "out.csv"
    decrypt_file(enc, out, provider)
    assert out.read_bytes() == src.read_bytes()
    assert _leftovers(tmp_path) == []


def test_decrypt_tampered_file_leaves_no_output(
    tmp_path: Path, provider: MemoryKeyProvider
) -> None:
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(1000))
    enc = tmp_path / "a.enc"
    encrypt_file(src, enc, provider, "sales", segment_size=64)
    blob = bytearray(enc.read_bytes())
    blob[-1] ^= 1  # only the LAST segment is bad: earlier ones verify and are written first
    enc.write_bytes(bytes(blob))
    out = tmp_path / "a.out"
    with pytest.raises(IntegrityError) as info:
        decrypt_file(enc, out, provider)
    assert info.value.path == str(enc)
    assert info.value.diagnostics() == f"{enc}: integrity error: integrity check failed"
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_bad_inputs_are_clear(tmp_path: Path, provider: MemoryKeyProvider) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("hello")
    with pytest.raises(InputNotFound):
        encrypt_file(tmp_path / "missing", tmp_path / "x", provider, "sales")
    with pytest.raises(UsageError, match="is a directory"):
        encrypt_file(tmp_path, tmp_path / "x", provider, "sales")
    with pytest.raises(NotEncrypted):
        decrypt_file(plain, tmp_path / "y", provider)
    with pytest.raises(KeyNotFound):
        encrypt_file(plain, tmp_path / "z", provider, "nope")
    with pytest.raises(UsageError, match="does not exist"):
        encrypt_file(plain, tmp_path / "no" / "dir" / "z", provider, "sales")
    existing = tmp_path / "exists"
    existing.write_text("keep me")
    with pytest.raises(OutputExists):
        encrypt_file(plain, existing, provider, "sales")
    assert existing.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "plain.txt"]


def test_unwritable_output_directory(tmp_path: Path, provider: MemoryKeyProvider) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("hello")
    with (
        locked_directory(tmp_path / "locked") as locked,
        pytest.raises(UsageError, match=r"(?i)permission denied|not permitted") as info,
    ):
        encrypt_file(plain, locked / "x", provider, "sales")
    assert "locked" in info.value.diagnostics()
    assert list((tmp_path / "locked").iterdir()) == []


def test_rewrap_after_rotation_keeps_body(tmp_path: Path, provider: MemoryKeyProvider) -> None:
    src = tmp_path / "data.bin"
    src.write_bytes(os.urandom(300))
    enc = tmp_path / "data.enc"
    encrypt_file(src, enc, provider, "sales", segment_size=64)
    before, hlen_before = read_stream_header(enc)
    body = enc.read_bytes()[hlen_before:]
    provider.rotate("sales")
    old, new = rewrap_file(enc, provider.rewrap)
    assert (old.version, new.version) == (1, 2)
    after, hlen_after = read_stream_header(enc)
    assert after.wrapped.version == 2
    assert enc.read_bytes()[hlen_after:] == body
    assert after.immutable_bytes() == before.immutable_bytes()
    out = tmp_path / "data.out"
    decrypt_file(enc, out, provider)
    assert out.read_bytes() == src.read_bytes()
    # Already current: nothing changes.
    old2, new2 = rewrap_file(enc, provider.rewrap)
    assert old2 == new2


def test_open_encrypted_random_access(tmp_path: Path, provider: MemoryKeyProvider) -> None:
    data = os.urandom(5000)
    src = tmp_path / "r.bin"
    src.write_bytes(data)
    enc = tmp_path / "r.enc"
    encrypt_file(src, enc, provider, "sales", segment_size=128)
    with open_encrypted(enc, provider) as reader:
        reader.seek(4000)
        assert reader.read(500) == data[4000:4500]


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_table_round_trip(tmp_path: Path, provider: MemoryKeyProvider, fmt: str) -> None:
    table = pa.table(
        {
            "name": ["Michael", "Andy", "Justin"],
            "age": pa.array([None, 30, 19], type=pa.int64()),
            "score": [1.5, 2.25, None],
            "when": pa.array(
                [dt.datetime(2024, 1, 1, 12), None, dt.datetime(2025, 6, 30)],
                type=pa.timestamp("s"),
            ),
        }
    )
    path = tmp_path / f"people.{fmt}"
    write_table(table, path, provider, key_name="sales", segment_size=32)
    assert b"Justin" not in path.read_bytes()
    back = read_table(path, provider)
    assert back.column("name").to_pylist() == ["Michael", "Andy", "Justin"]
    assert back.column("age").to_pylist() == [None, 30, 19]
    assert back.column("score").to_pylist() == [1.5, 2.25, None]
    assert read_table(path, provider, columns=["age"]).column_names == ["age"]


def test_text_tables(tmp_path: Path, provider: MemoryKeyProvider) -> None:
    path = tmp_path / "lines.txt"
    write_table(
        pa.table({"value": ["to be", "or not", "", "to be"]}), path, provider, key_name="sales"
    )
    assert read_table(path, provider).column("value").to_pylist() == [
        "to be",
        "or not",
        "",
        "to be",
    ]
    with pytest.raises(UsageError, match="one string column"):
        write_table(PEOPLE, tmp_path / "bad.txt", provider, key_name="sales")
    assert not (tmp_path / "bad.txt").exists()


def test_pandas_and_polars(tmp_path: Path, provider: MemoryKeyProvider) -> None:
    df = pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    write_pandas(df, tmp_path / "d.csv", provider, key_name="sales")
    assert read_pandas(tmp_path / "d.csv", provider).equals(df)
    pdf = pl.DataFrame({"a": [1, 2], "b": ["u", "v"]})
    write_polars(pdf, tmp_path / "p.json", provider, key_name="sales")
    assert read_polars(tmp_path / "p.json", provider).equals(pdf)


def test_directory_of_parts_mixing_encrypted_and_plain(
    tmp_path: Path, provider: MemoryKeyProvider
) -> None:
    parts = tmp_path / "parts"
    parts.mkdir()
    write_table(PEOPLE.slice(0, 2), parts / "part-0.csv", provider, key_name="sales")
    (parts / "part-1.csv").write_text("name,age\nJustin,19\n")
    (parts / "_SUCCESS").write_text("")
    table = read_table(parts, provider)
    assert sorted(table.column("name").to_pylist()) == ["Andy", "Justin", "Michael"]


def test_bytes_file_is_not_a_table(tmp_path: Path, provider: MemoryKeyProvider) -> None:
    src = tmp_path / "blob.bin"
    src.write_bytes(b"\x00\x01")
    encrypt_file(src, tmp_path / "blob.enc", provider, "sales")
    with pytest.raises(UsageError, match="raw bytes"):
        read_table(tmp_path / "blob.enc", provider)


def test_output_directory_is_atomic(tmp_path: Path) -> None:
    dst = tmp_path / "out"
    with pytest.raises(RuntimeError), output_directory(dst) as tmp:
        (tmp / "a").write_text("partial")
        raise RuntimeError("boom")
    assert not dst.exists()
    assert list(tmp_path.iterdir()) == []
    with output_directory(dst) as tmp:
        (tmp / "a").write_text("done")
    assert (dst / "a").read_text() == "done"
    with pytest.raises(OutputExists), output_directory(dst):
        pass


def _tmpfs_dir() -> Path:
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no /dev/shm here")
    fd = os.open(shm, os.O_RDONLY)
    try:
        if not fs.in_memory_file_system(fd):
            pytest.skip("/dev/shm is not a tmpfs here")
    finally:
        os.close(fd)
    return shm


def test_outputs_are_reserved_before_the_key_is_asked_for_but_not_on_tmpfs(
    tmp_path: Path, provider: MemoryKeyProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_fallocate = os.posix_fallocate
    real_generate = provider.generate_data_key

    def fallocate(fd: int, offset: int, length: int) -> None:
        calls.append("reserve")
        real_fallocate(fd, offset, length)

    def generate(name: str) -> DataKey:
        calls.append("key")
        return real_generate(name)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    monkeypatch.setattr(provider, "generate_data_key", generate)
    data = os.urandom(3000)
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    fd = os.open(tmp_path, os.O_RDONLY)
    disk = not fs.in_memory_file_system(fd)
    os.close(fd)
    encrypt_file(src, tmp_path / "out.ppml", provider, "sales", segment_size=1000)
    # Reserved first (a key provider still being opened does so meanwhile), then trimmed.
    assert calls == (["reserve", "key"] if disk else ["key"])
    enc = (tmp_path / "out.ppml").read_bytes()
    header, header_len = read_stream_header(tmp_path / "out.ppml")
    assert len(enc) == header.ciphertext_size(len(data)) == header_len + 3000 + 3 * 16

    shm = _tmpfs_dir()
    calls.clear()
    out = shm / f"ppml-test-{os.getpid()}.bin"
    try:
        decrypt_file(tmp_path / "out.ppml", out, provider)
        assert out.read_bytes() == data
    finally:
        out.unlink(missing_ok=True)
    assert "reserve" not in calls  # tmpfs: reserving pages costs more than it saves
