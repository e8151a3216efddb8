"""Encrypted Parquet (PME) through a DataKeyProvider: round trips, key separation, tampering."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tests.support.keys import MemoryKeyProvider

from ppml.data.parquet import (
    FooterKey,
    decrypt_parquet_file,
    encrypt_parquet_file,
    is_encrypted_parquet,
    parquet_footer_key,
    read_parquet,
    write_parquet,
)
from ppml.errors import (
    InputNotFound,
    IntegrityError,
    KeyAccessError,
    KeyNotFound,
    NotEncrypted,
    UsageError,
)

SECRETS = ["alice-secret-7f3a", "bob-secret-91c2", "carol-secret-04de"]


def sample_table(rows: int = 300) -> pa.Table:
    base = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    return pa.table(
        {
            "id": pa.array(range(rows), pa.int64()),
            "score": pa.array([i / 7 if i % 5 else None for i in range(rows)], pa.float64()),
            "name": pa.array([SECRETS[i % 3] if i % 4 else None for i in range(rows)]),
            "ssn": pa.array([f"ssn-{i:09d}" for i in range(rows)]),
            "seen": pa.array(
                [base + dt.timedelta(seconds=i) for i in range(rows)], pa.timestamp("us", "UTC")
            ),
            "tags": pa.array([[f"tag-{i}", "x"] if i % 3 else None for i in range(rows)]),
            "flag": pa.array([i % 2 == 0 for i in range(rows)]),
        }
    )


@pytest.fixture
def provider() -> MemoryKeyProvider:
    return MemoryKeyProvider(create_on_demand=True)


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ---------------------------------------------------------------- round trips


def test_round_trip_of_several_types(tmp_path: Path, provider: MemoryKeyProvider) -> None:
    table = sample_table()
    path = tmp_path / "t.parquet"
    write_parquet(table, path, provider, key_name="data")
    assert read_parquet(path, provider).equals(table)
    assert is_encrypted_parquet(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert listing(tmp_path) == ["t.parquet"]


def test_round_trip_with_column_keys_and_row_groups(
    tmp_path: Path, provider: MemoryKeyProvider
) -> None:
    table = sample_table(1000)
    path = tmp_path / "t.parquet"
    write_parquet(
        table,
        path,
        provider,
        key_name="data",
        column_keys={"pii": ["ssn", "name"], "tags-key": ["tags"]},
        row_group_size=128,
    )
    assert read_parquet(path, provider).equals(table)


def test_pandas_metadata_survives(tmp_path: Path, provider: MemoryKeyProvider) -> None:
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"x": [1, 2, 3], "y": ["a", "b", "c"]}, index=[10, 20, 30])
    path = tmp_path / "t.parquet"
    write_parquet(pa.Table.from_pandas(frame), path, provider, key_name="data")
    assert read_parquet(path, provider).to_pandas().equals(frame)


def test_old_files_stay_readable_after_rotation(
    tmp_path: Path, provider: MemoryKeyProvider
) -> None:
    path = tmp_path / "t.parquet"
    write_parquet(sample_table(), path, provider, key_name="data")
    provider.rotate("data")
    newer = tmp_path / "u.parquet"
    write_parquet(sample_table(), newer, provider, key_name="data")
    assert parquet_footer_key(path) == FooterKey("data", 1)
    assert parquet_footer_key(newer) == FooterKey("data", 2)
    assert read_parquet(path, provider).equals(sample_table())


# ---------------------------------------------------------------- confidentiality


def test_plain_pyarrow_cannot_read_without_keys(
    tmp_path: Path, provider: MemoryKeyProvider
) -> None:
    path = tmp_path / "t.parquet"
    write_parquet(sample_table(), path, provider, key_name="data")
    with pytest.raises(OSError):
        pq.read_table(path)
    with pytest.raises(OSError):
        pq.ParquetFile(path)


@pytest.mark.parametrize("compression", ["none", "snappy", "zstd"])
def test_no_plaintext_value_on_disk(
    tmp_path: Path, provider: MemoryKeyProvider, compression: str
) -> None:
    table = sample_table()
    plain, encrypted = tmp_path / "plain.parquet", tmp_path / "enc.parquet"
    pq.write_table(table, plain, compression="none")
    write_parquet(
        table,
        encrypted,
        provider,
        key_name="data",
        column_keys={"pii": ["ssn"]},
        compression=compression,
    )
    # Column names too (the schema lives in the encrypted footer); two-letter "id" is left out
    # because random ciphertext contains any given two bytes too often.
    needles = [*SECRETS, "ssn-000000042", "tag-4", "score", "name", "seen", "tags"]
    # The control shows the needles would be visible if the file were not encrypted.
    assert all(n.encode() in plain.read_bytes() for n in needles)
    data = encrypted.read_bytes()
    assert [n for n in needles if n.encode() in data] == []


# ---------------------------------------------------------------- column keys


def test_column_key_separation(tmp_path: Path, provider: MemoryKeyProvider) -> None:
    table = sample_table()
    path = tmp_path / "t.parquet"
    write_parquet(table, path, provider, key_name="data", column_keys={"pii": ["ssn", "name"]})
    provider.refused = {"pii"}

    got = read_parquet(path, provider, columns=["id", "seen", "tags"])
    assert got.equals(table.select(["id", "seen", "tags"]))
    assert provider.calls["unwrap", "pii"] == 0

    for columns in (None, ["ssn"], ["id", "name"]):
        with pytest.raises(KeyAccessError) as info:
            read_parquet(path, provider, columns=columns)
        assert "pii" in str(info.value)
        assert info.value.path == str(path)


def test_footer_key_denied(tmp_path: Path, provider: MemoryKeyProvider) -> None:
    path = tmp_path / "t.parquet"
    write_parquet(sample_table(), path, provider, key_name="data", column_keys={"pii": ["ssn"]})
    provider.refused = {"data"}
    with pytest.raises(KeyAccessError):
        read_parquet(path, provider, columns=["ssn"])


def test_column_selection_and_unknown_column(tmp_path: Path, provider: MemoryKeyProvider) -> None:
    table = sample_table()
    path = tmp_path / "t.parquet"
    write_parquet(table, path, provider, key_name="data")
    assert read_parquet(path, provider, columns=["tags", "id"]).equals(table.select(["tags", "id"]))
    with pytest.raises(UsageError, match="nope"):
        read_parquet(path, provider, columns=["id", "nope"])


def test_provider_calls_per_write_and_read(tmp_path: Path, provider: MemoryKeyProvider) -> None:
    table = pa.table({"a": range(1000), "b": [str(i) for i in range(1000)], "c": [1.5] * 1000})
    path = tmp_path / "t.parquet"
    write_parquet(
        table, path, provider, key_name="data", column_keys={"col": ["c"]}, row_group_size=100
    )
    assert provider.calls == {("generate", "data"): 1, ("generate", "col"): 1}
    provider.calls.clear()
    read_parquet(path, provider)
    assert provider.calls == {("unwrap", "data"): 1, ("unwrap", "col"): 1}
    provider.calls.clear()
    read_parquet(path, provider)  # a second read asks again: nothing cached across operations
    assert provider.calls == {("unwrap", "data"): 1, ("unwrap", "col"): 1}


def test_footer_key_without_keys(tmp_path: Path, provider: MemoryKeyProvider) -> None:
    path = tmp_path / "t.parquet"
    write_parquet(sample_table(), path, provider, key_name="sales.2024", column_keys={"p": ["ssn"]})
    provider.calls.clear()
    assert parquet_footer_key(path) == FooterKey("sales.2024", 1)
    assert not provider.calls


@pytest.mark.parametrize(
    ("column_keys", "match"),
    [
        ({"pii": ["ssn", "nope", "zilch"]}, "nope, zilch"),
        ({"pii": ["ssn"], "other": ["ssn"]}, "two keys"),
        ({"pii": "ssn"}, "not a string"),
        ({"pii": []}, "no column"),
        ({"bad name!": ["ssn"]}, "invalid key name"),
    ],
)
def test_bad_column_keys_leave_nothing(
    tmp_path: Path, provider: MemoryKeyProvider, column_keys: dict[str, object], match: str
) -> None:
    with pytest.raises(UsageError, match=match):
        write_parquet(
            sample_table(),
            tmp_path / "t.parquet",
            provider,
            key_name="data",
            column_keys=column_keys,  # type: ignore[arg-type]
        )
    assert listing(tmp_path) == []
    assert not provider.calls


def test_reserved_options_refused(tmp_path: Path, provider: MemoryKeyProvider) -> None:
    with pytest.raises(UsageError, match="encryption_properties"):
        write_parquet(
            sample_table(),
            tmp_path / "t.parquet",
            provider,
            key_name="data",
            encryption_properties=None,
        )


def test_provider_failure_leaves_nothing(tmp_path: Path, provider: MemoryKeyProvider) -> None:
    provider.fail_generate = True
    with pytest.raises(KeyNotFound):
        write_parquet(sample_table(), tmp_path / "t.parquet", provider, key_name="data")
    assert listing(tmp_path) == []


def test_failed_write_keeps_previous_file(tmp_path: Path, provider: MemoryKeyProvider) -> None:
    path = tmp_path / "t.parquet"
    write_parquet(sample_table(), path, provider, key_name="data")
    before = path.read_bytes()
    with pytest.raises(UsageError):
        write_parquet(sample_table(), path, provider, key_name="data", column_keys={"k": ["x"]})
    assert path.read_bytes() == before
    assert listing(tmp_path) == ["t.parquet"]


# ---------------------------------------------------------------- integrity


def _written(tmp_path: Path, provider: MemoryKeyProvider) -> Path:
    path = tmp_path / "t.parquet"
    write_parquet(
        sample_table(),
        path,
        provider,
        key_name="data",
        column_keys={"pii": ["ssn"]},
        compression="none",
    )
    return path


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("column", ["id", "name", "ssn", "tags"])
@pytest.mark.parametrize("where", [0.1, 0.5, 0.9])
def test_tampered_column_chunk(
    tmp_path: Path, provider: MemoryKeyProvider, column: str, where: float
) -> None:
    path = _written(tmp_path, provider)
    with _open(path, provider) as pf:
        leaves = [pf.schema.column(i).path for i in range(pf.metadata.num_columns)]
        index = leaves.index("tags.list.element" if column == "tags" else column)
        chunk = pf.metadata.row_group(0).column(index)
        start = chunk.dictionary_page_offset or chunk.data_page_offset
        offset = start + int(chunk.total_compressed_size * where)
    _flip(path, offset)
    with pytest.raises(IntegrityError) as info:
        read_parquet(path, provider)
    assert info.value.message == "integrity check failed"
    assert info.value.path == str(path)


def _open(path: Path, provider: MemoryKeyProvider) -> pq.ParquetFile:
    from ppml.data import parquet as module

    session = module._KeySession(provider, path)
    return pq.ParquetFile(path, decryption_properties=session.decryption_properties())


@pytest.mark.parametrize("from_end", [9, 40, 200])
def test_tampered_footer(tmp_path: Path, provider: MemoryKeyProvider, from_end: int) -> None:
    path = _written(tmp_path, provider)
    _flip(path, path.stat().st_size - from_end)
    with pytest.raises(IntegrityError):
        read_parquet(path, provider)


def test_truncated_file(tmp_path: Path, provider: MemoryKeyProvider) -> None:
    path = _written(tmp_path, provider)
    data = path.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 5):
        path.write_bytes(data[:cut])
        with pytest.raises(IntegrityError):
            read_parquet(path, provider)
    assert not is_encrypted_parquet(path)


def test_not_parquet_files(tmp_path: Path, provider: MemoryKeyProvider) -> None:
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"id,name\n1,alice\n")
    with pytest.raises(UsageError, match="not a Parquet file"):
        read_parquet(junk, provider)
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    with pytest.raises(UsageError):
        read_parquet(empty, provider)
    plain = tmp_path / "plain.parquet"
    pq.write_table(sample_table(), plain)
    with pytest.raises(NotEncrypted):
        read_parquet(plain, provider)
    assert not is_encrypted_parquet(plain)
    with pytest.raises(InputNotFound):
        read_parquet(tmp_path / "missing.parquet", provider)
    with pytest.raises(UsageError):
        read_parquet(tmp_path, provider)
    assert not provider.calls


# ---------------------------------------------------------------- streaming conversion


def test_encrypt_decrypt_file_round_trip(tmp_path: Path, provider: MemoryKeyProvider) -> None:
    table = sample_table(5000)
    plain, enc, back = (
        tmp_path / "plain.parquet",
        tmp_path / "enc.parquet",
        tmp_path / "back.parquet",
    )
    pq.write_table(table, plain, row_group_size=700)
    encrypt_parquet_file(plain, enc, provider, key_name="data", column_keys={"pii": ["ssn"]})
    assert is_encrypted_parquet(enc)
    assert provider.calls == {("generate", "data"): 1, ("generate", "pii"): 1}
    with _open(enc, provider) as pf:
        assert pf.num_row_groups == 8
    assert read_parquet(enc, provider).equals(table)

    provider.calls.clear()
    decrypt_parquet_file(enc, back, provider)
    assert provider.calls == {("unwrap", "data"): 1, ("unwrap", "pii"): 1}
    assert not is_encrypted_parquet(back)
    assert stat.S_IMODE(back.stat().st_mode) == 0o600
    restored = pq.ParquetFile(back)
    assert restored.num_row_groups == 8
    assert restored.read().equals(table)


def test_encrypt_file_refuses_wrong_inputs(tmp_path: Path, provider: MemoryKeyProvider) -> None:
    enc = tmp_path / "enc.parquet"
    write_parquet(sample_table(), enc, provider, key_name="data")
    with pytest.raises(UsageError, match="already"):
        encrypt_parquet_file(enc, tmp_path / "x.parquet", provider, key_name="data")
    junk = tmp_path / "junk"
    junk.write_bytes(b"PAR1 not really PAR1")
    with pytest.raises(UsageError):
        encrypt_parquet_file(junk, tmp_path / "x.parquet", provider, key_name="data")
    plain = tmp_path / "plain.parquet"
    pq.write_table(sample_table(), plain)
    with pytest.raises(UsageError, match="nope"):
        encrypt_parquet_file(
            plain, tmp_path / "x.parquet", provider, key_name="data", column_keys={"k": ["nope"]}
        )
    provider.fail_generate = True
    with pytest.raises(KeyNotFound):
        encrypt_parquet_file(plain, tmp_path / "x.parquet", provider, key_name="data")
    with pytest.raises(NotEncrypted):
        decrypt_parquet_file(plain, tmp_path / "x.parquet", provider)
    assert listing(tmp_path) == ["enc.parquet", "junk", "plain.parquet"]


def test_decrypt_file_failures_leave_no_plaintext(
    tmp_path: Path, provider: MemoryKeyProvider
) -> None:
    enc = tmp_path / "enc.parquet"
    write_parquet(
        sample_table(2000),
        enc,
        provider,
        key_name="data",
        column_keys={"pii": ["ssn"]},
        row_group_size=500,
        compression="none",
    )
    provider.refused = {"pii"}
    with pytest.raises(KeyAccessError):
        decrypt_parquet_file(enc, tmp_path / "out.parquet", provider)
    assert listing(tmp_path) == ["enc.parquet"]

    provider.refused = set()
    with _open(enc, provider) as pf:
        last = pf.metadata.row_group(pf.num_row_groups - 1).column(0)
        offset = last.data_page_offset + last.total_compressed_size // 2
    _flip(enc, offset)  # damage the last row group: earlier ones decrypt fine first
    with pytest.raises(IntegrityError):
        decrypt_parquet_file(enc, tmp_path / "out.parquet", provider)
    assert listing(tmp_path) == ["enc.parquet"]


def test_no_key_shared_between_providers(tmp_path: Path, provider: MemoryKeyProvider) -> None:
    path = tmp_path / "t.parquet"
    write_parquet(sample_table(), path, provider, key_name="data")
    read_parquet(path, provider)
    other = MemoryKeyProvider(
        create_on_demand=True
    )  # another workspace's KMS: knows no key of this file
    with pytest.raises(KeyNotFound):
        read_parquet(path, other)
    assert other.calls == {("unwrap", "data"): 1}


def test_transport_failure_is_not_reported_as_tampering(tmp_path: Path) -> None:
    provider = MemoryKeyProvider(
        create_on_demand=True, failure=ConnectionRefusedError("kms unreachable")
    )
    path = tmp_path / "t.parquet"
    write_parquet(sample_table(), path, provider, key_name="data")
    with pytest.raises(ConnectionRefusedError):
        read_parquet(path, provider)
    with pytest.raises(ConnectionRefusedError):
        decrypt_parquet_file(path, tmp_path / "out.parquet", provider)
    assert listing(tmp_path) == ["t.parquet"]
