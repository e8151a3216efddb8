"""The shipped jar matches its sources; the key access token format; class detection."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

from ppml.engines.spark.jvm import (
    KMS_CLIENT_CLASS,
    TOKEN_PREFIX,
    jvm_class_available,
    kms_client_jar,
    released_keys_token,
    scan_options,
)

ROOT = Path(__file__).resolve().parents[3]


def _source_digest(tree: str = "jvm/src/main/java") -> str:
    # The recipe of scripts/_jar.sh: relative paths in byte order, path NUL content.
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / tree).rglob("*.java"))
    h = hashlib.sha256()
    for rel in sources:
        h.update(rel.encode() + b"\0" + (ROOT / rel).read_bytes())
    return h.hexdigest()


def test_the_jar_is_built_from_the_current_sources() -> None:
    jar = kms_client_jar()
    assert jar.is_file()
    with zipfile.ZipFile(jar) as zf:
        manifest = zf.read("META-INF/MANIFEST.MF").decode()
        names = zf.namelist()
    # Manifest lines wrap at 72 bytes; a continuation starts with one space.
    unwrapped = manifest.replace("\r\n", "\n").replace("\n ", "")
    fields = dict(line.split(": ", 1) for line in unwrapped.splitlines() if ": " in line)
    recorded = fields["Ppml-Source-SHA256"]
    assert recorded == _source_digest(), "stale jar: run scripts/build_jar.sh"
    assert KMS_CLIENT_CLASS.replace(".", "/") + ".class" in names


def test_the_examples_jar_is_built_from_the_current_sources() -> None:
    jar = ROOT / "examples/spark/java/spark-examples.jar"
    with zipfile.ZipFile(jar) as zf:
        manifest = zf.read("META-INF/MANIFEST.MF").decode().replace("\r\n", "\n")
        names = zf.namelist()
    fields = dict(
        line.split(": ", 1) for line in manifest.replace("\n ", "").splitlines() if ": " in line
    )
    expected = _source_digest("examples/spark/java/src/main/java")
    assert fields["Ppml-Source-SHA256"] == expected, "stale jar: run build_examples_jar.sh"
    assert "org/ppml/examples/SparkPi.class" in names


def _decode(token: str) -> list[tuple[str, str, bytes]]:
    assert token.startswith(TOKEN_PREFIX)
    body = base64.urlsafe_b64decode(token[len(TOKEN_PREFIX) :]).decode()
    rows = []
    for line in body.splitlines():
        m, w, k = (base64.urlsafe_b64decode(f) for f in line.split("\t"))
        rows.append((m.decode(), w.decode(), k))
    return rows


def test_token_round_trips_every_key_and_nothing_else() -> None:
    keys = {("sales", "ppml1:sales:1:AAAA;BBBB"): b"\x01" * 16, ("pii", "w\t2\n"): b"\x02" * 32}
    rows = _decode(released_keys_token(keys))
    assert sorted(rows) == sorted((m, w, k) for (m, w), k in keys.items())
    assert _decode(released_keys_token({})) == []


def test_scan_options_name_the_factory_the_client_and_a_redactable_token() -> None:
    options = scan_options({("k", "w"): b"\x00" * 16})
    assert options["parquet.encryption.kms.client.class"] == KMS_CLIENT_CLASS
    assert options["parquet.crypto.factory.class"].endswith("PropertiesDrivenCryptoFactory")
    # Spark redacts option names matching (?i)secret|password|token: the keys ride in one.
    secret_options = [k for k, v in options.items() if v.startswith(TOKEN_PREFIX)]
    assert secret_options == ["parquet.encryption.key.access.token"]


def test_no_jvm_means_the_class_is_not_available() -> None:
    assert jvm_class_available(object()) is False
