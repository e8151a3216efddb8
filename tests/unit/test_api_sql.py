"""`ppml.sql` and `ppml.sql_pandas` outside a TEE: keys from the workspace named by $PPML_HOME
and $PPML_PASSPHRASE, the engine of `ppml sql`, and its refusals."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

import ppml
from ppml import api
from ppml.crypto.passphrase import KdfParams
from ppml.errors import ConfigurationError, InputNotFound, IntegrityError, UsageError
from ppml.workspace import Workspace

PASSPHRASE = "api sql passphrase"


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home = tmp_path / "ws"
    ws = Workspace.create(home, PASSPHRASE.encode(), kdf=KdfParams.for_testing(), dev=True)
    with ws.key_service() as kms:
        kms.create_key("sales")
    monkeypatch.setenv("PPML_HOME", str(home))
    monkeypatch.setenv("PPML_PASSPHRASE", PASSPHRASE)
    monkeypatch.setattr(api, "_provider", None)
    yield tmp_path
    provider = api._provider
    if provider is not None:
        provider.close()  # type: ignore[attr-defined]
    monkeypatch.setattr(api, "_provider", None)


@pytest.fixture
def sales(workspace: Path) -> Path:
    table = pa.table(
        {
            "region": ["north", "south", "north", "east"],
            "amount": [10.0, 20.0, 5.5, 7.0],
            "ssn": ["1", "2", "3", "4"],
        }
    )
    ppml.write_table(table, workspace / "sales.parquet", key="sales")
    csv = workspace / "regions.csv"
    ppml.write_table(
        pa.table({"region": ["north", "south"], "manager": ["Ada", "Alan"]}), csv, key="sales"
    )
    return workspace


def test_sql_returns_an_arrow_table(sales: Path) -> None:
    result = ppml.sql(
        "SELECT s.region, sum(amount) AS total, any_value(r.manager) AS manager "
        "FROM sales s LEFT JOIN regions r USING (region) GROUP BY s.region ORDER BY s.region",
        tables={"sales": sales / "sales.parquet", "regions": str(sales / "regions.csv")},
    )
    assert isinstance(result, pa.Table)
    assert result.to_pylist() == [
        {"region": "east", "total": 7.0, "manager": None},
        {"region": "north", "total": 15.5, "manager": "Ada"},
        {"region": "south", "total": 20.0, "manager": "Alan"},
    ]


def test_sql_pandas_and_arrow_inputs(sales: Path) -> None:
    extra = pa.table({"region": ["north"], "target": [12.0]})
    frame = ppml.sql_pandas(
        "SELECT region, sum(amount) >= any_value(target) AS met FROM sales JOIN goals "
        "USING (region) GROUP BY region",
        tables={"sales": sales / "sales.parquet", "goals": extra},
        threads=1,
        memory_limit="1GB",
    )
    assert frame.to_dict("records") == [{"region": "north", "met": True}]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("DELETE FROM sales", "only a read-only query"),
        ("COPY sales TO 'leak.csv'", "only a read-only query"),
        ("SELECT 1; SELECT 2", "expected one SQL statement"),
        ("SELECT * FROM read_parquet('{path}')", "Permission"),
        ("SELECT content FROM read_text('/etc/hostname')", "Permission"),
        ("SELECT nope FROM sales", "nope"),
        ("SELECT * FROM missing", "missing"),
        ("ATTACH 'x.db'", "only a read-only query"),
    ],
)
def test_refusals(sales: Path, query: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        ppml.sql(
            query.format(path=sales / "sales.parquet"),
            tables={"sales": sales / "sales.parquet"},
        )
    assert not (sales / "leak.csv").exists()


def test_bad_tables_and_options(sales: Path) -> None:
    with pytest.raises(InputNotFound):
        ppml.sql("SELECT 1 FROM t", tables={"t": sales / "absent.parquet"})
    with pytest.raises(UsageError, match="table name"):
        ppml.sql("SELECT 1", tables={"bad-name": sales / "sales.parquet"})
    with pytest.raises(UsageError, match="memory limit"):
        ppml.sql(
            "SELECT 1 FROM sales", tables={"sales": sales / "sales.parquet"}, memory_limit="lots"
        )


def test_tampered_table_is_an_integrity_error(sales: Path) -> None:
    path = sales / "sales.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        ppml.sql("SELECT sum(amount) FROM sales", tables={"sales": path})


def test_no_keys_without_a_passphrase_or_a_tee(
    sales: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PPML_PASSPHRASE")
    monkeypatch.setattr(api, "_provider", None)
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    with pytest.raises(ConfigurationError, match="no keys"):
        ppml.sql("SELECT 1 FROM sales", tables={"sales": sales / "sales.parquet"})
