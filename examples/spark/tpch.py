"""The 22 TPC-H queries with Spark SQL over encrypted Parquet.

    python examples/spark/tpch.py DATA_DIR [--queries 1,6,18] [--scale SF] [--out DIR --key NAME]

DATA_DIR holds the eight TPC-H tables as ``<table>.parquet`` (a file or a directory of part
files), each encrypted with Parquet Modular Encryption (``ppml encrypt lineitem.parquet -o
enc/lineitem.parquet --key tpch``) or plain. Every table is read through `PPMLContext` and
registered as a temporary view; the queries (`tpch_queries.py` beside this script, the
specification's validation parameters, measured with it as a local import) run with Spark SQL.
Prints each query's time and row count; with ``--out DIR --key NAME`` each result is written
encrypted under the key NAME to ``DIR/qN``.

Keys come by policy under ``ppml spark-submit --tee sim``, or from the workspace
(``$PPML_HOME``, ``$PPML_PASSPHRASE``) when the script runs in your own Python. Q11's threshold
depends on the scale factor: ``--scale``, or read from the supplier table (10,000 suppliers per
unit of scale).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tpch_queries import query_text

from ppml.spark import PPMLContext

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

TABLES = ("region", "nation", "supplier", "customer", "part", "partsupp", "orders", "lineitem")
# The specification's column types. Giving them spares reading every footer for a schema, and
# tpchgen-cli's files declare their strings as Arrow string_view, which Spark's Arrow conversion
# does not take (the scan casts the columns to these types).
SCHEMAS = {
    "region": "r_regionkey BIGINT, r_name STRING, r_comment STRING",
    "nation": "n_nationkey BIGINT, n_name STRING, n_regionkey BIGINT, n_comment STRING",
    "supplier": "s_suppkey BIGINT, s_name STRING, s_address STRING, s_nationkey BIGINT, "
    "s_phone STRING, s_acctbal DECIMAL(15,2), s_comment STRING",
    "customer": "c_custkey BIGINT, c_name STRING, c_address STRING, c_nationkey BIGINT, "
    "c_phone STRING, c_acctbal DECIMAL(15,2), c_mktsegment STRING, c_comment STRING",
    "part": "p_partkey BIGINT, p_name STRING, p_mfgr STRING, p_brand STRING, p_type STRING, "
    "p_size INT, p_container STRING, p_retailprice DECIMAL(15,2), p_comment STRING",
    "partsupp": "ps_partkey BIGINT, ps_suppkey BIGINT, ps_availqty INT, "
    "ps_supplycost DECIMAL(15,2), ps_comment STRING",
    "orders": "o_orderkey BIGINT, o_custkey BIGINT, o_orderstatus STRING, "
    "o_totalprice DECIMAL(15,2), o_orderdate DATE, o_orderpriority STRING, o_clerk STRING, "
    "o_shippriority INT, o_comment STRING",
    "lineitem": "l_orderkey BIGINT, l_partkey BIGINT, l_suppkey BIGINT, l_linenumber INT, "
    "l_quantity DECIMAL(15,2), l_extendedprice DECIMAL(15,2), l_discount DECIMAL(15,2), "
    "l_tax DECIMAL(15,2), l_returnflag STRING, l_linestatus STRING, l_shipdate DATE, "
    "l_commitdate DATE, l_receiptdate DATE, l_shipinstruct STRING, l_shipmode STRING, "
    "l_comment STRING",
}


def register_tables(
    ctx: PPMLContext, data_dir: Path, *, reader: str = "auto"
) -> dict[str, DataFrame]:
    """Read the eight tables (encrypted or plain) and register each as a temporary view.

    `reader` is ppml's Parquet reader: ``auto`` (Spark's own when the session has ppml's jar),
    ``spark`` or ``python``.
    """
    frames: dict[str, DataFrame] = {}
    for table in TABLES:
        read = ctx.read().option("ppml.reader", reader).schema(SCHEMAS[table])
        df = read.parquet(data_dir / f"{table}.parquet")
        df.createOrReplaceTempView(table)
        frames[table] = df
    return frames


def scale_of(ctx: PPMLContext) -> float:
    """The scale factor, from the registered supplier table."""
    suppliers = ctx.spark.table("supplier").count()
    return max(suppliers, 1) / 10_000


def run_query(ctx: PPMLContext, n: int, scale: float) -> DataFrame:
    """Query `n` over the registered views (a lazy DataFrame)."""
    return ctx.spark.sql(query_text(n, scale))


def parse_queries(text: str) -> list[int]:
    numbers = [int(q) for q in text.split(",") if q.strip()] or list(range(1, 23))
    for n in numbers:
        if not 1 <= n <= 22:
            raise argparse.ArgumentTypeError(f"no TPC-H query {n}")
    return numbers


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path, help="directory of <table>.parquet")
    parser.add_argument("--queries", default="", help="comma-separated numbers (default: all)")
    parser.add_argument("--scale", type=float, default=None, help="scale factor (for Q11)")
    parser.add_argument("--out", type=Path, default=None, help="write each result to OUT/qN")
    parser.add_argument("--key", default=None, help="the key for --out")
    args = parser.parse_args(argv)
    try:
        numbers = parse_queries(args.queries)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(str(exc))
    if (args.out is None) != (args.key is None):
        parser.error("--out and --key go together")

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    ctx = PPMLContext(app_name="tpch")
    try:
        start = time.perf_counter()
        register_tables(ctx, args.data_dir)
        scale = args.scale if args.scale is not None else scale_of(ctx)
        print(f"tables registered in {time.perf_counter() - start:.2f} s (scale {scale:g})")
        total = 0.0
        for n in numbers:
            start = time.perf_counter()
            df = run_query(ctx, n, scale)
            if args.out is None:
                rows = len(df.collect())
            else:
                df = df.cache()
                rows = df.count()
                ctx.write(df, key=args.key).mode("overwrite").parquet(args.out / f"q{n}")
                df.unpersist()
            elapsed = time.perf_counter() - start
            total += elapsed
            print(f"Q{n:<2} {elapsed:8.3f} s  {rows} rows")
        print(f"total {total:7.3f} s")
    finally:
        ctx.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
