"""PPMLWriter against Spark's own writer, in the same session: encrypted CSV, JSON lines and
Parquet parts against Spark's plain ones of the same DataFrame, and each read back.

    python benchmarks/spark_writer.py [--rows 1000000] [--repeat 3] [--dir DIR]

One local[2] session; the DataFrame (id, name, amount, day, region) is cached before timing so
that both writers start from the same rows. ppml's CSV and JSON lines are made by Spark
(``to_csv``/``to_json``) and encrypted in Python workers; Parquet is written by pyarrow with PME.
Ends with ``RESULT spark_writer write_ratio=... read_ratio=...`` (geometric means over the
formats of ppml / plain, best of `--repeat` each).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

PASSPHRASE = "benchmark passphrase 0123"


def best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--no-header", dest="header", action="store_false", help="CSV without")
    args = parser.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    from ppml.kms import KeyService
    from ppml.spark import PPMLContext
    from ppml.workspace import Workspace

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="spark-writer-") as tmp:
        work = Path(tmp)
        ws = Workspace.create(work / "ws", PASSPHRASE.encode(), dev=True)
        keys: KeyService = ws.key_service()
        keys.create_key("bench")
        spark = (
            SparkSession.builder.master("local[2]")
            .appName("spark_writer")
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.sql.shuffle.partitions", "2")
            .getOrCreate()
        )
        spark.sparkContext.setLogLevel("ERROR")
        ctx = PPMLContext(spark=spark, keys=keys)
        df = spark.range(args.rows, numPartitions=4).selectExpr(
            "id",
            "concat('name ', id) AS name",
            "id * 1.25 AS amount",
            "date_add(date'2024-01-01', cast(id % 365 AS int)) AS day",
            "array('EU', 'US', 'APAC')[cast(id % 3 AS int)] AS region",
        )
        df = df.cache()
        df.count()
        write_ratios, read_ratios = [], []
        print(f"{args.rows:,} rows, best of {args.repeat}")
        print(f"{'format':8} {'plain w':>9} {'ppml w':>9} {'ratio':>6}   "
              f"{'plain r':>9} {'ppml r':>9} {'ratio':>6}")  # fmt: skip
        for fmt in ("csv", "json", "parquet"):
            plain, enc = work / f"plain-{fmt}", work / f"enc-{fmt}"
            options = {"header": args.header} if fmt == "csv" else {}

            def write_plain(fmt: str = fmt, plain: Path = plain, options: dict = options) -> None:
                shutil.rmtree(plain, ignore_errors=True)
                df.write.options(**options).format(fmt).save(str(plain))

            def write_enc(fmt: str = fmt, enc: Path = enc, options: dict = options) -> None:
                ctx.write(df, key="bench").mode("overwrite").options(**options).save(enc, fmt)

            w_plain, w_enc = best(write_plain, args.repeat), best(write_enc, args.repeat)
            r_plain = best(
                lambda fmt=fmt, plain=plain, options=options: getattr(
                    spark.read.options(**options), fmt
                )(str(plain)).count(),
                args.repeat,
            )
            r_enc = best(
                lambda fmt=fmt, enc=enc, options=options: getattr(
                    ctx.read().options(**options), fmt
                )(enc).count(),
                args.repeat,
            )
            write_ratios.append(w_enc / w_plain)
            read_ratios.append(r_enc / r_plain)
            print(f"{fmt:8} {w_plain:8.2f}s {w_enc:8.2f}s {w_enc / w_plain:6.2f}   "
                  f"{r_plain:8.2f}s {r_enc:8.2f}s {r_enc / r_plain:6.2f}")  # fmt: skip
        spark.stop()
        keys.close()
    write = math.exp(sum(map(math.log, write_ratios)) / len(write_ratios))
    read = math.exp(sum(map(math.log, read_ratios)) / len(read_ratios))
    print(f"RESULT spark_writer write_ratio={write:.3f} read_ratio={read:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
