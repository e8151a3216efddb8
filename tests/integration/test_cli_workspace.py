"""`ppml init`, `key`, `audit` and `secret` end to end, through real `ppml` processes."""

from __future__ import annotations

import ipaddress
import json
import sqlite3
import stat
from pathlib import Path

import pytest
from cli_support import run_ppml
from cryptography import x509


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = tmp_path_factory.mktemp("ws") / "ws"
    r = run_ppml("init", "--dir", ws, "--host", "spark-master", "--host", "10.1.2.3")
    assert r.code == 0, r.err
    assert "created workspace" in r.out
    return ws


def test_init_lays_out_a_private_workspace(home: Path) -> None:
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    names = {str(p.relative_to(home)) for p in home.rglob("*")}
    for expected in (
        "config.toml",
        "master-key.sealed",
        "secrets.sealed.json",
        "kms.sqlite",
        "enclave-signing-key.pem",
        "tls/ca.pem",
        "tls/server.pem",
        "tls/server-key.pem",
        "tls/client.pem",
        "tls/client-key.pem",
        "tls/keystore.p12",
        "tls/truststore.p12",
    ):
        assert expected in names
    for p in home.rglob("*"):
        mode = stat.S_IMODE(p.stat().st_mode)
        if p.is_dir():
            assert mode == 0o700, p
        elif p.name in ("truststore.p12", "ca.pem", "server.pem", "client.pem", "config.toml"):
            pass  # public: certificates and settings
        else:
            assert mode == 0o600, p
        assert not mode & 0o002, p  # nothing world-writable
    cert = x509.load_pem_x509_certificate((home / "tls" / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "spark-master"} <= set(san.get_values_for_type(x509.DNSName))
    ips = set(san.get_values_for_type(x509.IPAddress))
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.1.2.3")} <= ips


def test_init_refuses_to_overwrite_and_force_replaces(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    assert run_ppml("init", "--dir", ws).code == 0
    assert run_ppml("key", "create", "k1", home=ws).code == 0
    sealed = (ws / "master-key.sealed").read_bytes()
    r = run_ppml("init", "--dir", ws)
    assert r.code == 5 and "--force" in r.err
    assert (ws / "master-key.sealed").read_bytes() == sealed
    r = run_ppml("init", "--dir", ws, "--force", passphrase="another passphrase")
    assert r.code == 0, r.err
    assert (ws / "master-key.sealed").read_bytes() != sealed
    r = run_ppml("key", "list", "--format", "json", home=ws, passphrase="another passphrase")
    assert r.code == 0 and json.loads(r.out) == []


def test_init_needs_a_passphrase_when_not_interactive(tmp_path: Path) -> None:
    r = run_ppml("init", "--dir", tmp_path / "ws", passphrase=None)
    assert r.code == 5 and "PPML_PASSPHRASE" in r.err
    assert not (tmp_path / "ws").exists()
    r = run_ppml("init", "--dir", tmp_path / "ws2", "--host", "bad host!")
    assert r.code != 0 and not (tmp_path / "ws2").exists()


def test_default_workspace_is_ppml_home_then_dot_ppml(tmp_path: Path) -> None:
    r = run_ppml("init", cwd=tmp_path)
    assert r.code == 0, r.err
    assert (tmp_path / ".ppml" / "config.toml").exists()
    assert run_ppml("key", "list", cwd=tmp_path).code == 0


def test_keys(home: Path) -> None:
    r = run_ppml("key", "create", "orders", "--format", "json", home=home)
    assert r.code == 0 and json.loads(r.out)["current_version"] == 1
    r = run_ppml("key", "create", "orders", home=home)
    assert r.code == 2 and "orders" in r.err
    r = run_ppml("key", "create", "bad/name", home=home)
    assert r.code == 2 and "invalid key name" in r.err
    r = run_ppml("key", "show", "nope", home=home)
    assert r.code == 4
    r = run_ppml("key", "rotate", "nope", home=home)
    assert r.code == 4
    assert run_ppml("key", "rotate", "orders", home=home).code == 0
    shown = json.loads(run_ppml("key", "show", "orders", "--format", "json", home=home).out)
    assert shown["current_version"] == 2 and [v["version"] for v in shown["versions"]] == [1, 2]
    listed = json.loads(run_ppml("key", "list", "--format", "json", home=home).out)
    assert "orders" in [k["name"] for k in listed]


def test_audit_show_and_verify_then_tamper(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    assert run_ppml("init", "--dir", ws).code == 0
    assert run_ppml("key", "create", "a", home=ws).code == 0
    assert run_ppml("key", "rotate", "a", home=ws).code == 0
    assert run_ppml("key", "show", "missing", home=ws).code == 4
    entries = json.loads(run_ppml("audit", "show", "--format", "json", home=ws).out)
    ops = [(e["op"], e["outcome"]) for e in entries]
    assert ("create", "ok") in ops and ("rotate", "ok") in ops
    r = run_ppml("audit", "verify", home=ws)
    assert r.code == 0 and "intact" in r.out
    with sqlite3.connect(ws / "kms.sqlite") as db:
        db.execute("UPDATE audit SET actor = 'mallory' WHERE seq = 1")
    r = run_ppml("audit", "verify", home=ws)
    assert r.code == 3 and "audit log broken" in r.err


def test_secrets_show_only_through_secret_show(home: Path, tmp_path: Path) -> None:
    r = run_ppml("secret", "show", "spark-auth-secret", home=home)
    assert r.code == 0
    secret = r.out
    assert len(secret) >= 32 and "\n" not in secret  # piped: no newline added
    names = run_ppml("secret", "list", home=home).out.split()
    assert {"spark-auth-secret", "keystore-password"} <= set(names)
    r = run_ppml("secret", "show", "nope", home=home)
    assert r.code != 0 and "spark-auth-secret" in r.err  # lists the known names
    # The value appears in no file of the workspace and in no other command's output.
    for p in home.rglob("*"):
        if p.is_file():
            assert secret.encode() not in p.read_bytes(), p
    for args in (("key", "list"), ("audit", "show"), ("secret", "list"), ("--help",)):
        out = run_ppml(*args, home=home)
        assert secret not in out.out + out.err


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["init"],
        ["encrypt"],
        ["decrypt"],
        ["inspect"],
        ["rewrap"],
        ["key"],
        ["key", "create"],
        ["key", "list"],
        ["key", "show"],
        ["key", "rotate"],
        ["audit"],
        ["audit", "show"],
        ["audit", "verify"],
        ["secret", "show"],
        ["policy", "allow"],
        ["policy", "show"],
        ["policy", "revoke"],
        ["measure"],
        ["run"],
        ["serve"],
        ["sql"],
        ["demo"],
    ],
)
def test_help_everywhere(command: list[str]) -> None:
    r = run_ppml(*command, "--help")
    assert r.code == 0 and "Usage:" in r.out
    if (command and command[0] not in ("key", "audit", "secret")) or len(command) > 1:
        assert "--workspace" in r.out or command[0] in ("inspect", "measure", "demo")


def test_version_and_unknown_command() -> None:
    assert run_ppml("--version").out.startswith("ppml ")
    assert run_ppml("frobnicate").code == 2


def test_serving_client_certificates_are_issued_and_bad_requests_refused(
    home: Path, tmp_path: Path
) -> None:
    out = tmp_path / "certs"
    out.mkdir()
    password = tmp_path / "pw"
    password.write_text("a long key password\n")
    ok = run_ppml("serving", "client", "issue", "alice", "--out", out,
                  "--key-password-file", password, home=home)  # fmt: skip
    assert ok.code == 0, ok.err
    key = (out / "alice-key.pem").read_bytes()
    assert key.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert oct((out / "alice-key.pem").stat().st_mode & 0o777) == "0o600"
    refusals = {
        "exists": ["alice", "--out", out],
        "days": ["bob", "--out", out, "--days", "0"],
        "not a directory": ["bob", "--out", password],
        "8 characters": ["bob", "--out", out, "--key-password-file", tmp_path / "short"],
        "invalid client name": ["Bob", "--out", out],
    }
    (tmp_path / "short").write_text("short\n")
    for message, args in refusals.items():
        r = run_ppml("serving", "client", "issue", *args, home=home)
        assert r.code == 2 and message in r.err, (message, r.err)
    assert sorted(p.name for p in out.iterdir()) == ["alice-key.pem", "alice.pem"]
