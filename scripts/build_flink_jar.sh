#!/usr/bin/env bash
# Build src/ppml/engines/flink/jars/ppml-flink.jar from jvm/flink/ with a JDK 17+ (javac, jar) and
# the jars of the Flink distribution that PyFlink installs ($PPML_FLINK_PYTHON, else `python`,
# must have apache-flink; see _jar.sh for the reproducible recipe).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PPML_FLINK_PYTHON:-python}"
source "$root/scripts/_jar.sh"
jars="$("$python" -c 'import pathlib, pyflink; print(pathlib.Path(pyflink.__file__).parent / "lib")')"
build_jar jvm/flink/src/main/java "$jars/*" "$root/src/ppml/engines/flink/jars/ppml-flink.jar"
