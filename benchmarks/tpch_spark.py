"""TPC-H with Spark SQL: plaintext Parquet against ppml-encrypted Parquet, in one session.

Generates the TPC-H tables with `tpchgen-cli` (Parquet), encrypts every table with Parquet
Modular Encryption under a key of a real workspace KMS, then runs the 22 TPC-H queries
(examples/spark/tpch_queries.py) two ways, interleaved, in the same SparkSession:

  (a) plain: Spark's own Parquet reader over plaintext twins of the encrypted files (the same
             row groups and writer settings, decrypted: ``spark.read.parquet``);
  (b) ppml:  `PPMLContext` over the encrypted files (``ctx.read().parquet``), as
             examples/spark/tpch.py runs them. With ``--reader spark`` (the default) Spark's own
             Parquet reader decrypts, with the keys the driver released for exactly these files;
             with ``--reader python`` ppml's Python data source reads each row group.

Before each run the eight temporary views are pointed at that way's tables; each run collects
the result. One untimed scan of lineitem per way warms the JVM up first. Results of (a) and (b)
are compared. Prints per-query best times and the ratios.

    pip install tpchgen-cli
    python benchmarks/tpch_spark.py [--sf 1] [--repeat 1] [--dir DIR] [--queries 1,6,18]
"""

from __future__ import annotations

import argparse
import decimal
import importlib.util
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from tpch_data import benchmark_workspace, encrypt_tables, generate_under, plaintext_twins

ROOT = Path(__file__).resolve().parents[1]


def load_example() -> ModuleType:
    path = ROOT / "examples" / "spark" / "tpch.py"
    sys.path.insert(0, str(path.parent))  # its queries, tpch_queries.py, beside it
    spec = importlib.util.spec_from_file_location("ppml_example_spark_tpch", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tpch = load_example()


def normalized(rows: list[Any]) -> list[tuple[Any, ...]]:
    def value(v: Any) -> Any:
        return float(v) if isinstance(v, decimal.Decimal) else v

    return [tuple(value(v) for v in row) for row in rows]


def same_result(a: list[tuple[Any, ...]], b: list[tuple[Any, ...]]) -> bool:
    """Equal rows, in order (every query orders its output or returns one row)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        for u, v in zip(x, y, strict=True):
            if isinstance(u, float) and isinstance(v, float):
                if not math.isclose(u, v, rel_tol=1e-9, abs_tol=1e-9):
                    return False
            elif u != v:
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sf", type=float, default=1.0, help="TPC-H scale factor")
    parser.add_argument("--repeat", type=int, default=1, help="runs per query and way (best)")
    parser.add_argument("--dir", type=Path, help="data directory (kept; default: a temp dir)")
    parser.add_argument("--queries", default="", help="comma-separated query numbers")
    parser.add_argument("--master", default="local[*]", help="Spark master")
    parser.add_argument(
        "--reader",
        choices=["spark", "python"],
        default="spark",
        help="ppml's Parquet reader: Spark's own (JVM, keys released by the driver) or the "
        "Python data source",
    )
    parser.add_argument("--driver-memory", default="4g", help="spark.driver.memory")
    parser.add_argument(
        "--shuffle-partitions", type=int, default=None, help="spark.sql.shuffle.partitions"
    )
    args = parser.parse_args()

    numbers = tpch.parse_queries(args.queries)
    temp = None
    if args.dir is None:
        temp = tempfile.TemporaryDirectory(prefix="ppml-tpch-spark-")
        root = Path(temp.name)
    else:
        root = args.dir
    try:
        plain, enc = generate_under(root, args.sf)

        ws = benchmark_workspace(root)
        with ws.key_service() as kms:
            encrypt_tables(plain, enc, kms)
            twins = root / f"sf{args.sf:g}" / "twins"
            plaintext_twins(enc, twins, kms)
            run(args, numbers, twins, enc, kms)
    finally:
        if temp is not None:
            temp.cleanup()


def run(args: argparse.Namespace, numbers: list[int], plain: Path, enc: Path, kms: Any) -> None:
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    import pyspark
    from pyspark.sql import SparkSession

    from ppml.engines.spark.jvm import kms_client_jar
    from ppml.spark import PPMLContext

    builder = (
        SparkSession.builder.master(args.master)
        .appName("ppml-tpch-benchmark")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.memory", args.driver_memory)
        .config("spark.jars", str(kms_client_jar()))
    )
    if args.shuffle_partitions is not None:
        builder = builder.config("spark.sql.shuffle.partitions", str(args.shuffle_partitions))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    try:
        ctx = PPMLContext(spark=spark, keys=kms)
        start = time.perf_counter()
        plain_frames = {t: spark.read.parquet(str(plain / f"{t}.parquet")) for t in tpch.TABLES}
        middle = time.perf_counter()
        ways = {"plain": plain_frames, "ppml": tpch.register_tables(ctx, enc, reader=args.reader)}
        end = time.perf_counter()
        print(
            f"planned the reads in {end - start:.1f} s: plaintext {middle - start:.1f} s "
            f"(the session's first reads), encrypted {end - middle:.1f} s"
        )
        for frames in ways.values():  # warm-up, untimed
            frames["lineitem"].selectExpr("count(*)", "sum(l_quantity)").collect()
        print(
            f"cores: {os.cpu_count()}, master {args.master}, pyspark {pyspark.__version__}, "
            f"best of {args.repeat}\n"
        )
        print(f"{'query':>5} {'(a) plain':>10} {'(b) ppml':>10} {'b/a':>6}  rows")
        totals = [0.0, 0.0]
        mismatches = []
        for n in numbers:
            sql = tpch.query_text(n, args.sf)
            times: dict[str, list[float]] = {"plain": [], "ppml": []}
            results: dict[str, list[tuple[Any, ...]]] = {}
            for _ in range(args.repeat):  # interleaved, one run of each per round
                for way, frames in ways.items():
                    for name, df in frames.items():
                        df.createOrReplaceTempView(name)
                    begin = time.perf_counter()
                    rows = spark.sql(sql).collect()
                    times[way].append(time.perf_counter() - begin)
                    results[way] = normalized(rows)
            if not same_result(results["plain"], results["ppml"]):
                mismatches.append(n)
            a, b = min(times["plain"]), min(times["ppml"])
            totals = [totals[0] + a, totals[1] + b]
            rows_a = len(results["plain"])
            print(f"{'Q' + str(n):>5} {a:>9.3f}s {b:>9.3f}s {b / a:>6.2f}  {rows_a}", flush=True)
        a, b = totals
        print(f"{'total':>5} {a:>9.3f}s {b:>9.3f}s {b / a:>6.2f}")
        print(f"\ntotal ratio (b) ppml / (a) plain Spark: {b / a:.2f}x")
        if mismatches:
            print(f"RESULTS DIFFER for queries: {mismatches}")
            sys.exit(1)
        print("results of (a) and (b) are identical for every query")
        # The headline ratio, for benchmarks/run.py (lower is better).
        print(f"RESULT tpch_spark total_ratio={b / a:.3f}")
    finally:
        spark.stop()


if __name__ == "__main__":
    main()
