#!/usr/bin/env bash
# Build src/ppml/engines/spark/jars/ppml-spark.jar from jvm/ with a JDK 17+ (javac, jar) and the
# Parquet and Hadoop classes of the installed pyspark. The jar records the SHA-256 of its sources,
# which a test compares with jvm/ so that a stale jar is caught.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python}"
jars="$("$python" -c 'import pathlib, pyspark; print(pathlib.Path(pyspark.__file__).parent / "jars")')"
out="$root/src/ppml/engines/spark/jars/ppml-spark.jar"
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
mapfile -t sources < <(cd "$root" && find jvm/src/main/java -name '*.java' | LC_ALL=C sort)
digest="$(cd "$root" && "$python" -c '
import hashlib, sys
h = hashlib.sha256()
for p in sys.argv[1:]:
    h.update(p.encode() + b"\0" + open(p, "rb").read())
print(h.hexdigest())' "${sources[@]}")"
(cd "$root" && javac --release 17 -nowarn -cp "$jars/*" -d "$build/classes" "${sources[@]}")
printf 'Ppml-Source-SHA256: %s\n' "$digest" > "$build/manifest.txt"
mkdir -p "$(dirname "$out")"
# Fixed timestamps so that the same sources give the same jar.
find "$build/classes" -exec touch -d '2026-01-01T00:00:00Z' {} +
jar --create --file "$build/ppml-spark.jar" --manifest "$build/manifest.txt" --date 2026-01-01T00:00:00Z -C "$build/classes" .
mv "$build/ppml-spark.jar" "$out"
echo "wrote $out (sources sha256 $digest)"
