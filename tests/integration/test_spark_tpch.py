"""The 22 TPC-H queries through examples/spark/tpch.py (Spark SQL over ppml-encrypted Parquet),
each result checked against DuckDB over the same tables in plaintext.

TPC-H at scale 0.01 from tpchgen-cli, every table encrypted with Parquet Modular Encryption
under a key of a real workspace KMS; a real local Spark (local[2]).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from tests.support.tpch_rows import same_value, sorted_rows

pytest.importorskip("pyspark")

import duckdb
from tests.support import dev_workspace_with_keys

from ppml.data import read_table
from ppml.data.parquet import encrypt_parquet_file, is_encrypted_parquet
from ppml.kms import KeyService
from ppml.workspace import Workspace

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "spark" / "tpch.py"
PASSPHRASE = "spark tpch test passphrase 0123"
SCALE = 0.01


def _load_example() -> ModuleType:
    sys.path.insert(0, str(EXAMPLE.parent))  # its queries, tpch_queries.py, beside it
    spec = importlib.util.spec_from_file_location("ppml_example_spark_tpch", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tpch = _load_example()


def _tpchgen() -> str:
    found = shutil.which("tpchgen-cli") or str(Path(sys.executable).with_name("tpchgen-cli"))
    if not Path(found).exists():
        pytest.skip("tpchgen-cli is not installed (it comes with the dev extra)")
    return found


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dev_workspace_with_keys(
        tmp_path_factory.mktemp("ws") / "workspace", PASSPHRASE, "tpch", "results"
    )


@pytest.fixture(scope="module")
def keys(home: Path) -> Iterator[KeyService]:
    service = Workspace.open(home, PASSPHRASE.encode()).key_service()
    yield service
    service.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, keys: KeyService) -> tuple[Path, Path]:
    """(plain, encrypted): the directories of the eight tables."""
    root = tmp_path_factory.mktemp("tpch")
    plain, enc = root / "plain", root / "encrypted"
    subprocess.run(
        [_tpchgen(), "parquet", "-s", str(SCALE), "-o", str(plain)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    enc.mkdir()
    for table in tpch.TABLES:
        dst = enc / f"{table}.parquet"
        encrypt_parquet_file(plain / f"{table}.parquet", dst, keys, key_name="tpch")
        assert is_encrypted_parquet(dst)
    return plain, enc


@pytest.fixture(scope="module")
def ctx(keys: KeyService, data: tuple[Path, Path]) -> Iterator[Any]:
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    from ppml.spark import PPMLContext

    spark = (
        SparkSession.builder.master("local[2]")
        .appName("ppml-tpch-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    context = PPMLContext(spark=spark, keys=keys)
    tpch.register_tables(context, data[1])
    yield context
    spark.stop()


@pytest.fixture(scope="module")
def duck(data: tuple[Path, Path]) -> Iterator[duckdb.DuckDBPyConnection]:
    con = duckdb.connect(":memory:")
    for table in tpch.TABLES:
        path = str(data[0] / f"{table}.parquet").replace("'", "''")
        con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{path}')")
    yield con
    con.close()


def test_the_queries_read_the_encrypted_tables(ctx: Any, data: tuple[Path, Path]) -> None:
    assert tpch.scale_of(ctx) == pytest.approx(SCALE)
    assert all(is_encrypted_parquet(data[1] / f"{t}.parquet") for t in tpch.TABLES)
    # Spark's own Parquet reader, over the encrypted files (decrypted with released keys).
    files = ctx.spark.table("lineitem").inputFiles()
    assert files and all(f.startswith(data[1].as_uri()) for f in files)
    assert all(is_encrypted_parquet(Path(f.removeprefix("file://"))) for f in files)
    plan = ctx.spark.table("lineitem")._jdf.queryExecution().executedPlan().toString()
    assert "FileScan parquet" in plan


@pytest.mark.parametrize("n", range(1, 23))
def test_query_matches_duckdb(ctx: Any, duck: duckdb.DuckDBPyConnection, n: int) -> None:
    df = tpch.run_query(ctx, n, SCALE)
    got = sorted_rows([tuple(r) for r in df.collect()])
    want = sorted_rows(duck.sql(tpch.query_text(n, SCALE)).fetchall())
    assert want, f"Q{n} returns no rows at scale {SCALE}"
    assert len(got) == len(want), f"Q{n}: {len(got)} rows, DuckDB {len(want)}"
    assert len(df.columns) == len(want[0])
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert all(same_value(x, y) for x, y in zip(g, w, strict=True)), f"Q{n} row {i}: {g} != {w}"


def test_example_writes_encrypted_results(
    home: Path, keys: KeyService, data: tuple[Path, Path], tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPML_")}
    env.update(PPML_HOME=str(home), PPML_PASSPHRASE=PASSPHRASE, PYSPARK_PYTHON=sys.executable)
    out = tmp_path / "results"
    args = [str(EXAMPLE), str(data[1]), "--queries", "1,6", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, *args, "--key", "results"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("Q1 ") and line.endswith(" 4 rows") for line in lines)
    assert any(line.startswith("Q6 ") and line.endswith(" 1 rows") for line in lines)
    assert "scale 0.01" in proc.stdout
    q1 = read_table(out / "q1", keys, format="parquet")
    assert q1.num_rows == 4
    assert sorted(str(v) for v in q1.column("l_returnflag").to_pylist()) == ["A", "N", "N", "R"]
    for part in (out / "q1").iterdir():
        if not part.name.startswith(("_", ".")):
            assert is_encrypted_parquet(part)
