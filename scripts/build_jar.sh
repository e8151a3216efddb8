#!/usr/bin/env bash
# Build src/ppml/engines/spark/jars/ppml-spark.jar from jvm/ with a JDK 17+ (javac, jar) and the
# Parquet and Hadoop classes of the installed pyspark (see _jar.sh for the reproducible recipe).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python}"
source "$root/scripts/_jar.sh"
jars="$("$python" -c 'import pathlib, pyspark; print(pathlib.Path(pyspark.__file__).parent / "jars")')"
build_jar jvm/src/main/java "$jars/*" "$root/src/ppml/engines/spark/jars/ppml-spark.jar"
