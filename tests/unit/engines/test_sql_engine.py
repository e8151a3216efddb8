"""The embedded SQL engine: DuckDB over encrypted tables decrypted into memory only."""

from __future__ import annotations

import datetime as dt
import decimal
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from tests.support import MemoryKeyProvider

from ppml.crypto.passphrase import KdfParams
from ppml.data import write_table
from ppml.engines.sql import (
    SqlOptions,
    check_query,
    connect,
    needed_columns,
    run_sql,
    validate_table_name,
)
from ppml.errors import InputNotFound, IntegrityError, KeyNotFound, UsageError
from ppml.workspace import Workspace

SECRET = "ssn-123-45-6789"

PEOPLE = pa.table(
    {
        "id": pa.array([1, 2, 3, 4], pa.int64()),
        "name": ["Michael", "Andy", "Justin", "Berta"],
        "city": ["Paris", "Rome", "Paris", "Oslo"],
        "age": pa.array([None, 30, 19, 45], pa.int64()),
        "ssn": [SECRET, "ssn-2", "ssn-3", "ssn-4"],
    }
)
ORDERS = pa.table(
    {
        "order_id": pa.array([10, 11, 12, 13, 14], pa.int64()),
        "id": pa.array([1, 1, 2, 3, 9], pa.int64()),
        "amount": pa.array(
            [decimal.Decimal(v) for v in ("10.50", "4.50", "7.25", "1.00", "99.99")],
            pa.decimal128(10, 2),
        ),
        "day": pa.array([dt.date(2024, 1, d) for d in (1, 2, 3, 4, 5)], pa.date32()),
    }
)


@pytest.fixture
def files(tmp_path: Path, provider: MemoryKeyProvider) -> dict[str, Path]:
    people = tmp_path / "people.csv"
    orders = tmp_path / "orders.parquet"
    write_table(PEOPLE, people, provider, key_name="sales")
    write_table(ORDERS, orders, provider, key_name="sales", column_keys={"pii": ["amount"]})
    return {"people": people, "orders": orders}


def test_aggregate_over_encrypted_csv(files: dict[str, Path], provider: MemoryKeyProvider) -> None:
    assert SECRET.encode() not in files["people"].read_bytes()
    result = run_sql(
        "SELECT city, count(*) AS n, avg(age) AS a FROM people GROUP BY city ORDER BY city",
        {"people": files["people"]},
        provider,
    )
    assert result.to_pylist() == [
        {"city": "Oslo", "n": 1, "a": 45.0},
        {"city": "Paris", "n": 2, "a": 19.0},
        {"city": "Rome", "n": 1, "a": 30.0},
    ]


def test_aggregate_over_pme_parquet(files: dict[str, Path], provider: MemoryKeyProvider) -> None:
    result = run_sql(
        "SELECT sum(amount) AS total, max(day) AS last FROM orders WHERE day > DATE '2024-01-01'",
        {"orders": files["orders"]},
        provider,
    )
    assert result.to_pylist() == [{"total": decimal.Decimal("112.74"), "last": dt.date(2024, 1, 5)}]


def test_join_across_two_encrypted_tables(
    files: dict[str, Path], provider: MemoryKeyProvider
) -> None:
    result = run_sql(
        "SELECT p.name, sum(o.amount) AS spent FROM people p JOIN orders o USING (id) "
        "GROUP BY p.name ORDER BY spent DESC",
        files,
        provider,
    )
    assert result.column("name").to_pylist() == ["Michael", "Andy", "Justin"]
    assert result.column("spent").to_pylist() == [
        decimal.Decimal("15.00"),
        decimal.Decimal("7.25"),
        decimal.Decimal("1.00"),
    ]


def test_with_a_real_workspace_kms(tmp_path: Path) -> None:
    ws = Workspace.create(tmp_path / "ws", b"engine test passphrase", kdf=KdfParams.for_testing())
    with ws.key_service() as kms:
        kms.create_key("sales")
        write_table(ORDERS, tmp_path / "o.parquet", kms, key_name="sales")
        write_table(PEOPLE, tmp_path / "p.json", kms, key_name="sales")
        result = run_sql(
            "SELECT count(*) AS n FROM o JOIN p ON o.id = p.id WHERE p.city = 'Paris'",
            {"o": tmp_path / "o.parquet", "p": tmp_path / "p.json"},
            kms,
        )
    assert result.to_pylist() == [{"n": 3}]


def test_directory_of_parts_and_arrow_tables(tmp_path: Path, provider: MemoryKeyProvider) -> None:
    parts = tmp_path / "orders"
    parts.mkdir()
    write_table(ORDERS.slice(0, 2), parts / "part-0.parquet", provider, key_name="sales")
    write_table(ORDERS.slice(2), parts / "part-1.parquet", provider, key_name="sales")
    result = run_sql(
        "SELECT count(*) AS n, count(DISTINCT people.id) AS who FROM orders JOIN people USING (id)",
        {"orders": parts, "people": PEOPLE},
        provider,
    )
    assert result.to_pylist() == [{"n": 4, "who": 3}]


def test_only_the_needed_columns_and_tables_are_decrypted(
    files: dict[str, Path], provider: MemoryKeyProvider
) -> None:
    # `amount` is under the key `pii`: a query that does not read it never asks for that key.
    provider.calls.clear()
    result = run_sql(
        "SELECT count(*) AS n FROM orders WHERE day >= DATE '2024-01-03'", files, provider
    )
    assert result.to_pylist() == [{"n": 3}]
    assert ("unwrap", "pii") not in provider.calls
    assert provider.calls  # the footer and `day` were decrypted
    # people.csv is not in the query: it was not read at all (a CSV read unwraps its key).
    assert len(provider.calls) == len([c for c in provider.calls if c == ("unwrap", "sales")])
    provider.calls.clear()
    run_sql("SELECT sum(amount) FROM orders", files, provider)
    assert ("unwrap", "pii") in provider.calls


def test_needed_columns_follow_the_plan() -> None:
    schemas = {"people": PEOPLE.schema, "orders": ORDERS.schema}
    cols = needed_columns(
        "SELECT name FROM people WHERE age > 20 AND EXISTS "
        "(SELECT * FROM orders WHERE orders.id = people.id)",
        schemas,
    )
    assert cols["people"] is not None and set(cols["people"]) == {"id", "name", "age"}
    assert cols["orders"] == ["id"]
    everything = needed_columns("SELECT count(DISTINCT people) FROM people", schemas)
    assert everything["people"] == PEOPLE.schema.names
    star = needed_columns("SELECT * EXCLUDE (ssn) FROM people", schemas)
    assert star["people"] == ["id", "name", "city", "age"]


def test_star_and_whole_row_references_read_every_column(
    files: dict[str, Path], provider: MemoryKeyProvider
) -> None:
    result = run_sql("SELECT people FROM people WHERE id = 2", files, provider)
    assert result.to_pylist() == [
        {
            "people": {
                "id": 2,
                "name": "Andy",
                "city": "Rome",
                "age": 30,
                "ssn": "ssn-2",
            }
        }
    ]
    assert run_sql(
        "SELECT count(DISTINCT people) AS n FROM people", files, provider
    ).to_pylist() == [{"n": 4}]


@pytest.mark.parametrize(
    "query",
    [
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT * FROM glob('/etc/*')",
        "SELECT * FROM read_parquet('/tmp/anything.parquet')",
        "SELECT * FROM '/etc/passwd'",
    ],
)
def test_reading_files_from_sql_is_refused(
    query: str, files: dict[str, Path], provider: MemoryKeyProvider
) -> None:
    with pytest.raises(UsageError):
        run_sql(query, files, provider)


@pytest.mark.parametrize(
    ("query", "what"),
    [
        ("COPY people TO '/tmp/ppml-should-not-exist.csv'", "COPY"),
        ("EXPORT DATABASE '/tmp/ppml-export'", "EXPORT"),
        ("ATTACH '/tmp/ppml.duckdb' AS x", "ATTACH"),
        ("INSTALL httpfs", "LOAD"),
        ("LOAD httpfs", "LOAD"),
        ("CREATE SECRET (TYPE s3, KEY_ID 'a', SECRET 'b')", "CREATE"),
        ("SET enable_external_access = true", "SET"),
        ("CREATE TABLE x AS SELECT 1", "CREATE"),
        ("INSERT INTO people VALUES (1)", "INSERT"),
        ("PRAGMA version", "PRAGMA"),
        ("SELECT 1; SELECT 2", "2"),
    ],
)
def test_only_one_select_is_accepted(query: str, what: str) -> None:
    with pytest.raises(UsageError, match=what):
        check_query(query)


def test_the_connection_itself_refuses_external_access(tmp_path: Path) -> None:
    """Defense in depth: even a statement past the SELECT check cannot reach the file system,
    load extensions or undo the settings."""
    con = connect({"t": PEOPLE})
    try:
        assert con.sql("SELECT count(*) FROM t").fetchall() == [(4,)]
        target = tmp_path / "x.csv"
        with pytest.raises(duckdb.PermissionException):
            con.execute(f"COPY t TO '{target}'")
        assert not target.exists()
        with pytest.raises(duckdb.PermissionException):
            con.execute("SELECT * FROM read_csv('/etc/passwd')")
        with pytest.raises(duckdb.Error):
            con.execute("LOAD tpch")
        with pytest.raises(duckdb.Error, match="locked"):
            con.execute("SET enable_external_access = true")
        with pytest.raises(duckdb.Error, match="locked"):
            con.execute("SET temp_directory = '/tmp'")
        assert con.sql("SELECT current_setting('temp_directory')").fetchall() == [("",)]
    finally:
        con.close()


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("SELEC name FROM people", "Parser Error"),
        ("SELECT * FROM nosuch", "Table with name nosuch does not exist"),
        ("SELECT nosuch FROM people", 'Referenced column "nosuch" not found'),
        ("SELECT name + 1 FROM people", "Binder Error"),
        ("", "empty"),
    ],
)
def test_query_errors_are_usage_errors_with_duckdbs_message(
    query: str, message: str, files: dict[str, Path], provider: MemoryKeyProvider
) -> None:
    with pytest.raises(UsageError, match=message) as info:
        run_sql(query, files, provider)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "query",
    [
        "SELECT CAST(ssn AS INTEGER) FROM people",
        "SELECT ssn::DATE FROM people",
        "SELECT error(ssn) FROM people",
        "SELECT CAST(name || ssn AS INTEGER) FROM people WHERE id = 1",
    ],
)
def test_errors_on_the_data_never_quote_values(
    query: str, files: dict[str, Path], provider: MemoryKeyProvider
) -> None:
    with pytest.raises(UsageError) as info:
        run_sql(query, files, provider)
    text = str(info.value)
    assert "ssn-" not in text and "Michael" not in text
    assert "withheld" in text


def test_bad_tables(tmp_path: Path, provider: MemoryKeyProvider) -> None:
    with pytest.raises(InputNotFound):
        run_sql("SELECT 1 FROM t", {"t": tmp_path / "missing.csv"}, provider)
    with pytest.raises(UsageError, match="invalid table name"):
        run_sql("SELECT 1", {"bad-name": PEOPLE}, provider)
    with pytest.raises(UsageError, match="twice"):
        run_sql("SELECT 1", {"t": PEOPLE, "T": PEOPLE}, provider)
    with pytest.raises(UsageError, match="no tables"):
        run_sql("SELECT 1", {}, provider)
    with pytest.raises(UsageError, match="invalid table name"):
        validate_table_name("1abc")


def test_tampered_input_is_an_integrity_error(
    files: dict[str, Path], provider: MemoryKeyProvider
) -> None:
    blob = bytearray(files["people"].read_bytes())
    blob[-20] ^= 1
    files["people"].write_bytes(bytes(blob))
    with pytest.raises(IntegrityError):
        run_sql("SELECT count(*) FROM people", files, provider)


def test_unknown_key_is_a_key_error(tmp_path: Path, provider: MemoryKeyProvider) -> None:
    other = MemoryKeyProvider("sales")  # same names, different key-encryption keys
    write_table(ORDERS, tmp_path / "o.parquet", other, key_name="sales")
    stranger = MemoryKeyProvider("pii")
    with pytest.raises(KeyNotFound):
        run_sql("SELECT count(*) FROM o", {"o": tmp_path / "o.parquet"}, stranger)


def test_options_are_checked_and_applied(
    files: dict[str, Path], provider: MemoryKeyProvider
) -> None:
    with pytest.raises(UsageError, match="memory limit"):
        SqlOptions(memory_limit="lots")
    with pytest.raises(UsageError, match="threads"):
        SqlOptions(threads=0)
    opts = SqlOptions(memory_limit="256MB", threads=1, prune_columns=False, read_workers=1)
    result = run_sql("SELECT count(*) AS n FROM people", files, provider, options=opts)
    assert result.to_pylist() == [{"n": 4}]


def test_nothing_is_written_to_disk(
    tmp_path: Path,
    files: dict[str, Path],
    provider: MemoryKeyProvider,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    run_sql("SELECT * FROM people JOIN orders USING (id) ORDER BY order_id", files, provider)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert list(work.iterdir()) == []


# --------------------------------------------------------------------------- found by attack


def test_a_plaintext_part_or_table_is_refused(tmp_path: Path, provider: MemoryKeyProvider) -> None:
    """Rows added as a plaintext file (no key needed) must not reach a query."""
    from ppml.errors import NotEncrypted

    table_dir = tmp_path / "sales"
    table_dir.mkdir()
    write_table(
        pa.table({"id": [1, 2], "amount": [5.0, 7.0]}),
        table_dir / "part-0.csv",
        provider,
        key_name="sales",
    )
    (table_dir / "part-1.csv").write_text("id,amount\n99,1000000000.0\n")
    with pytest.raises(NotEncrypted, match="encrypted tables only"):
        run_sql("SELECT sum(amount) AS s FROM t", {"t": table_dir}, provider)
    (table_dir / "part-1.csv").unlink()
    assert run_sql("SELECT sum(amount) AS s FROM t", {"t": table_dir}, provider).to_pylist() == [
        {"s": 12.0}
    ]
    swapped = tmp_path / "t.csv"
    swapped.write_text("id,amount\n1,123456789.0\n")
    with pytest.raises(NotEncrypted):
        run_sql("SELECT sum(amount) AS s FROM t", {"t": swapped}, provider)


def test_an_interrupted_query_is_an_interrupt_not_a_data_error(
    tmp_path: Path, provider: MemoryKeyProvider
) -> None:
    import os
    import signal
    import threading

    def stop(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGUSR1, stop)
    timer = threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_sql(
                "SELECT sum(r.range % 7) AS s FROM range(5000000000) r",
                {"t": pa.table({"x": [1]})},
                provider,
            )
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)


def test_a_process_that_ran_a_query_dumps_no_core(tmp_path: Path) -> None:
    """Decrypted data is in memory: after a query the process has a zero core-size limit and
    is not dumpable (other processes of the user cannot read its memory either)."""
    import subprocess
    import sys

    script = (
        "import ctypes, resource, pyarrow as pa\n"
        "from tests.support import MemoryKeyProvider\n"
        "from ppml.engines.sql import run_sql\n"
        "run_sql('SELECT 1 AS x FROM t', {'t': pa.table({'a': [1]})}, MemoryKeyProvider('k'))\n"
        "print(resource.getrlimit(resource.RLIMIT_CORE)[0], "
        "ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))\n"  # PR_GET_DUMPABLE
    )
    root = Path(__file__).resolve().parents[3]
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["0", "0"]
