"""The KMS state through the real `ppml` command: what an attacker with write access to the
workspace's files (no passphrase) tries with sqlite3 and cp, and what ppml answers."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from cli_support import run_ppml

M = "ab" * 32


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # this test's counters
    home = tmp_path / "ws"
    assert run_ppml("init", "--dev", "--dir", home).code == 0
    for args in (
        ("key", "create", "sales"),
        ("policy", "allow", "sales", "--tee", "sim", "--measurement", M),
    ):
        r = run_ppml(*args, home=home)
        assert r.code == 0, r.err
    return home


def _sql(home: Path, statement: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    raw = sqlite3.connect(home / "kms.sqlite")
    try:
        with raw:
            return raw.execute(statement, params).fetchall()
    finally:
        raw.close()


def _copy(home: Path, dest: Path) -> None:
    src, dst = sqlite3.connect(home / "kms.sqlite"), sqlite3.connect(dest)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


def test_a_revoked_rule_put_back_is_refused(home: Path) -> None:
    (saved,) = _sql(home, "SELECT * FROM release_rules")
    assert run_ppml("policy", "revoke", "sales", "--measurement", M, home=home).code == 0
    marks = ", ".join("?" * len(saved))
    _sql(home, f"INSERT INTO release_rules VALUES ({marks})", saved)
    for args in (("key", "list"), ("policy", "show", "sales")):
        r = run_ppml(*args, home=home)
        assert r.code == 3, r.err
        assert "KMS state check failed: key 'sales': its release rules differ" in r.err
    verify = run_ppml("audit", "verify", "--format", "json", home=home)
    assert verify.code == 3
    report = json.loads(verify.out)
    assert report["ok"] is True  # the chain itself is intact
    assert report["state"]["ok"] is False and "sales" in report["state"]["reason"]


def test_an_undone_rotation_is_refused(home: Path, tmp_path: Path) -> None:
    assert run_ppml("key", "rotate", "sales", home=home).code == 0
    _sql(home, "DELETE FROM key_versions WHERE name = 'sales' AND version = 2")
    (tmp_path / "a.csv").write_text("x,y\n1,2\n")
    r = run_ppml("encrypt", tmp_path / "a.csv", "-o", tmp_path / "a.ppml", "--key", "sales",
                 home=home)  # fmt: skip
    assert r.code == 3 and "its versions differ" in r.err
    assert not (tmp_path / "a.ppml").exists()


def test_a_whole_file_rollback_is_refused(home: Path, tmp_path: Path) -> None:
    backup = tmp_path / "backup.sqlite"
    _copy(home, backup)
    assert run_ppml("policy", "revoke", "sales", "--measurement", M, home=home).code == 0
    (home / "kms.sqlite").unlink()
    for suffix in ("-wal", "-shm"):
        (home / f"kms.sqlite{suffix}").unlink(missing_ok=True)
    shutil.copy(backup, home / "kms.sqlite")
    r = run_ppml("policy", "show", "sales", home=home)
    assert r.code == 3
    assert "rolled back: its state is version 2, but it had reached version 3" in r.err
    verify = run_ppml("audit", "verify", home=home)
    assert verify.code == 3 and "rolled back" in verify.err


def test_audit_verify_reports_both(home: Path) -> None:
    r = run_ppml("audit", "verify", home=home)
    assert r.code == 0, r.err
    assert "audit log intact: 2 records" in r.out
    assert "KMS state intact: version 2, 1 keys, counter at 2" in r.out


def test_a_key_name_with_a_newline_is_refused(home: Path) -> None:
    r = run_ppml("key", "create", "evil\n", home=home)
    assert r.code == 2 and "invalid key name 'evil\\n'" in r.err
    listing = run_ppml("key", "list", "--format", "json", home=home)
    assert [k["name"] for k in json.loads(listing.out)] == ["sales"]
