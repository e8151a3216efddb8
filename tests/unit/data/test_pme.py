"""ppml's own reader of Parquet Modular Encryption (`ppml.data.pme`): plaintext copies equal to
what pyarrow decrypts, keys asked for only when needed, and every altered byte refused."""

from __future__ import annotations

import datetime as dt
import decimal
import io
import os
from collections import Counter
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tests.support import MemoryKeyProvider

from ppml.data.parquet import key_unwrapper, read_parquet, write_parquet
from ppml.data.pme import PMEFile
from ppml.errors import (
    InputNotFound,
    IntegrityError,
    KeyAccessError,
    NotEncrypted,
    UsageError,
)

ROWS = 5_000


def sample(rows: int = ROWS) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(range(rows), pa.int64()),
            "small": pa.array([i % 7 for i in range(rows)], pa.int32()),
            "amount": pa.array(
                [decimal.Decimal(i % 1000) / 100 for i in range(rows)], pa.decimal128(12, 2)
            ),
            "day": pa.array(
                [dt.date(2024, 1, 1) + dt.timedelta(days=i % 365) for i in range(rows)]
            ),
            "at": pa.array(
                [
                    dt.datetime(2024, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=i)
                    for i in range(rows)
                ],
                pa.timestamp("us", tz="UTC"),
            ),
            "name": pa.array([None if i % 11 == 0 else f"name-{i % 300}" for i in range(rows)]),
            "tags": pa.array([[f"t{i % 3}", "x"] if i % 5 else [] for i in range(rows)]),
            "point": pa.array(
                [{"x": float(i), "y": None if i % 2 else -1.5} for i in range(rows)],
                pa.struct([("x", pa.float64()), ("y", pa.float64())]),
            ),
        }
    )


@pytest.fixture
def gate(provider: MemoryKeyProvider) -> MemoryKeyProvider:
    return provider.sharing_keys()


def write(
    path: Path, gate: MemoryKeyProvider, table: pa.Table | None = None, **options: object
) -> Path:
    write_parquet(sample() if table is None else table, path, gate, key_name="sales", **options)
    return path


def plaintext(path: Path, provider: object, columns: list[str] | None = None) -> pa.Table:
    with PMEFile(path, key_unwrapper(provider).unwrap_key) as pme:  # type: ignore[arg-type]
        out = io.BytesIO()
        pme.write_plaintext(out, columns)
    return pq.read_table(pa.BufferReader(out.getvalue()))


LAYOUTS = {
    "defaults": {},
    "many pages and row groups": {"row_group_size": 1_000, "data_page_size": 512},
    "no dictionary, zstd": {"use_dictionary": False, "compression": "zstd"},
    "uncompressed, page v2": {"compression": "none", "data_page_version": "2.0"},
    "page checksums": {"write_page_checksum": True, "row_group_size": 2_000},
    "page index": {"write_page_index": True, "row_group_size": 3_000},
}


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_the_plaintext_copy_holds_exactly_the_table(
    tmp_path: Path, gate: MemoryKeyProvider, layout: str
) -> None:
    path = write(tmp_path / "t.parquet", gate, **LAYOUTS[layout])
    expected = read_parquet(path, gate)
    assert plaintext(path, gate).equals(expected)
    assert plaintext(path, gate, ["name", "id", "point"]).equals(
        expected.select(["id", "name", "point"])
    )


def test_per_column_keys_are_unwrapped_only_for_the_columns_written(
    tmp_path: Path, gate: MemoryKeyProvider
) -> None:
    path = write(tmp_path / "t.parquet", gate, column_keys={"pii": ["name", "amount"]})
    gate.refused.add("pii")
    table = plaintext(path, gate, ["id", "day"])
    assert table.column_names == ["id", "day"]
    assert gate.unwraps == Counter({"sales": 1})
    with pytest.raises(KeyAccessError, match="policy denies pii"):
        plaintext(path, gate, ["id", "name"])
    gate.refused.clear()
    assert plaintext(path, gate).equals(read_parquet(path, gate))


def test_one_unwrap_per_named_key_whatever_the_row_groups(
    tmp_path: Path, gate: MemoryKeyProvider
) -> None:
    path = write(tmp_path / "t.parquet", gate, row_group_size=500, column_keys={"pii": ["name"]})
    gate.unwraps.clear()
    plaintext(path, gate)
    assert gate.unwraps == Counter({"sales": 1, "pii": 1})


def test_duckdb_reads_the_copy_from_a_memory_file(tmp_path: Path, gate: MemoryKeyProvider) -> None:
    from concurrent.futures import ThreadPoolExecutor

    path = write(tmp_path / "t.parquet", gate, row_group_size=700)
    fd = os.memfd_create("pme-test", os.MFD_CLOEXEC)
    try:
        with PMEFile(path, key_unwrapper(gate).unwrap_key) as pme, ThreadPoolExecutor(2) as pool:
            pme.write_plaintext(fd, ["id", "amount", "name"], pool=pool)
        con = duckdb.connect()
        rows = con.sql(
            "SELECT count(*), sum(amount), count(DISTINCT name) "
            f"FROM read_parquet('/proc/self/fd/{fd}') WHERE id % 2 = 0"
        ).fetchall()
        con.close()
    finally:
        os.close(fd)
    expected = sample().filter(pa.compute.equal(pa.compute.bit_wise_and(sample()["id"], 1), 0))
    assert rows == [
        (
            expected.num_rows,
            pa.compute.sum(expected["amount"]).as_py(),
            pa.compute.count_distinct(expected["name"]).as_py(),
        )
    ]


def test_unknown_columns_are_a_usage_error(tmp_path: Path, gate: MemoryKeyProvider) -> None:
    path = write(tmp_path / "t.parquet", gate)
    with pytest.raises(UsageError, match="unknown columns: nope"):
        plaintext(path, gate, ["id", "nope"])


def test_files_that_are_not_encrypted_parquet(tmp_path: Path, gate: MemoryKeyProvider) -> None:
    plain = tmp_path / "plain.parquet"
    pq.write_table(sample(), plain)
    with pytest.raises(NotEncrypted):
        PMEFile(plain, key_unwrapper(gate).unwrap_key)
    other = tmp_path / "other.bin"
    other.write_bytes(b"hello world, not parquet")
    with pytest.raises(UsageError, match="not a Parquet file"):
        PMEFile(other, key_unwrapper(gate).unwrap_key)
    with pytest.raises(InputNotFound):
        PMEFile(tmp_path / "missing.parquet", key_unwrapper(gate).unwrap_key)
    with pytest.raises(UsageError, match="directory"):
        PMEFile(tmp_path, key_unwrapper(gate).unwrap_key)


# --------------------------------------------------------------------------- tampering


def regions(path: Path, gate: MemoryKeyProvider) -> dict[str, int]:
    """Offsets inside each kind of module of the file: a data page, a page header, the
    dictionary page, the footer, the plaintext crypto metadata."""
    with PMEFile(path, key_unwrapper(gate).unwrap_key) as pme:
        column = pme._column_meta(pme._row_groups[0].chunk(0), 0, 0)[0]
        dictionary = column[11][1] if 11 in column else None
        data = column[9][1]
        footer = pme._footer_start
    size = path.stat().st_size
    found = {
        "first page header": (dictionary if dictionary is not None else data) + 20,
        "data page body": data + 80,
        "footer module": size - 8 - 40,
        "crypto metadata": footer + 10,
        "footer length": size - 6,
        "trailing magic": size - 2,
        "leading magic": 1,
    }
    return found


@pytest.mark.parametrize(
    "region",
    [
        "first page header",
        "data page body",
        "footer module",
        "crypto metadata",
        "footer length",
        "trailing magic",
    ],
)
def test_a_flipped_byte_anywhere_is_an_integrity_error(
    tmp_path: Path, gate: MemoryKeyProvider, region: str
) -> None:
    path = write(tmp_path / "t.parquet", gate, table=sample().select(["id", "name"]))
    offset = regions(path, gate)[region]
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises((IntegrityError, UsageError)) as caught:
        plaintext(path, gate)
    if region != "trailing magic":
        assert isinstance(caught.value, IntegrityError)
    assert "integrity check failed" in str(caught.value) or "Parquet" in str(caught.value)


def test_every_byte_of_the_column_data_is_authenticated(
    tmp_path: Path, gate: MemoryKeyProvider
) -> None:
    """Flip one byte at a time across a whole (small) column chunk: every flip is refused."""
    table = pa.table({"v": pa.array(range(50), pa.int64())})
    path = write(tmp_path / "t.parquet", gate, table=table, use_dictionary=False)
    with PMEFile(path, key_unwrapper(gate).unwrap_key) as pme:
        column = pme._column_meta(pme._row_groups[0].chunk(0), 0, 0)[0]
        start, size = column[9][1], column[7][1]
    original = path.read_bytes()
    for offset in range(start, start + size):
        data = bytearray(original)
        data[offset] ^= 0x80
        path.write_bytes(bytes(data))
        with pytest.raises(IntegrityError):
            plaintext(path, gate)


def test_modules_moved_between_row_groups_are_refused(
    tmp_path: Path, gate: MemoryKeyProvider
) -> None:
    """Two row groups whose chunks have the same size: swapping their bytes keeps every
    module's tag valid, but not its AAD (row group ordinal)."""
    table = pa.table({"v": pa.array([1] * 100 + [2] * 100, pa.int64())})
    path = write(tmp_path / "t.parquet", gate, table=table, row_group_size=100)
    with PMEFile(path, key_unwrapper(gate).unwrap_key) as pme:
        a = pme._column_meta(pme._row_groups[0].chunk(0), 0, 0)[0]
        b = pme._column_meta(pme._row_groups[1].chunk(0), 1, 0)[0]
    start_a = a.get(11, a[9])[1]
    start_b = b.get(11, b[9])[1]
    assert a[7][1] == b[7][1]
    data = bytearray(path.read_bytes())
    size = a[7][1]
    chunk_a = bytes(data[start_a : start_a + size])
    data[start_a : start_a + size] = data[start_b : start_b + size]
    data[start_b : start_b + size] = chunk_a
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        plaintext(path, gate)


def test_a_file_from_another_write_cannot_stand_in(tmp_path: Path, gate: MemoryKeyProvider) -> None:
    """The same table written twice under the same named key: a column chunk of one copied
    into the other is refused (each file has its own identifier and data key)."""
    first = write(tmp_path / "a.parquet", gate, table=sample().select(["id"]))
    second = write(tmp_path / "b.parquet", gate, table=sample().select(["id"]))
    with PMEFile(first, key_unwrapper(gate).unwrap_key) as pme:
        column = pme._column_meta(pme._row_groups[0].chunk(0), 0, 0)[0]
    start, size = column.get(11, column[9])[1], column[7][1]
    a, b = bytearray(first.read_bytes()), second.read_bytes()
    assert len(a) == len(b)  # same layout, different ciphertext
    assert a[start : start + size] != b[start : start + size]
    a[start : start + size] = b[start : start + size]
    first.write_bytes(bytes(a))
    with pytest.raises(IntegrityError):
        plaintext(first, gate)


def test_a_truncated_file_is_an_integrity_error(tmp_path: Path, gate: MemoryKeyProvider) -> None:
    path = write(tmp_path / "t.parquet", gate)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 1, 20):
        path.write_bytes(data[:cut])
        with pytest.raises((IntegrityError, UsageError)):
            plaintext(path, gate)


def test_a_wrong_key_version_or_name_in_the_key_material_is_refused(
    tmp_path: Path, gate: MemoryKeyProvider
) -> None:
    """The footer key material names the ppml key; changing it (plaintext, before the
    footer) is caught: the wrapped key then does not open, or the footer does not."""
    path = write(tmp_path / "t.parquet", gate)
    data = path.read_bytes()
    assert data.count(b"ppml1:sales:1:") == 1
    path.write_bytes(data.replace(b"ppml1:sales:1:", b"ppml1:pii::1:"))
    with pytest.raises((IntegrityError, KeyAccessError)):
        plaintext(path, gate)


def test_an_altered_leading_magic_is_an_integrity_error(
    tmp_path: Path, gate: MemoryKeyProvider
) -> None:
    path = write(tmp_path / "t.parquet", gate)
    data = bytearray(path.read_bytes())
    data[1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        plaintext(path, gate)


@pytest.mark.parametrize("what", ["nested lists", "nested key material"])
def test_deeply_nested_metadata_is_refused_cleanly(
    tmp_path: Path, gate: MemoryKeyProvider, what: str
) -> None:
    """Hostile plaintext crypto metadata (before any key is needed): a clear integrity error,
    never a RecursionError."""
    if what == "nested lists":
        # FileCryptoMetaData with field 1 a list of lists of lists ... 200,000 deep.
        crypto = b"\x19" + b"\x19" * 200_000
    else:
        material = b"[" * 200_000
        crypto = b"\x1c\x1c\x00\x00" + b"\x18" + _varint_bytes(len(material)) + material + b"\x00"
    body = b"PARE" + b"\x00" * 16 + crypto
    footer_len = len(crypto)
    path = tmp_path / "evil.parquet"
    path.write_bytes(body + footer_len.to_bytes(4, "little") + b"PARE")
    with pytest.raises(IntegrityError):
        plaintext(path, gate)


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
