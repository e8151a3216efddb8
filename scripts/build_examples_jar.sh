#!/usr/bin/env bash
# Build examples/spark/java/spark-examples.jar (the Java examples for `ppml spark-submit
# --class ...`) from examples/spark/java/ with a JDK 17+ and the jars of the installed pyspark,
# by the same reproducible recipe as ppml's own jars (_jar.sh).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python}"
source "$root/scripts/_jar.sh"
jars="$("$python" -c 'import pathlib, pyspark; print(pathlib.Path(pyspark.__file__).parent / "jars")')"
build_jar examples/spark/java/src/main/java "$jars/*" "$root/examples/spark/java/spark-examples.jar"
