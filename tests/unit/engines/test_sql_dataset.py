"""The SQL engine's lazy scan of encrypted Parquet: only needed columns are decrypted, one
provider call per named key and file, tampering detected, DuckDB still locked down."""

from __future__ import annotations

import datetime as dt
import decimal
from collections import Counter
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from tests.support import MemoryKeyProvider

from ppml.data import write_table
from ppml.data.parquet import ParquetScanSession
from ppml.engines.sql import SqlOptions, connect, run_sql
from ppml.errors import IntegrityError, KeyAccessError, UsageError

ROWS = 3_000
SECRET = "secret-city-Zanzibar"


def orders(offset: int = 0) -> pa.Table:
    ids = range(offset, offset + ROWS)
    return pa.table(
        {
            "order_id": pa.array(ids, pa.int64()),
            "customer": pa.array([i % 97 for i in ids], pa.int64()),
            "amount": pa.array(
                [decimal.Decimal(i % 1000) / 100 for i in ids], pa.decimal128(12, 2)
            ),
            "day": pa.array([dt.date(2024, 1, 1) + dt.timedelta(days=i % 365) for i in ids]),
            "city": pa.array([SECRET if i == 7 else ("Paris", "Rome")[i % 2] for i in ids]),
        }
    )


@pytest.fixture
def gate(provider: MemoryKeyProvider) -> MemoryKeyProvider:
    return provider.sharing_keys()


@pytest.fixture
def table_dir(tmp_path: Path, gate: MemoryKeyProvider) -> Path:
    root = tmp_path / "orders"
    root.mkdir()
    for index in range(3):
        write_table(
            orders(index * ROWS),
            root / f"part-{index}.parquet",
            gate,
            key_name="sales",
            column_keys={"pii": ["amount"]},
        )
    return root


def test_a_refused_column_key_does_not_stop_queries_that_do_not_read_it(
    table_dir: Path, gate: MemoryKeyProvider
) -> None:
    gate.refused.add("pii")
    result = run_sql(
        "SELECT city, count(*) AS n FROM orders WHERE day < DATE '2024-02-01' "
        "AND city <> 'Rome' GROUP BY city ORDER BY city",
        {"orders": table_dir},
        gate,
    )
    assert result.to_pylist()[0]["city"] == "Paris"
    assert gate.unwraps["pii"] == 0
    with pytest.raises(KeyAccessError):
        run_sql("SELECT sum(amount) FROM orders", {"orders": table_dir}, gate)


@pytest.mark.parametrize("threads", [1, 4])
def test_one_provider_call_per_named_key_and_file(
    table_dir: Path, gate: MemoryKeyProvider, threads: int
) -> None:
    gate.unwraps.clear()
    result = run_sql(
        "SELECT customer, sum(amount) AS s, max(day) AS d FROM orders "
        "WHERE order_id % 3 = 0 GROUP BY customer ORDER BY customer",
        {"orders": table_dir},
        gate,
        options=SqlOptions(threads=threads),
    )
    assert result.num_rows == 97
    assert gate.unwraps == Counter({"sales": 3, "pii": 3})


def test_results_match_a_plain_duckdb_run(table_dir: Path, gate: MemoryKeyProvider) -> None:
    plain = pa.concat_tables([orders(i * ROWS) for i in range(3)])
    query = (
        "SELECT city, count(*) AS n, sum(amount) AS s, min(day) AS d FROM orders "
        "WHERE amount > 2.5 AND day BETWEEN DATE '2024-03-01' AND DATE '2024-06-30' "
        "GROUP BY city ORDER BY city"
    )
    con = duckdb.connect()
    try:
        con.register("orders", plain)
        expected = con.sql(query).to_arrow_table()
    finally:
        con.close()
    assert run_sql(query, {"orders": table_dir}, gate).equals(expected)


def test_tampered_parquet_is_an_integrity_error(table_dir: Path, gate: MemoryKeyProvider) -> None:
    victim = table_dir / "part-1.parquet"
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as info:
        run_sql("SELECT * FROM orders", {"orders": table_dir}, gate)
    assert info.value.message == "integrity check failed"
    assert info.value.path == str(victim)


def test_errors_on_parquet_data_never_quote_values(
    table_dir: Path, gate: MemoryKeyProvider
) -> None:
    with pytest.raises(UsageError) as info:
        run_sql("SELECT CAST(city AS INTEGER) FROM orders", {"orders": table_dir}, gate)
    assert SECRET not in str(info.value) and "Paris" not in str(info.value)
    assert "withheld" in str(info.value)


@pytest.mark.parametrize(
    "query",
    [
        "SELECT * FROM read_parquet('{path}')",
        "SELECT * FROM parquet_metadata('{path}')",
        "SELECT * FROM '{path}'",
    ],
)
def test_the_encrypted_files_cannot_be_read_from_sql(
    query: str, table_dir: Path, gate: MemoryKeyProvider
) -> None:
    path = table_dir / "part-0.parquet"
    with pytest.raises(UsageError):
        run_sql(query.format(path=path), {"orders": table_dir}, gate)


def test_a_connection_over_a_dataset_is_locked_down(
    tmp_path: Path, table_dir: Path, gate: MemoryKeyProvider
) -> None:
    with ParquetScanSession(gate) as session:
        dataset = session.dataset(sorted(table_dir.iterdir()))
        con = connect({"orders": dataset})
        try:
            assert con.sql("SELECT count(*) FROM orders").fetchall() == [(3 * ROWS,)]
            target = tmp_path / "leak.csv"
            with pytest.raises(duckdb.PermissionException):
                con.execute(f"COPY orders TO '{target}'")
            assert not target.exists()
            with pytest.raises(duckdb.Error, match="locked"):
                con.execute("SET enable_external_access = true")
        finally:
            con.close()


def test_a_table_reached_without_being_named_in_from(
    table_dir: Path, gate: MemoryKeyProvider, provider: MemoryKeyProvider
) -> None:
    people = pa.table({"id": [1, 2], "name": ["a", "b"]})
    result = run_sql(
        "SELECT (SELECT count(*) FROM orders) AS n, count(*) AS m FROM query_table('people')",
        {"orders": table_dir, "people": people},
        gate,
    )
    assert result.to_pylist() == [{"n": 3 * ROWS, "m": 2}]
