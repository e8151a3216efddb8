"""Encrypted Parquet through Spark's own Parquet reader, with keys the driver released.

A real local Spark started with ppml's jar (as `PPMLContext` and `ppml spark-submit` start it),
a real workspace and its KMS, and event logging on so that the test can look for keys in it.
"""

from __future__ import annotations

import base64
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("pyspark")

from tests.support import MemoryKeyProvider, dev_workspace_with_keys

from ppml.data import write_table
from ppml.data.parquet import ParquetScanSession, write_parquet
from ppml.engines.spark.jvm import KMS_CLIENT_CLASS, kms_client_jar, scan_options
from ppml.errors import KeyAccessError, UsageError
from ppml.kms import KeyService
from ppml.workspace import Workspace

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]

PASSPHRASE = "native parquet test passphrase"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyService]:
    home = dev_workspace_with_keys(
        tmp_path_factory.mktemp("ws") / "workspace", PASSPHRASE, "sales", "pii"
    )
    service = Workspace.open(home, PASSPHRASE.encode()).key_service()
    yield service
    service.close()


@pytest.fixture(scope="module")
def event_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("events")


@pytest.fixture(scope="module")
def ctx(keys: KeyService, event_dir: Path) -> Iterator[Any]:
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    from ppml.spark import PPMLContext

    spark = (
        SparkSession.builder.master("local[2]")
        .appName("ppml-native-parquet-tests")
        .config("spark.jars", str(kms_client_jar()))
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.eventLog.enabled", "true")
        .config("spark.eventLog.dir", event_dir.as_uri())
        .config("spark.eventLog.buffer.kb", "1k")
        .config("spark.eventLog.compress", "false")  # so that the test can search it
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    yield PPMLContext(spark=spark, keys=keys)
    spark.stop()


def _table(start: int, n: int) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(range(start, start + n), pa.int64()),
            "name": [f"name-{i}" for i in range(start, start + n)],
            "ssn": [f"ssn-{i:04d}" for i in range(start, start + n)],
        }
    )


def _plan(df: Any) -> str:
    return str(df._jdf.queryExecution().toString())


def _released(keys: Any, paths: list[Path]) -> dict[tuple[str, str], bytes]:
    with ParquetScanSession(keys) as session:
        for path in paths:
            session.unwrap_keys(session.dataset([path]))
        return session.released_key_encryption_keys()


def test_encrypted_parts_are_read_with_pruning_and_pushdown(
    ctx: Any, keys: KeyService, tmp_path: Path
) -> None:
    out = tmp_path / "t"
    out.mkdir()
    for i in range(3):
        write_parquet(
            _table(i * 100, 100),
            out / f"part-{i}.parquet",
            keys,
            key_name="sales",
            row_group_size=30,
        )
    df = ctx.read().parquet(out)
    assert sorted(r["id"] for r in df.collect()) == list(range(300))
    picked = df.where("id > 250").select("name")
    plan = _plan(picked)
    assert "FileScan parquet" in plan  # Spark's own reader, not the Python data source
    assert "PushedFilters: [IsNotNull(id), GreaterThan(id,250)]" in plan
    assert "ReadSchema: struct<id:bigint,name:string>" in plan  # ssn not read
    assert sorted(r["name"] for r in picked.collect()) == [f"name-{i}" for i in range(251, 300)]


def test_column_keys_and_plain_files_in_one_directory(
    ctx: Any, keys: KeyService, tmp_path: Path
) -> None:
    out = tmp_path / "mixed"
    out.mkdir()
    write_table(
        _table(0, 50), out / "a.parquet", keys, key_name="sales", column_keys={"pii": ["ssn"]}
    )
    pq.write_table(_table(50, 50), out / "b.parquet")
    df = ctx.read().parquet(out)
    rows = sorted(tuple(r) for r in df.collect())
    assert rows == sorted(tuple(r.values()) for r in _table(0, 100).to_pylist())
    assert sorted(r["ssn"] for r in df.where("id < 3").collect()) == [
        "ssn-0000",
        "ssn-0001",
        "ssn-0002",
    ]


def test_the_python_reader_reads_the_same_rows(ctx: Any, keys: KeyService, tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    write_table(_table(0, 40), path, keys, key_name="sales", column_keys={"pii": ["ssn"]})
    native = ctx.read().parquet(path)
    python = ctx.read().option("ppml.reader", "python").parquet(path)
    assert "FileScan parquet" in _plan(native)
    assert "FileScan parquet" not in _plan(python)
    assert sorted(map(tuple, native.collect())) == sorted(map(tuple, python.collect()))
    with pytest.raises(UsageError, match=r"ppml.reader"):
        ctx.read().option("ppml.reader", "jvm").parquet(path)


def test_keys_stay_out_of_plans_conf_and_the_event_log(
    ctx: Any, keys: KeyService, tmp_path: Path, event_dir: Path
) -> None:
    path = tmp_path / "secret.parquet"
    write_table(_table(0, 20), path, keys, key_name="sales", column_keys={"pii": ["ssn"]})
    df = ctx.read().parquet(path)
    assert df.count() == 20
    assert df.where("id = 3").collect()[0]["ssn"] == "ssn-0003"
    released = _released(keys, [path])
    assert len(released) == 2  # the footer's named key and the column key
    token = scan_options(released)["parquet.encryption.key.access.token"]
    forms = [token, token.split(":", 1)[1][:40]]
    for key in released.values():
        forms += [key.hex(), base64.b64encode(key).decode(), base64.urlsafe_b64encode(key).decode()]
    conf = "\n".join(f"{k}={v}" for k, v in ctx.spark.sparkContext.getConf().getAll())
    logs = "".join(p.read_text(errors="replace") for p in event_dir.rglob("*") if p.is_file())
    assert str(path) in logs  # the event log is being written and covers this scan
    for text in (_plan(df), conf, logs):
        for form in forms:
            assert form not in text


def test_a_refused_key_fails_the_read_before_spark_runs(
    ctx: Any, keys: KeyService, tmp_path: Path
) -> None:
    from ppml.spark import PPMLContext

    path = tmp_path / "k.parquet"
    write_table(_table(0, 10), path, keys, key_name="sales")
    stranger = PPMLContext(spark=ctx.spark, keys=MemoryKeyProvider())
    with pytest.raises(KeyAccessError):
        stranger.read().parquet(path)


def test_a_scan_without_the_files_keys_is_refused(
    ctx: Any, keys: KeyService, tmp_path: Path
) -> None:
    path = tmp_path / "r.parquet"
    write_table(_table(0, 10), path, keys, key_name="sales")
    other = tmp_path / "o.parquet"
    write_table(_table(0, 10), other, keys, key_name="sales")
    wrong = scan_options(_released(keys, [other]))  # another file's keys
    for options in (scan_options({}), wrong):
        with pytest.raises(Exception, match="no key was released") as info:
            ctx.spark.read.options(**options).schema("id long").parquet(str(path)).collect()
        assert options["parquet.encryption.key.access.token"] not in str(info.value)
    with pytest.raises(Exception, match="no released keys"):
        bad = {**wrong, "parquet.encryption.key.access.token": "DEFAULT"}
        ctx.spark.read.options(**bad).schema("id long").parquet(str(path)).collect()


def test_a_tampered_page_fails_the_job(ctx: Any, keys: KeyService, tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    write_parquet(
        _table(0, 2000), path, keys, key_name="sales", compression="none", row_group_size=400
    )
    data = bytearray(path.read_bytes())
    # Inside the last row groups, far from the footer and from the first row group (which the
    # driver reads a batch of when it unwraps the keys).
    data[len(data) * 4 // 5] ^= 0x01
    path.write_bytes(bytes(data))
    df = ctx.read().parquet(path)  # the footer is intact and authenticated
    with pytest.raises(Exception, match=r"(?i)tag mismatch|AEADBadTag|decrypt"):
        df.collect()


def test_the_jvm_client_refuses_what_it_was_not_given(ctx: Any) -> None:
    from py4j.protocol import Py4JJavaError

    jvm = ctx.spark.sparkContext._jvm
    conf = jvm.org.apache.hadoop.conf.Configuration(False)
    loader = jvm.org.apache.spark.util.Utils.getContextOrSparkClassLoader()
    cls = jvm.java.lang.Class.forName(KMS_CLIENT_CLASS, True, loader)
    client = cls.newInstance()
    token = scan_options({("sales", "wrapped-1"): b"\x07" * 16})[
        "parquet.encryption.key.access.token"
    ]
    for bad in ("DEFAULT", token[:-3] + "!!!", "ppml-released-v1:" + "YQ"):
        with pytest.raises(Py4JJavaError, match="KeyAccessDenied") as info:
            client.initialize(conf, "ppml", "", bad)
        assert bad not in str(info.value)
    client.initialize(conf, "ppml", "", token)
    assert bytes(client.unwrapKey("wrapped-1", "sales")) == b"\x07" * 16
    for wrapped, master in (("wrapped-1", "pii"), ("wrapped-2", "sales")):
        with pytest.raises(Py4JJavaError, match="no key was released"):
            client.unwrapKey(wrapped, master)
    with pytest.raises(Py4JJavaError, match="only reads"):
        client.wrapKey(b"\x01" * 16, "sales")
