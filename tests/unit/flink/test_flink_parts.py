"""Flink's pieces that need no Flink: the shipped jar, the configuration, the key relay, finding
Flink's environment."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import ssl
import sys
import zipfile
from pathlib import Path

import pytest
from tests.support.keys import MemoryKeyProvider

from ppml.engines.flink.cluster import ppml_flink_jar
from ppml.engines.flink.config import TLS13_SUITES, ClusterSecurity, client_settings, node_settings
from ppml.engines.flink.environment import FLINK_PYTHON_ENV, find_flink_environment
from ppml.engines.flink.relay import (
    RELAY_ENV,
    KeyRelay,
    RelayTicket,
    check_key,
    one_line_errors,
    ticket_from_environment,
)
from ppml.errors import (
    AccessDenied,
    ConfigurationError,
    IntegrityError,
    KeyAccessError,
    KeyNotFound,
)

ROOT = Path(__file__).resolve().parents[3]


def _source_digest() -> str:
    # The recipe of scripts/build_flink_jar.sh: relative paths in byte order, path NUL content.
    base = ROOT / "jvm/flink/src/main/java"
    sources = sorted(str(p.relative_to(ROOT)) for p in base.rglob("*.java"))
    h = hashlib.sha256()
    for rel in sources:
        h.update(rel.encode() + b"\0" + (ROOT / rel).read_bytes())
    return h.hexdigest()


def test_the_flink_jar_is_built_from_the_current_sources() -> None:
    with zipfile.ZipFile(ppml_flink_jar()) as zf:
        manifest = zf.read("META-INF/MANIFEST.MF").decode()
        names = zf.namelist()
    unwrapped = manifest.replace("\r\n", "\n").replace("\n ", "")
    fields = dict(line.split(": ", 1) for line in unwrapped.splitlines() if ": " in line)
    assert fields["Ppml-Source-SHA256"] == _source_digest(), "stale jar: run build_flink_jar.sh"
    for cls in ("Ticks", "FilePaths", "EncryptedParts", "ConfiguredContext"):
        assert f"org/ppml/flink/{cls}.class" in names


# -- configuration -------------------------------------------------------------------------------


def _security(tmp_path: Path) -> ClusterSecurity:
    return ClusterSecurity(tmp_path, "s3cret-password", ("AA:BB", "CC:DD"))


def test_nodes_use_mutual_tls13_pinned_to_the_cluster_certificates(tmp_path: Path) -> None:
    settings = node_settings(_security(tmp_path))
    for kind in ("internal", "rest"):
        assert settings[f"security.ssl.{kind}.enabled"] == "true"
        assert settings[f"security.ssl.{kind}.cert.fingerprint"] == "AA:BB,CC:DD"
        assert settings[f"security.ssl.{kind}.truststore"] == str(tmp_path / "truststore.p12")
    assert settings["security.ssl.rest.authentication-enabled"] == "true"
    assert settings["security.ssl.protocol"] == "TLSv1.3"
    assert settings["security.ssl.algorithms"] == TLS13_SUITES
    suites = TLS13_SUITES.split(",")
    assert all(suite.startswith("TLS_") and "_WITH_" not in suite for suite in suites)


def test_a_job_client_presents_the_client_certificate_only(tmp_path: Path) -> None:
    settings = client_settings(_security(tmp_path))
    assert settings["security.ssl.rest.keystore"] == str(tmp_path / "client.p12")
    assert not any(key.startswith("security.ssl.internal") for key in settings)


def test_the_password_never_shows_in_a_repr(tmp_path: Path) -> None:
    assert "s3cret" not in repr(_security(tmp_path))


# -- the key relay -------------------------------------------------------------------------------


@pytest.fixture
def relay() -> KeyRelay:
    provider = MemoryKeyProvider("sales", "pii")
    provider.refused = {"pii"}
    with KeyRelay(provider) as served:
        yield served


def test_operators_get_and_unwrap_keys_through_the_relay(relay: KeyRelay) -> None:
    keys = relay.ticket().provider()
    fresh = keys.generate_data_key("sales")
    other = relay.ticket().provider()
    assert other.unwrap(fresh.wrapped) == fresh.plaintext


def test_what_the_provider_refuses_the_relay_refuses(relay: KeyRelay) -> None:
    keys = relay.ticket().provider()
    pii = keys.generate_data_key("pii")  # made, but its unwrap is refused by policy
    with pytest.raises(AccessDenied):
        relay.ticket().provider().unwrap(pii.wrapped)
    with pytest.raises(KeyNotFound):
        keys.generate_data_key("nope")
    fresh = keys.generate_data_key("sales")
    tampered = type(fresh.wrapped)(fresh.wrapped.key_name, 1, b"\x00" * len(fresh.wrapped.blob))
    with pytest.raises(IntegrityError):
        keys.unwrap(tampered)


def test_a_missing_key_is_named_with_how_to_create_it(relay: KeyRelay) -> None:
    keys = relay.ticket().provider()
    with pytest.raises(KeyNotFound) as caught:
        keys.generate_data_key("flink-output")
    assert str(caught.value) == (
        "no such key 'flink-output': create it with `ppml key create flink-output`"
    )
    missing = keys.generate_data_key("sales").wrapped
    gone = type(missing)("gone", 1, missing.blob)
    with pytest.raises(KeyNotFound, match="'gone'"):
        keys.unwrap(gone)


def test_a_job_checks_its_output_key_before_it_runs(
    relay: KeyRelay, capsys: pytest.CaptureFixture[str]
) -> None:
    check_key(relay.ticket(), "sales")
    with pytest.raises(KeyNotFound, match="ppml key create flink-output") as caught:
        check_key(relay.ticket(), "flink-output")
    # Uncaught in the job's client, it is one line, as the ppml commands print their errors.
    one_line_errors(KeyNotFound, caught.value, caught.value.__traceback__)
    err = capsys.readouterr().err
    assert err == (
        "ppml: key access error: no such key 'flink-output': create it with "
        "`ppml key create flink-output`\n"
    )
    try:
        raise ValueError("not ppml's")
    except ValueError as exc:
        one_line_errors(ValueError, exc, exc.__traceback__)
    assert "Traceback" in capsys.readouterr().err


def test_a_wrong_token_is_refused(relay: KeyRelay) -> None:
    good = relay.ticket()
    forged = RelayTicket(good.host, good.port, good.cert_pem, "x" * len(good.token))
    with pytest.raises(KeyAccessError, match="refused this operator"):
        forged.provider().generate_data_key("sales")


def test_an_operator_trusts_only_the_relay_certificate_it_was_given(relay: KeyRelay) -> None:
    with KeyRelay(MemoryKeyProvider("sales")) as other:
        good = relay.ticket()
        # The right address and token, but another relay's certificate: the TLS check fails.
        pinned_elsewhere = RelayTicket(good.host, good.port, other.ticket().cert_pem, good.token)
        with pytest.raises(KeyAccessError, match="cannot reach"):
            pinned_elsewhere.provider().generate_data_key("sales")


def _raw_post(relay: KeyRelay, path: str, body: bytes, token: str | None = None) -> int:
    ticket = relay.ticket()
    context = ssl.create_default_context(cadata=ticket.cert_pem)
    conn = http.client.HTTPSConnection(ticket.host, ticket.port, context=context, timeout=10)
    headers = {"Authorization": f"Bearer {token or ticket.token}"}
    conn.request("POST", path, body=body, headers=headers)
    status = conn.getresponse().status
    conn.close()
    return status


def test_malformed_requests_are_refused(relay: KeyRelay) -> None:
    assert _raw_post(relay, "/datakey", b"not json") == 400
    assert _raw_post(relay, "/other", json.dumps({"key": "sales"}).encode()) == 400
    assert _raw_post(relay, "/unwrap", json.dumps({"wrapped": "ppml1:x"}).encode()) == 400
    assert _raw_post(relay, "/datakey", b"x" * (64 * 1024)) == 400
    assert _raw_post(relay, "/datakey", b"{}", token="wrong") == 401


def test_tls12_is_refused(relay: KeyRelay) -> None:
    ticket = relay.ticket()
    context = ssl.create_default_context(cadata=ticket.cert_pem)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    conn = http.client.HTTPSConnection(ticket.host, ticket.port, context=context, timeout=10)
    with pytest.raises(ssl.SSLError):
        conn.request("POST", "/datakey", body=b"{}")
    conn.close()


def test_the_ticket_hides_its_token_and_travels_in_a_file(relay: KeyRelay, tmp_path: Path) -> None:
    ticket = relay.ticket()
    assert ticket.token not in repr(ticket)
    path = relay.write_ticket(tmp_path / "relay.json")
    assert path.stat().st_mode & 0o777 == 0o600
    assert ticket_from_environment({RELAY_ENV: str(path)}) == ticket
    with pytest.raises(ConfigurationError, match="ppml flink run"):
        ticket_from_environment({})
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigurationError, match="damaged"):
        ticket_from_environment({RELAY_ENV: str(tmp_path / "bad.json")})
    assert base64.b64decode(json.loads(path.read_text())["token"] + "==", altchars=b"-_")


# -- Flink's environment -------------------------------------------------------------------------


def test_an_interpreter_without_pyflink_is_not_flink_environment(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="ppml flink setup"):
        find_flink_environment({FLINK_PYTHON_ENV: str(tmp_path / "missing" / "python")})
    try:
        import pyflink  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigurationError, match="No module named 'pyflink'"):
            find_flink_environment({FLINK_PYTHON_ENV: sys.executable})


def test_probes_never_hand_the_passphrase_to_the_programs_they_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ppml flink run` and `ppml spark-submit` probe `java -version` and Flink's interpreter
    while the user's passphrase may be in their environment: the probes never pass it on."""
    from ppml.engines.java import java_version

    seen = tmp_path / "environment"
    fake = tmp_path / "fake"
    fake.write_text(
        f'#!/bin/sh\nenv > "{seen}"\necho \'openjdk version "17.0.1"\' >&2\n'
        'echo \'{"flink_home": "/x", "flink_version": "2.3.0", "site_packages": "/x", '
        '"ppml": "/x", "version": "3.11"}\'\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PPML_PASSPHRASE", "do not pass me on")
    assert java_version(fake) == 17
    assert "do not pass me on" not in seen.read_text()
    seen.unlink()
    with pytest.raises(ConfigurationError):  # the fake is not a real Flink environment
        find_flink_environment({FLINK_PYTHON_ENV: str(fake)})
    assert seen.exists() and "do not pass me on" not in seen.read_text()


def test_a_damaged_cluster_state_is_a_configuration_error(tmp_path: Path) -> None:
    from ppml.engines.flink.cluster import read_cluster_state

    assert read_cluster_state(tmp_path) is None
    for text in ("{", '{"host": "127.0.0.1"}'):
        (tmp_path / "cluster.json").write_text(text)
        with pytest.raises(ConfigurationError, match="damaged"):
            read_cluster_state(tmp_path)
