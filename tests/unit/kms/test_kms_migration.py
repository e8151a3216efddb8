"""Key store schema migration: a version-1 store (no release policies) upgrades in place."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ppml.attestation.claims import TeeType
from ppml.crypto.envelope import DataKey
from ppml.errors import ConfigurationError
from ppml.kms import KeyService, Rule
from ppml.kms import store as kms_store

MASTER = bytes(range(200, 232))
M = "0f" * 32


def _schema(db: Path) -> tuple[int, set[str]]:
    raw = sqlite3.connect(db)
    try:
        version = raw.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        raw.close()
    return version, tables


@pytest.fixture
def v1_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, DataKey]]:
    """A store written by the version-1 code path: same KeyService, the version-1 schema."""
    db = tmp_path / "kms.db"
    with monkeypatch.context() as patch:
        patch.setattr(kms_store, "SCHEMA_VERSION", 1)
        patch.setattr(kms_store, "_CURRENT_SCHEMA", kms_store._SCHEMA)
        with KeyService(db, MASTER, actor="v1") as old:
            old.create_key("sales")
            old.rotate("sales")
            dek = old.generate_data_key("sales")
    assert _schema(db) == (1, {"meta", "keys", "key_versions", "audit", "audit_head"})
    yield db, dek


def test_a_version_1_store_upgrades_in_place(v1_store: tuple[Path, DataKey]) -> None:
    db, dek = v1_store
    with KeyService(db, MASTER) as kms:
        assert kms_store.SCHEMA_VERSION == 3
        assert _schema(db) == (3, {"meta", "keys", "key_versions", "audit", "audit_head",
                                   "release_rules"})  # fmt: skip
        assert kms.unwrap(dek.wrapped) == dek.plaintext
        assert kms.describe("sales").current_version == 2
        assert kms.policies(allow_sim=False).show("sales").rules == ()
        kms.policies(allow_sim=False).allow("sales", Rule(TeeType.SGX, M))
        verification = kms.audit.verify()
        assert verification.ok and verification.count == 5
    with KeyService(db, MASTER) as again:
        assert again.policies(allow_sim=False).show("sales").rules == (Rule(TeeType.SGX, M),)


def test_several_openers_migrate_once(v1_store: tuple[Path, DataKey]) -> None:
    db, dek = v1_store

    def open_and_use(_: int) -> bytes:
        with KeyService(db, MASTER) as kms:
            return kms.unwrap(dek.wrapped)

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert set(pool.map(open_and_use, range(8))) == {dek.plaintext}
    assert _schema(db)[0] == 3


def test_a_failed_migration_leaves_the_store_at_version_1(
    v1_store: tuple[Path, DataKey], monkeypatch: pytest.MonkeyPatch
) -> None:
    db, dek = v1_store
    monkeypatch.setitem(kms_store._MIGRATIONS, 1, (*kms_store._MIGRATIONS[1], "NOT SQL"))
    with pytest.raises(ConfigurationError):
        KeyService(db, MASTER)
    assert _schema(db) == (1, {"meta", "keys", "key_versions", "audit", "audit_head"})
    monkeypatch.undo()
    with KeyService(db, MASTER) as kms:
        assert kms.unwrap(dek.wrapped) == dek.plaintext


def test_a_store_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "kms.db"
    KeyService(db, MASTER).close()
    raw = sqlite3.connect(db)
    raw.execute("PRAGMA user_version = 4")
    raw.close()
    with pytest.raises(ConfigurationError, match="schema version 4 is not supported"):
        KeyService(db, MASTER)


def test_a_new_store_starts_at_the_current_version(tmp_path: Path) -> None:
    db = tmp_path / "kms.db"
    KeyService(db, MASTER).close()
    assert _schema(db)[0] == kms_store.SCHEMA_VERSION == 3
