"""Hive-style partition directories: names as Spark writes them, values as Spark discovers them."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from ppml.engines.spark.partitioning import NULL_PARTITION, discover, partition_dir
from ppml.errors import UsageError


def test_partition_dir_escapes_as_spark_and_names_null() -> None:
    assert partition_dir(["region"], ["A/B=C"]) == "region=A%2FB%3DC"
    assert partition_dir(["a", "b"], [None, ""]) == f"a={NULL_PARTITION}/b={NULL_PARTITION}"
    assert partition_dir(["d", "f"], [dt.date(2024, 1, 31), True]) == "d=2024-01-31/f=true"
    assert partition_dir(["x:y"], ["50%"]) == "x%3Ay=50%25"


def test_discover_round_trips_values_with_spark_types(tmp_path: Path) -> None:
    values = [("A/B=C", 1, dt.date(2024, 1, 2)), (None, 3_000_000_000, dt.date(2023, 5, 6))]
    files = []
    for region, n, day in values:
        d = tmp_path / partition_dir(["region", "n", "day"], [region, n, day])
        d.mkdir(parents=True)
        (d / "part-0.csv").write_text("x\n")
        files.append(d / "part-0.csv")
    found = discover([tmp_path], files)
    assert found is not None
    assert found.names == ("region", "n", "day") and found.types == ("string", "long", "date")
    assert [found.values[f] for f in files] == values


def test_no_partitions_and_conflicting_layouts(tmp_path: Path) -> None:
    (tmp_path / "a=1").mkdir()
    (tmp_path / "b=2").mkdir()
    plain, one, other = tmp_path / "p.csv", tmp_path / "a=1" / "p.csv", tmp_path / "b=2" / "p.csv"
    for f in (plain, one, other):
        f.write_text("x\n")
    assert discover([tmp_path], [plain]) is None
    with pytest.raises(UsageError, match="conflicting partition directory layouts"):
        discover([tmp_path], [one, other])
