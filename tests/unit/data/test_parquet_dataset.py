"""Encrypted Parquet as lazy pyarrow datasets (ParquetScanSession), the KMS client's key cache,
and the integer layout of decimals."""

from __future__ import annotations

import decimal
import threading
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from tests.support import MemoryKeyProvider

from ppml.data.parquet import (
    ParquetScanSession,
    _PPMLKmsClient,
    encrypt_parquet_file,
    read_parquet,
    write_parquet,
)
from ppml.errors import IntegrityError, KeyAccessError, NotEncrypted

ROWS = 2_000


def table() -> pa.Table:
    return pa.table(
        {
            "id": pa.array(range(ROWS), pa.int64()),
            "city": pa.array([("Paris", "Rome", "Oslo")[i % 3] for i in range(ROWS)]),
            "amount": pa.array(
                [decimal.Decimal(i) / 100 for i in range(ROWS)], pa.decimal128(12, 2)
            ),
            "ssn": pa.array([f"ssn-{i:06d}" for i in range(ROWS)]),
        }
    )


@pytest.fixture
def counting(provider: MemoryKeyProvider) -> MemoryKeyProvider:
    """Counts unwraps per key name, can refuse some names, and is slow enough that
    concurrent callers would overlap."""
    counting = provider.sharing_keys()
    counting.delay_s = 0.005
    return counting


@pytest.fixture
def parts(tmp_path: Path, counting: MemoryKeyProvider) -> list[Path]:
    paths = []
    for index in range(3):
        path = tmp_path / f"part-{index}.parquet"
        write_parquet(
            table(),
            path,
            counting,
            key_name="sales",
            column_keys={"pii": ["ssn"]},
            row_group_size=100,  # 20 row groups per file
        )
        paths.append(path)
    return paths


def test_dataset_scan_equals_read_parquet(parts: list[Path], counting: MemoryKeyProvider) -> None:
    with ParquetScanSession(counting) as session:
        dataset = session.dataset(parts)
        got = dataset.to_table(columns=["id", "city", "amount"])
    expected = pa.concat_tables(
        [read_parquet(p, counting, columns=["id", "city", "amount"]) for p in parts]
    )
    assert got.sort_by("id").equals(expected.sort_by("id"))
    assert b"ppml.keys" not in (dataset.schema.metadata or {})


def test_one_unwrap_per_named_key_and_file(parts: list[Path], counting: MemoryKeyProvider) -> None:
    counting.unwraps.clear()
    with ParquetScanSession(counting) as session:
        dataset = session.dataset(parts)
        for _ in range(2):  # two scans, many row groups, many threads
            result = dataset.to_table(
                columns=["id", "ssn", "amount"], filter=pc.field("id") >= 10, use_threads=True
            )
            assert result.num_rows == 3 * (ROWS - 10)
    assert counting.unwraps == Counter({"sales": 3, "pii": 3})


def test_only_scanned_columns_need_their_keys(
    parts: list[Path], counting: MemoryKeyProvider
) -> None:
    counting.refused.add("pii")
    with ParquetScanSession(counting) as session:
        dataset = session.dataset(parts)
        assert dataset.to_table(columns=["id", "city"]).num_rows == 3 * ROWS
        assert session.failure is None
        with pytest.raises((OSError, pa.ArrowException, KeyAccessError)):
            dataset.to_table(columns=["ssn"])
        assert isinstance(session.failure, KeyAccessError)
        with pytest.raises(KeyAccessError) as info:
            session.verify(parts[:1], columns=["ssn"])
        assert info.value.path == str(parts[0])


def test_the_kms_client_unwraps_each_key_once_under_concurrency(
    tmp_path: Path, counting: MemoryKeyProvider
) -> None:
    client = _PPMLKmsClient(counting)
    wrapped = client.wrap_key(b"k" * 32, "sales")
    results: list[bytes] = []
    barrier = threading.Barrier(16)

    def worker() -> None:
        barrier.wait()
        results.append(client.unwrap_key(wrapped, "sales"))

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [b"k" * 32] * 16
    assert counting.unwraps == Counter({"sales": 1})
    client.forget()
    assert client.unwrap_key(wrapped, "sales") == b"k" * 32
    assert counting.unwraps == Counter({"sales": 2})


def test_a_refused_key_is_not_cached(counting: MemoryKeyProvider) -> None:
    client = _PPMLKmsClient(counting)
    wrapped = client.wrap_key(b"k" * 32, "sales")
    counting.refused.add("sales")
    for _ in range(2):
        with pytest.raises(KeyAccessError):
            client.unwrap_key(wrapped, "sales")
    assert counting.unwraps == Counter({"sales": 2})


def test_tampered_part_is_an_integrity_error(
    parts: list[Path], counting: MemoryKeyProvider
) -> None:
    data = bytearray(parts[1].read_bytes())
    data[len(data) // 2] ^= 0x01
    parts[1].write_bytes(bytes(data))
    with ParquetScanSession(counting) as session:
        dataset = session.dataset(parts)
        with pytest.raises((OSError, pa.ArrowException)):
            dataset.to_table()
        session.verify(parts[:1])
        with pytest.raises(IntegrityError) as info:
            session.verify(parts)
    assert info.value.path == str(parts[1])
    assert info.value.message == "integrity check failed"


def test_tampered_footer_fails_when_the_dataset_is_made(
    parts: list[Path], counting: MemoryKeyProvider
) -> None:
    data = bytearray(parts[0].read_bytes())
    data[-40] ^= 0x01
    parts[0].write_bytes(bytes(data))
    with ParquetScanSession(counting) as session, pytest.raises(IntegrityError) as info:
        session.dataset(parts)
    assert info.value.path == str(parts[0])


def test_plaintext_parquet_is_refused(tmp_path: Path, counting: MemoryKeyProvider) -> None:
    plain = tmp_path / "plain.parquet"
    pq.write_table(table(), plain)
    with ParquetScanSession(counting) as session, pytest.raises(NotEncrypted):
        session.dataset([plain])


def _decimal_physical_type(path: Path, provider: object) -> str:
    from ppml.data import parquet as module

    session = module._KeySession(provider, path)  # type: ignore[arg-type]
    props = session.decryption_properties()
    with pq.ParquetFile(path, decryption_properties=props) as pf:
        index = pf.schema_arrow.names.index("amount")
        return str(pf.metadata.row_group(0).column(index).physical_type)


def test_decimals_are_stored_as_integers_by_default(
    tmp_path: Path, counting: MemoryKeyProvider
) -> None:
    default, flba = tmp_path / "a.parquet", tmp_path / "b.parquet"
    write_parquet(table(), default, counting, key_name="sales")
    write_parquet(table(), flba, counting, key_name="sales", store_decimal_as_integer=False)
    assert _decimal_physical_type(default, counting) == "INT64"
    assert _decimal_physical_type(flba, counting) == "FIXED_LEN_BYTE_ARRAY"
    assert read_parquet(default, counting).equals(read_parquet(flba, counting))

    plain, converted = tmp_path / "plain.parquet", tmp_path / "c.parquet"
    pq.write_table(table(), plain)  # pyarrow's default layout
    encrypt_parquet_file(plain, converted, counting, key_name="sales")
    assert _decimal_physical_type(converted, counting) == "INT64"
    assert read_parquet(converted, counting).equals(table())
