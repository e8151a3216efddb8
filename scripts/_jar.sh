# Sourced by build_jar.sh and build_flink_jar.sh: `build_jar SOURCES CLASSPATH OUT` compiles the
# Java files below SOURCES (a directory relative to the repository) with a JDK 17+ against
# CLASSPATH into the jar OUT. The jar records the SHA-256 of its sources (relative paths in byte
# order, each "path NUL content"), which a test compares with the sources so that a stale jar is
# caught; fixed timestamps make the same sources give the same jar.
build_jar() {
    local sources_dir="$1" classpath="$2" out="$3"
    local build digest
    build="$(mktemp -d)"
    trap 'rm -rf "$build"' RETURN
    mapfile -t sources < <(cd "$root" && find "$sources_dir" -name '*.java' | LC_ALL=C sort)
    digest="$(cd "$root" && "$python" -c '
import hashlib, sys
h = hashlib.sha256()
for p in sys.argv[1:]:
    h.update(p.encode() + b"\0" + open(p, "rb").read())
print(h.hexdigest())' "${sources[@]}")"
    (cd "$root" && javac --release 17 -nowarn -cp "$classpath" -d "$build/classes" "${sources[@]}")
    printf 'Ppml-Source-SHA256: %s\n' "$digest" > "$build/manifest.txt"
    mkdir -p "$(dirname "$out")"
    find "$build/classes" -exec touch -d '2026-01-01T00:00:00Z' {} +
    jar --create --file "$build/out.jar" --manifest "$build/manifest.txt" \
        --date 2026-01-01T00:00:00Z -C "$build/classes" .
    mv "$build/out.jar" "$out"
    echo "wrote $out (sources sha256 $digest)"
}
