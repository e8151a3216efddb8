"""PPMLContext end to end: a real local Spark (local[2]), a real workspace and its KMS."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

pytest.importorskip("pyspark")

from tests.support import dev_workspace_with_keys

from ppml.data import encrypt_file, read_table, write_table
from ppml.kms import KeyService
from ppml.workspace import Workspace

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]

ROOT = Path(__file__).resolve().parents[2]
PASSPHRASE = "spark test passphrase 0123"
LINES = [f"line {i} " + "word " * (i % 23) + "x" * (i % 61) for i in range(400)]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dev_workspace_with_keys(
        tmp_path_factory.mktemp("ws") / "workspace", PASSPHRASE, "sales", "pii"
    )


@pytest.fixture(scope="module")
def keys(home: Path) -> Iterator[KeyService]:
    service = Workspace.open(home, PASSPHRASE.encode()).key_service()
    yield service
    service.close()


@pytest.fixture(scope="module")
def ctx(keys: KeyService) -> Iterator[object]:
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    from ppml.spark import PPMLContext

    spark = (
        SparkSession.builder.master("local[2]")
        .appName("ppml-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    yield PPMLContext(spark=spark, keys=keys)
    spark.stop()


def _encrypt(keys: KeyService, src: Path, dst: Path, segment_size: int = 1 << 20) -> Path:
    encrypt_file(src, dst, keys, "sales", segment_size=segment_size)
    return dst


def test_importing_the_package_starts_no_java() -> None:
    code = "import ppml.engines.spark, ppml.spark, sys; print('pyspark' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "False"


def test_reads_encrypted_json_csv_text_parquet(ctx, keys: KeyService, tmp_path: Path) -> None:
    people = _encrypt(keys, ROOT / "examples/data/people.json", tmp_path / "people.json")
    df = ctx.read().json(people)
    assert df.columns == ["age", "name"]
    rows = sorted((r["name"], r["age"]) for r in df.collect())
    assert rows == [("Andy", 30), ("Justin", 19), ("Michael", None)]

    table = pa.table({"id": [1, 2, 3], "city": ["Paris", "Rome", None]})
    write_table(table, tmp_path / "t.csv", keys, key_name="sales")
    write_table(table, tmp_path / "t.parquet", keys, key_name="sales")
    csv = ctx.read().csv(tmp_path / "t.csv", header=True, inferSchema=True)
    assert sorted(tuple(r) for r in csv.collect() if r["city"]) == [(1, "Paris"), (2, "Rome")]
    plain_strings = ctx.read().csv(tmp_path / "t.csv", header=True)
    assert {f.dataType.simpleString() for f in plain_strings.schema} == {"string"}
    pq_df = ctx.read().parquet(tmp_path / "t.parquet")
    assert sorted(r["id"] for r in pq_df.collect()) == [1, 2, 3]
    text = ctx.read().text(people)
    assert text.count() == 3


def test_reads_directories_mixing_encrypted_and_plain(
    ctx, keys: KeyService, tmp_path: Path
) -> None:
    parts = tmp_path / "parts"
    parts.mkdir()
    for i in range(3):
        table = pa.table({"id": [i * 10 + j for j in range(5)]})
        write_table(table, parts / f"part-{i}.parquet", keys, key_name="sales")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [100]}), parts / "part-9.parquet")
    (parts / "_SUCCESS").write_bytes(b"")
    df = ctx.read().parquet(parts)
    assert sorted(r["id"] for r in df.collect()) == sorted(
        [i * 10 + j for i in range(3) for j in range(5)] + [100]
    )


def test_parquet_with_a_column_key(ctx, keys: KeyService, tmp_path: Path) -> None:
    table = pa.table({"id": [1, 2], "ssn": ["ssn-1", "ssn-2"]})
    path = tmp_path / "pii.parquet"
    write_table(table, path, keys, key_name="sales", column_keys={"pii": ["ssn"]})
    rows = sorted(tuple(r) for r in ctx.read().parquet(path).collect())
    assert rows == [(1, "ssn-1"), (2, "ssn-2")]


def test_large_text_split_at_segment_boundaries(ctx, keys: KeyService, tmp_path: Path) -> None:
    src = tmp_path / "big.txt"
    src.write_text("\n".join(LINES) + "\n")
    enc = _encrypt(keys, src, tmp_path / "big.txt.ppml", segment_size=64)
    for split in (64, 1000, 4096):
        df = ctx.read().text(enc, maxPartitionBytes=split)
        assert df.rdd.getNumPartitions() > 1
        assert [r["value"] for r in df.collect()] == LINES
    # No final line break; CSV split the same way.
    src.write_text("\n".join(LINES))
    enc2 = _encrypt(keys, src, tmp_path / "big2.txt.ppml", segment_size=64)
    assert [r["value"] for r in ctx.read().text(enc2, maxPartitionBytes=640).collect()] == LINES
    csv_src = tmp_path / "big.csv"
    csv_src.write_text("n,s\n" + "".join(f'{i},"v {i} {"y" * (i % 37)}"\n' for i in range(300)))
    csv_enc = _encrypt(keys, csv_src, tmp_path / "big.csv.ppml", segment_size=64)
    df = ctx.read().csv(csv_enc, header=True, inferSchema=True, maxPartitionBytes=256)
    assert df.rdd.getNumPartitions() > 5
    assert [r["n"] for r in df.collect()] == list(range(300))


def test_multiline_csv_is_read_whole(ctx, keys: KeyService, tmp_path: Path) -> None:
    src = tmp_path / "m.csv"
    src.write_text('id,note\n1,"two\nlines"\n2,plain\n')
    enc = _encrypt(keys, src, tmp_path / "m.csv.ppml", segment_size=16)
    df = ctx.read().csv(enc, header=True, multiLine=True, maxPartitionBytes=16)
    assert df.rdd.getNumPartitions() == 1
    assert [tuple(r) for r in df.collect()] == [("1", "two\nlines"), ("2", "plain")]


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet", "text"])
def test_write_then_read_table_and_decrypt(
    ctx, keys: KeyService, home: Path, tmp_path: Path, fmt: str
) -> None:
    df = ctx.spark.createDataFrame(
        [(i, f"name {i}") for i in range(50)], "id long, name string"
    ).repartition(3)
    if fmt == "text":
        df = df.select("name")
    out = tmp_path / "out"
    writer = ctx.write(df, key="sales").mode("overwrite")
    getattr(writer.option("header", True) if fmt == "csv" else writer, fmt)(out)
    files = sorted(out.iterdir())
    assert 1 <= len(files) <= 3
    table = read_table(out, keys, format=fmt)
    column = "value" if fmt == "text" else "name"
    assert sorted(table.column(column).to_pylist()) == sorted(f"name {i}" for i in range(50))
    assert not any(b"name 7" in f.read_bytes() for f in files)  # encrypted at rest
    reader = ctx.read().option("header", True) if fmt == "csv" else ctx.read()
    back = getattr(reader, fmt)(out)
    assert back.count() == 50
    if fmt != "parquet":
        env = {**os.environ, "PPML_HOME": str(home), "PPML_PASSPHRASE": PASSPHRASE}
        plain = tmp_path / "plain"
        proc = subprocess.run(
            [sys.executable, "-m", "ppml", "decrypt", str(files[0]), "-o", str(plain)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert b"name " in plain.read_bytes()


TRICKY = [
    (1, "plain", "2024-01-31", 1.5),
    (2, "comma, inside", "2023-12-01", None),
    (3, 'a "quoted" word', None, -2.25),
    (4, "", "2022-02-28", 0.0),
    (5, None, "2021-07-04", 10.0),
    (6, "semi;colon and 'single'", "2020-01-01", 3.0),
]


def _tricky(ctx):
    return (
        ctx.spark.createDataFrame(TRICKY, "id long, name string, day string, amount double")
        .selectExpr("id", "name", "to_date(day) AS day", "amount")
        .repartition(2)
    )


@pytest.mark.parametrize(
    "options",
    [
        {"header": True},
        {"header": True, "sep": ";", "quote": "'", "nullValue": "NA"},
        {"header": True, "quoteAll": True, "dateFormat": "dd/MM/yyyy"},
        {"header": False, "sep": "|", "emptyValue": "EMPTY"},
    ],
    ids=["header", "sep-quote-null", "quoteall-dateformat", "noheader-empty"],
)
def test_csv_writer_options_round_trip_as_sparks_own(
    ctx, keys: KeyService, tmp_path: Path, options: dict[str, object]
) -> None:
    """ppml's encrypted CSV written and read back with Spark's options gives the rows that
    Spark's own plain writer and reader give on the same DataFrame."""
    df = _tricky(ctx)
    read_options = {
        k: v for k, v in options.items() if k in ("header", "sep", "quote", "nullValue")
    }
    ctx.write(df, key="sales").mode("overwrite").csv(tmp_path / "enc", **options)
    ours = ctx.read().csv(tmp_path / "enc", **read_options).collect()
    df.write.mode("overwrite").csv(str(tmp_path / "plain"), **options)
    theirs = ctx.spark.read.csv(str(tmp_path / "plain"), **read_options).collect()
    assert sorted(map(tuple, ours), key=str) == sorted(map(tuple, theirs), key=str)
    assert len(ours) == len(TRICKY)
    parts = [p for p in (tmp_path / "enc").iterdir() if p.stat().st_size]
    assert parts and not any(b"comma, inside" in p.read_bytes() for p in parts)
    if options.get("header"):
        text = [line.replace('"', "") for line in _plaintext_lines(tmp_path / "enc", keys)]
        sep = str(options.get("sep", ","))
        assert text.count(sep.join(["id", "name", "day", "amount"])) == 2  # one per part


def _plaintext_lines(out: Path, keys: KeyService) -> list[str]:
    from ppml.data.files import open_encrypted

    lines: list[str] = []
    for part in sorted(p for p in out.iterdir() if not p.name.startswith(".")):
        with open_encrypted(part, keys) as fh:
            lines += fh.read().decode().splitlines()
    return lines


def test_csv_written_by_ppml_reads_in_every_ppml_reader(
    ctx, keys: KeyService, tmp_path: Path
) -> None:
    """The CSV quoting is RFC 4180 (a quote doubled): pyarrow, pandas, DuckDB read it as is."""
    ctx.write(_tricky(ctx), key="sales").csv(tmp_path / "enc", header=True)
    table = read_table(tmp_path / "enc", keys, format="csv")
    names = sorted(n for n in table.column("name").to_pylist() if n)
    assert names == sorted(r[1] for r in TRICKY if r[1])


def test_json_writer_options_as_sparks(ctx, keys: KeyService, tmp_path: Path) -> None:
    df = _tricky(ctx)
    ctx.write(df, key="sales").format("json").save(tmp_path / "default")
    ctx.write(df, key="sales").json(tmp_path / "nulls", ignoreNullFields=False,
                                    dateFormat="yyyy/MM/dd")  # fmt: skip
    default = _plaintext_lines(tmp_path / "default", keys)
    nulls = _plaintext_lines(tmp_path / "nulls", keys)
    df.write.json(str(tmp_path / "plain"))
    plain = sorted(p.read_text() for p in (tmp_path / "plain").glob("part-*.json"))
    assert sorted(default) == sorted("".join(plain).splitlines())
    assert any('"name":null' in line for line in nulls)
    assert any('"day":"2024/01/31"' in line for line in nulls)
    assert not any("null" in line for line in default)
    back = ctx.read().json(tmp_path / "default").collect()
    assert sorted(r["id"] for r in back) == [r[0] for r in TRICKY]


def test_parquet_compression_choice(ctx, keys: KeyService, tmp_path: Path) -> None:
    df = ctx.spark.range(20000).selectExpr("id", "repeat('abc', 20) AS s").coalesce(1)
    sizes = {}
    for codec in ("none", "zstd", "gzip"):
        out = tmp_path / codec
        ctx.write(df, key="sales").parquet(out, compression=codec)
        sizes[codec] = sum(p.stat().st_size for p in out.iterdir())
        assert ctx.read().parquet(out).count() == 20000
    assert sizes["zstd"] < sizes["none"] / 2 and sizes["gzip"] < sizes["none"] / 2


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda w, p: w.mode("sometimes").csv(p), "unknown save mode: sometimes"),
        (lambda w, p: w.csv(p, heder=True), "unknown csv writer option(s) heder"),
        (lambda w, p: w.option("compresion", "gzip").parquet(p), "compresion"),
        (lambda w, p: w.csv(p, compression="gzip"), "not compressed"),
        (lambda w, p: w.json(p, encoding="latin1"), "UTF-8 only"),
        (lambda w, p: w.parquet(p, compression="rar"), "Codec [rar] is not available"),
        (lambda w, p: w.format("orc").save(p), "unknown format 'orc'"),
        (lambda w, p: w.save(p), "no format"),
        (lambda w, p: w.json(p, lineSep="\r\n"), "lineSep"),
    ],
    ids=[
        "mode",
        "option",
        "parquet-option",
        "csv-codec",
        "encoding",
        "parquet-codec",
        "format",
        "no-format",
        "linesep",
    ],
)
def test_bad_writer_settings_are_refused_before_anything_is_written(
    ctx, tmp_path: Path, call, message: str
) -> None:
    from ppml.errors import UsageError

    out = tmp_path / "out"
    with pytest.raises(UsageError) as err:
        call(ctx.write(_tricky(ctx), key="sales"), out)
    assert message in str(err.value)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


REGIONS = [
    (i, f"name {i}", ["EU", "US", "A/B=C"][i % 3] if i % 7 else None, i % 2 == 0) for i in range(60)
]


@pytest.mark.parametrize("fmt", ["parquet", "csv", "json"])
def test_partition_by_writes_directories_read_back_like_sparks(
    ctx, keys: KeyService, tmp_path: Path, fmt: str
) -> None:
    """`partitionBy`: encrypted parts under ``col=value/`` (Spark's names, escaping and null
    directory), each under its own fresh data key; ppml's reader finds the partition columns,
    as Spark's own writer and reader do on the same DataFrame."""
    from ppml.data import read_stream_header

    df = ctx.spark.createDataFrame(REGIONS, "id long, name string, region string, even boolean")
    df = df.repartition(3)
    enc, plain = tmp_path / "enc", tmp_path / "plain"
    options = {"header": True} if fmt == "csv" else {}
    ctx.write(df, key="sales").partitionBy("region", "even").options(**options).save(
        enc, format=fmt
    )
    df.write.partitionBy("region", "even").options(**options).format(fmt).save(str(plain))
    ours = {p.relative_to(enc).parent for p in enc.rglob("part-*")}
    theirs = {p.relative_to(plain).parent for p in plain.rglob("part-*")}
    assert ours == theirs
    assert Path("region=A%2FB%3DC/even=true") in ours
    assert Path("region=__HIVE_DEFAULT_PARTITION__/even=false") in ours
    reader = ctx.read().options(**options)
    back = getattr(reader, fmt)(enc)
    expected = getattr(ctx.spark.read.options(**options), fmt)(str(plain))
    assert sorted(back.columns) == sorted(expected.columns)
    cols = ["id", "name", "region", "even"]
    assert sorted(map(tuple, back.select(*cols).collect()), key=str) == sorted(
        map(tuple, expected.select(*cols).collect()), key=str
    )
    assert back.where("region = 'EU'").count() == sum(1 for r in REGIONS if r[2] == "EU")
    if fmt == "parquet":  # and through ppml's Python reader (sessions without ppml's jar)
        python = ctx.read().option("ppml.reader", "python").parquet(enc).select(*cols)
        assert sorted(map(tuple, python.collect()), key=str) == sorted(
            map(tuple, expected.select(*cols).collect()), key=str
        )
    files = sorted(enc.rglob("part-*"))
    assert not any(b"name 1" in f.read_bytes() for f in files)
    if fmt != "parquet":
        wrapped = {read_stream_header(f)[0].wrapped for f in files}
        assert len(wrapped) == len(files), "a data key was used twice"


def test_partition_by_append_and_bad_columns(ctx, tmp_path: Path) -> None:
    from ppml.errors import UsageError

    df = ctx.spark.createDataFrame(REGIONS, "id long, name string, region string, even boolean")
    out = tmp_path / "out"
    ctx.write(df, key="sales").partitionBy("region").parquet(out)
    ctx.write(df, key="sales").mode("append").parquet(out, partitionBy="region")
    assert ctx.read().parquet(out).count() == 2 * len(REGIONS)
    for cols, message in (
        (("nope",), "partition column `nope` not found"),
        (("id", "name", "region", "even"), "cannot use all columns"),
    ):
        with pytest.raises(UsageError, match=message):
            ctx.write(df, key="sales").partitionBy(*cols)
    floats = ctx.spark.createDataFrame([(1.5, "a")], "x double, y string")
    with pytest.raises(UsageError, match="partitionBy takes string"):
        ctx.write(floats, key="sales").partitionBy("x")


def test_write_mode_error_refuses_existing_output(ctx, keys: KeyService, tmp_path: Path) -> None:
    from ppml.errors import OutputExists

    out = tmp_path / "exists"
    out.mkdir()
    df = ctx.spark.createDataFrame([(1,)], "id long")
    with pytest.raises(OutputExists):
        ctx.write(df, key="sales").json(out)


def test_tampered_file_fails_with_integrity_error(ctx, keys: KeyService, tmp_path: Path) -> None:
    src = tmp_path / "t.txt"
    src.write_text("\n".join(LINES) + "\n")
    enc = _encrypt(keys, src, tmp_path / "t.txt.ppml", segment_size=64)
    data = bytearray(enc.read_bytes())
    data[len(data) // 2] ^= 1
    enc.write_bytes(bytes(data))
    with pytest.raises(Exception, match="integrity check failed"):
        ctx.read().text(enc, maxPartitionBytes=512).collect()


def test_partitions_do_not_show_keys(ctx, keys: KeyService, tmp_path: Path) -> None:
    from ppml.engines.spark.datasource import ReleasedKey, StreamPartition

    enc = _encrypt(keys, ROOT / "examples/data/people.json", tmp_path / "p.json")
    from ppml.data import read_stream_header

    header, _ = read_stream_header(enc)
    secret = keys.unwrap(header.wrapped)
    part = StreamPartition(str(enc), 0, 10, ReleasedKey(header.wrapped, secret))
    assert secret.hex() not in repr(part) and repr(secret) not in repr(part)
    assert "plaintext" not in repr(part.key)


def _run_example(home: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPML_")}
    env.update(PPML_HOME=str(home), PPML_PASSPHRASE=PASSPHRASE, PYSPARK_PYTHON=sys.executable)
    proc = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_example_wordcount(keys: KeyService, home: Path, tmp_path: Path) -> None:
    src = tmp_path / "words.txt"
    src.write_text("the cat\nthe dog the end\n")
    enc = _encrypt(keys, src, tmp_path / "words.txt.ppml")
    out = _run_example(home, "examples/spark/wordcount.py", str(enc))
    assert out.splitlines()[0] == "the: 3"
    assert "cat: 1" in out


def test_example_sql_basic(keys: KeyService, home: Path, tmp_path: Path) -> None:
    enc = _encrypt(keys, ROOT / "examples/data/people.json", tmp_path / "people.json.ppml")
    out = _run_example(home, "examples/spark/sql_basic.py", str(enc))
    assert "|  19| Justin|" in out  # df.show()
    assert "|-- age: long (nullable = true)" in out
    assert "(age + 1)" in out
    assert "| 30|Andy|" in out  # filter age > 21
    assert "| 19|Justin|" in out  # the SQL query
    assert "Michael" in out


def test_a_session_started_without_the_jar_reads_parquet_with_sparks_reader(
    ctx, keys: KeyService, tmp_path: Path
) -> None:
    # This module's session was built without spark.jars: PPMLContext adds the jar at run time.
    path = tmp_path / "late.parquet"
    write_table(pa.table({"id": [1, 2, 3]}), path, keys, key_name="sales")
    df = ctx.read().parquet(path)
    assert "FileScan parquet" in str(df._jdf.queryExecution().toString())
    assert sorted(r["id"] for r in df.where("id > 1").collect()) == [2, 3]
