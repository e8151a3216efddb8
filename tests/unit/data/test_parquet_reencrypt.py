"""Re-encrypting PME Parquet under the newest key versions, keeping its column-key layout."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tests.support import MemoryKeyProvider

from ppml.data.parquet import (
    parquet_footer_key,
    read_parquet,
    reencrypt_parquet_file,
    write_parquet,
)
from ppml.errors import KeyAccessError, UsageError

TABLE = pa.table(
    {"name": ["Michael", "Andy", "Justin"], "ssn": ["1", "2", "3"], "age": [1, 30, 19]}
)


def test_reencrypt_moves_to_newest_versions_and_keeps_column_keys(tmp_path: Path) -> None:
    provider = MemoryKeyProvider("sales", "pii")
    path = tmp_path / "people.parquet"
    write_parquet(
        TABLE, path, provider, key_name="sales", column_keys={"pii": ["ssn"]}, row_group_size=1
    )
    assert parquet_footer_key(path).version == 1
    provider.rotate("sales")
    provider.rotate("pii")
    reencrypt_parquet_file(path, provider)
    assert parquet_footer_key(path).version == 2
    assert read_parquet(path, provider).equals(TABLE)
    assert read_parquet(path, provider).schema.metadata is None  # the layout record stays inside
    # The ssn column is still under `pii`: a provider without it reads the rest only.
    restricted = provider.sharing_keys()
    restricted.refused.add("pii")
    assert read_parquet(path, restricted, columns=["name", "age"]).num_rows == 3
    with pytest.raises(KeyAccessError):
        read_parquet(path, restricted, columns=["ssn"])
    assert [p.name for p in tmp_path.iterdir()] == ["people.parquet"]


def test_reencrypt_refuses_plain_parquet(tmp_path: Path) -> None:
    path = tmp_path / "plain.parquet"
    pq.write_table(TABLE, path)
    with pytest.raises(UsageError):
        reencrypt_parquet_file(path, MemoryKeyProvider("sales"))
