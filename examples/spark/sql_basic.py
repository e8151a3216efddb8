"""The Spark SQL tour over an encrypted people.json: ``python examples/spark/sql_basic.py [INPUT]``.

INPUT defaults to examples/data/people.json (plain); give the encrypted copy made with
``ppml encrypt examples/data/people.json -o people.json.ppml --key KEY``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ppml.spark import PPMLContext

DEFAULT_INPUT = Path(__file__).resolve().parent.parent / "data" / "people.json"


def main(argv: list[str]) -> int:
    path = argv[0] if argv else str(DEFAULT_INPUT)
    ctx = PPMLContext(app_name="sql-basic")
    try:
        df = ctx.read().json(path)
        df.show()
        df.printSchema()
        df.select("name").show()
        df.select(df["name"], df["age"] + 1).show()
        df.filter(df["age"] > 21).show()
        df.groupBy("age").count().orderBy("age").show()
        df.createOrReplaceTempView("people")
        ctx.spark.sql("SELECT * FROM people WHERE age BETWEEN 13 AND 19").show()
    finally:
        ctx.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
