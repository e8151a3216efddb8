#!/usr/bin/env bash
# Build src/ppml/engines/flink/jars/ppml-flink.jar from jvm/flink/ with a JDK 17+ (javac, jar) and
# the jars of the Flink distribution that PyFlink installs ($PPML_FLINK_PYTHON, else `python`,
# must have apache-flink). The jar records the SHA-256 of its sources, which a test compares with
# jvm/flink/ so that a stale jar is caught; the same sources give the same jar.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PPML_FLINK_PYTHON:-python}"
jars="$("$python" -c 'import pathlib, pyflink; print(pathlib.Path(pyflink.__file__).parent / "lib")')"
out="$root/src/ppml/engines/flink/jars/ppml-flink.jar"
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
mapfile -t sources < <(cd "$root" && find jvm/flink/src/main/java -name '*.java' | LC_ALL=C sort)
digest="$(cd "$root" && "$python" -c '
import hashlib, sys
h = hashlib.sha256()
for p in sys.argv[1:]:
    h.update(p.encode() + b"\0" + open(p, "rb").read())
print(h.hexdigest())' "${sources[@]}")"
(cd "$root" && javac --release 17 -nowarn -cp "$jars/*" -d "$build/classes" "${sources[@]}")
printf 'Ppml-Source-SHA256: %s\n' "$digest" > "$build/manifest.txt"
mkdir -p "$(dirname "$out")"
find "$build/classes" -exec touch -d '2026-01-01T00:00:00Z' {} +
jar --create --file "$build/ppml-flink.jar" --manifest "$build/manifest.txt" --date 2026-01-01T00:00:00Z -C "$build/classes" .
mv "$build/ppml-flink.jar" "$out"
echo "wrote $out (sources sha256 $digest)"
