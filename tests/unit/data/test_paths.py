"""The path verbs of the data layer: encrypt_path, decrypt_path, describe and rewrap_path."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tests.support import MemoryKeyProvider

from ppml.data import (
    PATH_FORMATS,
    decrypt_path,
    describe,
    detect_file_kind,
    encrypt_path,
    read_stream_header,
    rewrap_path,
)
from ppml.data.kinds import sniff
from ppml.data.tree import data_files, part_files
from ppml.errors import (
    InputNotFound,
    IntegrityError,
    KeyAccessError,
    NotEncrypted,
    OutputExists,
    UsageError,
)

TABLE = pa.table({"id": [1, 2, 3], "name": ["a", "b", "c"]})


class Keys(MemoryKeyProvider):
    """A memory provider that also says which version of a key is the newest."""

    def describe(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(current_version=len(self.keks[name]))


@pytest.fixture
def keys() -> Keys:
    return Keys("sales", "pii")


def opened(keys: Keys) -> contextlib.AbstractContextManager[Keys]:
    return contextlib.nullcontext(keys)


def _hidden(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def _tree(tmp_path: Path) -> Path:
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "a.csv").write_bytes(b"x,y\n1,2\n")
    (src / "sub" / "b.txt").write_bytes(b"hello\n")
    (src / ".hidden").write_bytes(b"not data")
    return src


def test_file_round_trip(tmp_path: Path, keys: Keys) -> None:
    src = tmp_path / "a.csv"
    src.write_bytes(b"x,y\n" + b"1,2\n" * 1000)
    done = encrypt_path(src, tmp_path / "a.ppml", keys, "sales", segment_size=64)
    assert done.files == (src,) and not done.directory
    assert sniff(tmp_path / "a.ppml") == "stream"
    decrypt_path(tmp_path / "a.ppml", tmp_path / "out.csv", keys)
    assert (tmp_path / "out.csv").read_bytes() == src.read_bytes()
    assert _hidden(tmp_path) == []


def test_directory_round_trip_leaves_out_hidden_files_and_links(tmp_path: Path, keys: Keys) -> None:
    src = _tree(tmp_path)
    (src / "link").symlink_to(src / "a.csv")
    seen: list[Path] = []
    done = encrypt_path(src, tmp_path / "enc", keys, "sales", on_links=seen.extend)
    assert done.directory and done.files == (src / "a.csv", src / "sub" / "b.txt")
    assert seen == [src / "link"] and done.links == (src / "link",)
    assert sorted(p.name for p in (tmp_path / "enc").rglob("*")) == ["a.csv", "b.txt", "sub"]
    decrypt_path(tmp_path / "enc", tmp_path / "dec", keys)
    assert (tmp_path / "dec" / "sub" / "b.txt").read_bytes() == b"hello\n"
    assert _hidden(tmp_path) == []


def test_parquet_round_trip_and_formats(tmp_path: Path, keys: Keys) -> None:
    src = tmp_path / "t.parquet"
    pq.write_table(TABLE, src)
    encrypt_path(src, tmp_path / "t.enc", keys, "sales", column_keys={"pii": ["name"]})
    assert sniff(tmp_path / "t.enc") == "encrypted-parquet"
    assert detect_file_kind(tmp_path / "t.enc") == "parquet"
    decrypt_path(tmp_path / "t.enc", tmp_path / "t.out", keys)
    assert pq.read_table(tmp_path / "t.out").equals(TABLE)
    # --format bytes: the streaming format, whatever the file is
    encrypt_path(src, tmp_path / "t.bytes", keys, "sales", format="bytes")
    assert read_stream_header(tmp_path / "t.bytes")[0].content_type.name == "BYTES"
    assert "auto" in PATH_FORMATS
    with pytest.raises(UsageError, match="unknown format"):
        encrypt_path(src, tmp_path / "x", keys, "sales", format="xml")
    with pytest.raises(UsageError, match="Parquet only"):
        encrypt_path(
            tmp_path / "t.out",
            tmp_path / "y",
            keys,
            "sales",
            format="text",
            column_keys={"pii": ["name"]},
        )


def test_progress_gets_the_total_and_every_byte(tmp_path: Path, keys: Keys) -> None:
    src = _tree(tmp_path)
    totals: list[int] = []
    done: list[int] = []

    def start(total: int) -> object:
        totals.append(total)
        return done.append

    encrypt_path(src, tmp_path / "enc", keys, "sales", progress=start)  # type: ignore[arg-type]
    assert totals == [len(b"x,y\n1,2\n") + len(b"hello\n")] and sum(done) == totals[0]


def test_wrong_key_refused_and_nothing_written(tmp_path: Path, keys: Keys) -> None:
    src = tmp_path / "a.txt"
    src.write_bytes(b"secret\n")
    encrypt_path(src, tmp_path / "a.ppml", keys, "sales")
    with pytest.raises((IntegrityError, KeyAccessError)):
        decrypt_path(tmp_path / "a.ppml", tmp_path / "out", Keys("sales"))
    assert not (tmp_path / "out").exists() and _hidden(tmp_path) == []
    with pytest.raises(KeyAccessError):
        encrypt_path(src, tmp_path / "b.ppml", keys, "no-such-key")
    assert not (tmp_path / "b.ppml").exists()


def test_tampered_file_in_a_directory_leaves_no_plaintext(tmp_path: Path, keys: Keys) -> None:
    src = _tree(tmp_path)
    encrypt_path(src, tmp_path / "enc", keys, "sales", segment_size=16)
    victim = tmp_path / "enc" / "sub" / "b.txt"
    blob = bytearray(victim.read_bytes())
    blob[-1] ^= 1
    victim.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError) as info:
        decrypt_path(tmp_path / "enc", tmp_path / "dec", keys)
    assert info.value.path == str(victim)
    assert not (tmp_path / "dec").exists() and _hidden(tmp_path) == []


def test_existing_output_is_replaced_only_when_asked(tmp_path: Path, keys: Keys) -> None:
    src = tmp_path / "a.txt"
    src.write_bytes(b"new\n")
    (tmp_path / "out").write_bytes(b"old")
    with pytest.raises(OutputExists):
        encrypt_path(src, tmp_path / "out", keys, "sales")
    assert (tmp_path / "out").read_bytes() == b"old"
    encrypt_path(src, tmp_path / "out", keys, "sales", overwrite=True)
    (tmp_path / "dec").write_bytes(b"old")
    with pytest.raises(OutputExists):
        decrypt_path(tmp_path / "out", tmp_path / "dec", keys)
    assert (tmp_path / "dec").read_bytes() == b"old"
    decrypt_path(tmp_path / "out", tmp_path / "dec", keys, overwrite=True)
    assert (tmp_path / "dec").read_bytes() == b"new\n"
    pq.write_table(TABLE, tmp_path / "t.parquet")
    with pytest.raises(OutputExists):
        encrypt_path(tmp_path / "t.parquet", tmp_path / "dec", keys, "sales")
    (tmp_path / "d").mkdir()
    with pytest.raises(OutputExists):
        encrypt_path(_tree(tmp_path), tmp_path / "d", keys, "sales")


def test_missing_input(tmp_path: Path, keys: Keys) -> None:
    with pytest.raises(InputNotFound):
        encrypt_path(tmp_path / "nope", tmp_path / "x", keys, "sales")
    with pytest.raises(InputNotFound):
        decrypt_path(tmp_path / "nope", tmp_path / "x", keys)
    with pytest.raises(InputNotFound):
        describe(tmp_path / "nope")


def test_describe(tmp_path: Path, keys: Keys) -> None:
    src = tmp_path / "a.csv"
    src.write_bytes(b"x\n" * 100)
    encrypt_path(src, tmp_path / "a.ppml", keys, "sales", segment_size=64)
    info = describe(tmp_path / "a.ppml")
    assert info["key_name"] == "sales" and info["key_version"] == 1
    assert info["content_type"] == "csv" and info["segments"] == 4
    assert info["plaintext_bytes"] == 200
    pq.write_table(TABLE, tmp_path / "t.parquet")
    with pytest.raises(NotEncrypted, match="plaintext Parquet"):
        describe(tmp_path / "t.parquet")
    encrypt_path(tmp_path / "t.parquet", tmp_path / "t.enc", keys, "pii")
    assert describe(tmp_path / "t.enc")["key_name"] == "pii"
    with pytest.raises(NotEncrypted):
        describe(src)
    with pytest.raises(UsageError, match="is a directory"):
        describe(tmp_path)


def test_rewrap_path(tmp_path: Path, keys: Keys) -> None:
    src = _tree(tmp_path)
    pq.write_table(TABLE, src / "t.parquet")
    encrypt_path(src, tmp_path / "enc", keys, "sales")
    (tmp_path / "enc" / "notes.md").write_bytes(b"plaintext beside")
    body = _body(tmp_path / "enc" / "a.csv")
    keys.rotate("sales")
    opens: list[int] = []

    @contextlib.contextmanager
    def open_keys() -> Iterator[Keys]:
        opens.append(1)
        yield keys

    results = list(rewrap_path(tmp_path / "enc", open_keys))
    assert opens == [1]
    by_name = {r.path.name: r for r in results}
    assert by_name["a.csv"].changed and by_name["a.csv"].new_version == 2
    assert not by_name["a.csv"].reencrypted
    assert by_name["t.parquet"].reencrypted and by_name["t.parquet"].new_version == 2
    assert by_name["notes.md"].kind == "plain" and not by_name["notes.md"].changed
    assert _body(tmp_path / "enc" / "a.csv") == body  # the data is not re-encrypted
    decrypt_path(tmp_path / "enc" / "t.parquet", tmp_path / "t.out", keys)
    assert pq.read_table(tmp_path / "t.out").equals(TABLE)
    again = list(rewrap_path([tmp_path / "enc" / "a.csv"], lambda: opened(keys)))
    assert not again[0].changed and again[0].old_version == 2


def test_rewrap_path_checks_every_path_before_opening_keys(tmp_path: Path, keys: Keys) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"hello")

    def never() -> contextlib.AbstractContextManager[Keys]:
        raise AssertionError("keys opened")

    with pytest.raises(NotEncrypted):
        rewrap_path([plain], never)
    with pytest.raises(InputNotFound):
        rewrap_path([tmp_path / "nope"], never)


def test_one_walker(tmp_path: Path) -> None:
    src = _tree(tmp_path)
    (src / "_SUCCESS").write_bytes(b"")
    (src / "_tmp").mkdir()
    (src / "_tmp" / "c.csv").write_bytes(b"1\n")
    os.symlink(src / "sub", src / "dirlink")
    os.symlink(src / "a.csv", src / "filelink")
    found = data_files(src)
    assert [p.relative_to(src).as_posix() for p in found.files] == [
        "_SUCCESS",
        "_tmp/c.csv",
        "a.csv",
        "sub/b.txt",
    ]
    assert found.links == (src / "dirlink", src / "filelink")
    assert [p.relative_to(src).as_posix() for p in part_files(src)] == [
        "a.csv",
        "filelink",
        "sub/b.txt",
    ]
    assert part_files(src / "a.csv") == [src / "a.csv"]
    with pytest.raises(UsageError, match="no data files"):
        part_files(_empty(tmp_path))


def _empty(tmp_path: Path) -> Path:
    d = tmp_path / "empty"
    (d / ".git").mkdir(parents=True)
    (d / ".git" / "x").write_bytes(b"")
    return d


def _body(path: Path) -> bytes:
    return path.read_bytes()[read_stream_header(path)[1] :]
