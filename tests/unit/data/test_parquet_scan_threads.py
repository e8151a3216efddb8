"""Encrypted Parquet datasets scanned by a multi-threaded engine never call back into Python
from a scan thread: every key is unwrapped on the calling thread first, from the files' own key
material, without reading any data. (A scan thread waiting for the GIL to unwrap a key while
the engine's thread held the GIL and waited on pyarrow's key cache deadlocked the process.)"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from tests.support import MemoryKeyProvider

from ppml.data import parquet as parquet_module
from ppml.data.parquet import ParquetScanSession, write_parquet
from ppml.engines.sql import SqlOptions, connect

PARTS = 4
ROWS = 20_000


@pytest.fixture(scope="module")
def table_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MemoryKeyProvider]:
    return _write_parts(tmp_path_factory.mktemp("orders"))


def _write_parts(root: Path, **options: Any) -> tuple[Path, MemoryKeyProvider]:
    provider = MemoryKeyProvider("sales", "pii", "geo")
    for part in range(PARTS):
        ids = range(part * ROWS, (part + 1) * ROWS)
        table = pa.table(
            {
                "id": pa.array(ids, pa.int64()),
                "amount": pa.array([i % 1000 for i in ids], pa.int64()),
                "name": pa.array([f"n{i % 97}" for i in ids]),
                "city": pa.array([("Paris", "Rome", "Oslo")[i % 3] for i in ids]),
            }
        )
        write_parquet(
            table,
            root / f"part-{part}.parquet",
            provider,
            key_name="sales",
            column_keys={"pii": ["name"], "geo": ["city"]},
            row_group_size=2_000,
            **options,
        )
    return root, provider


@pytest.fixture
def unwrap_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """For each time the session's client is asked for a key: whether ppml's own code asked
    (opening the footers, or the unwrapping every scan does first, on the thread that starts
    the scan), rather than pyarrow calling back from inside a running scan."""
    calls: list[bool] = []
    ours = threading.local()
    real_unwrap = parquet_module._PPMLKmsClient.unwrap_key
    real_prewarm = ParquetScanSession._prewarm
    real_dataset = ParquetScanSession.dataset

    def recording(self: object, wrapped: str, master: str) -> bytes:
        calls.append(getattr(ours, "active", False))
        return real_unwrap(self, wrapped, master)  # type: ignore[arg-type]

    def flagged(real: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            ours.active = True
            try:
                return real(*args, **kwargs)
            finally:
                ours.active = False

        return run

    monkeypatch.setattr(parquet_module._PPMLKmsClient, "unwrap_key", recording)
    monkeypatch.setattr(ParquetScanSession, "_prewarm", flagged(real_prewarm))
    monkeypatch.setattr(ParquetScanSession, "dataset", flagged(real_dataset))
    return calls


QUERY = (
    "SELECT city, count(*) AS n, sum(amount) AS total, count(DISTINCT name) AS names "
    "FROM orders WHERE amount > 10 GROUP BY city ORDER BY city"
)


@pytest.mark.parametrize("pages", ["default", "one per chunk"])
def test_no_scan_thread_ever_asks_for_a_key(
    tmp_path: Path, unwrap_calls: list[bool], pages: str
) -> None:
    options = {} if pages == "default" else {"max_rows_per_page": 20, "data_page_size": 256}
    root, provider = _write_parts(tmp_path, **options)
    for _ in range(5):
        with ParquetScanSession(provider) as session:
            dataset = session.dataset(sorted(root.iterdir()))
            con = connect({"orders": dataset}, SqlOptions(threads=4))
            try:
                rows = con.sql(QUERY).fetchall()
            finally:
                con.close()
        assert sorted(r[0] for r in rows) == ["Oslo", "Paris", "Rome"]
    assert unwrap_calls, "the keys were asked for"
    assert all(unwrap_calls), "a key was asked for from inside a running scan"


def test_fifty_scans_in_a_row_with_column_keys_complete(
    table_dir: tuple[Path, MemoryKeyProvider],
) -> None:
    """The run that used to hang once in a few dozen: a fresh session and scan each time,
    four DuckDB threads over four files under three named keys (the test's timeout fails it
    if it hangs)."""
    root, provider = table_dir
    files = sorted(root.iterdir())
    expected = None
    for _ in range(50):
        with ParquetScanSession(provider) as session:
            con = connect({"orders": session.dataset(files)}, SqlOptions(threads=4))
            try:
                rows = con.sql(QUERY).fetchall()
            finally:
                con.close()
        expected = expected or rows
        assert rows == expected


def test_unwrap_keys_reads_no_data_and_raises_refusals_here(
    table_dir: tuple[Path, MemoryKeyProvider],
) -> None:
    from ppml.errors import KeyAccessError

    root, provider = table_dir

    refusing = provider.sharing_keys()
    refusing.refused.add("pii")
    with ParquetScanSession(refusing) as session:
        dataset = session.dataset(sorted(root.iterdir()))
        session.unwrap_keys(dataset, ["id", "city"])
        assert sorted(refusing.unwraps) == ["geo", "sales"]
        with pytest.raises(KeyAccessError, match="policy denies pii"):
            session.unwrap_keys(dataset, ["name"])
