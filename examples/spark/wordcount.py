"""Word count over an encrypted text file: ``python examples/spark/wordcount.py INPUT``.

INPUT is a text file (or a directory of them), encrypted with `ppml encrypt` or plain. The keys
come from `ppml run` / `ppml spark-submit`, else from the workspace ($PPML_HOME, $PPML_PASSPHRASE).
"""

from __future__ import annotations

import sys

from pyspark.sql import functions as F

from ppml.spark import PPMLContext


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: wordcount.py INPUT", file=sys.stderr)
        return 2
    ctx = PPMLContext(app_name="wordcount")
    try:
        lines = ctx.read().text(argv[0])
        words = lines.select(F.explode(F.split(F.col("value"), r"\s+")).alias("word"))
        counts = words.where(F.col("word") != "").groupBy("word").count()
        for row in counts.orderBy(F.desc("count"), "word").collect():
            print(f"{row['word']}: {row['count']}")
    finally:
        ctx.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
