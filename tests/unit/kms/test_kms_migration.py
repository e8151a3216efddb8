"""Key store schema migration: a version-1 store (no release policies) upgrades in place."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ppml.attestation.claims import TeeType
from ppml.crypto.envelope import DataKey
from ppml.errors import ConfigurationError, IntegrityError
from ppml.kms import KeyService, Rule
from ppml.kms import audit as kms_audit
from ppml.kms import sqlite as kms_sqlite
from ppml.kms.master import MasterKey

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


def downgrade(db: Path, to: int) -> None:
    """Rewrite a current store as the code of schema version `to` (1 or 3) left it: no state
    record, an audit head with the version-1 MAC (and for 1, no release rules)."""
    audit_key = MasterKey(MASTER).audit_key
    raw = sqlite3.connect(db)
    with raw:
        raw.execute("DROP TABLE state_head")
        seq, mac = raw.execute("SELECT seq, mac FROM audit_head").fetchone()
        raw.execute("ALTER TABLE audit_head DROP COLUMN state_version")
        raw.execute(
            "UPDATE audit_head SET head_mac = ?", (kms_audit._head_mac(audit_key, seq, mac, None),)
        )
        if to == 1:
            raw.execute("DROP TABLE release_rules")
        raw.execute(f"PRAGMA user_version = {to}")
    raw.close()


@pytest.fixture
def v1_store(tmp_path: Path) -> Iterator[tuple[Path, DataKey]]:
    """A store as the version-1 code left it: keys, versions, an audit log."""
    db = tmp_path / "kms.db"
    with KeyService(db, MASTER, actor="v1") as old:
        old.create_key("sales")
        old.rotate("sales")
        dek = old.generate_data_key("sales")
    downgrade(db, 1)
    assert _schema(db) == (1, {"meta", "keys", "key_versions", "audit", "audit_head"})
    yield db, dek


def test_a_version_1_store_upgrades_in_place(v1_store: tuple[Path, DataKey]) -> None:
    db, dek = v1_store
    with KeyService(db, MASTER) as kms:
        assert kms_sqlite.SCHEMA_VERSION == 4
        assert _schema(db) == (4, {"meta", "keys", "key_versions", "audit", "audit_head",
                                   "release_rules", "state_head"})  # fmt: skip
        assert kms.unwrap(dek.wrapped) == dek.plaintext
        assert kms.describe("sales").current_version == 2
        assert kms.policies(allow_sim=False).show("sales").rules == ()
        kms.policies(allow_sim=False).allow("sales", Rule(TeeType.SGX, M))
        verification = kms.audit.verify()
        # create, rotate, generate_data_key; the state anchored; unwrap; the rule allowed
        assert verification.ok and verification.count == 6
        assert [e.op for e in kms.audit.entries()][-3:] == [
            "state_anchor",
            "unwrap",
            "policy_allow",
        ]
        assert kms.audit.entries()[-3].detail == {"state": 1, "keys": 1}
        assert kms.verify_state().ok and kms.verify_state().version == 2
    with KeyService(db, MASTER) as again:
        assert again.policies(allow_sim=False).show("sales").rules == (Rule(TeeType.SGX, M),)


def test_several_openers_migrate_once(v1_store: tuple[Path, DataKey]) -> None:
    db, dek = v1_store

    def open_and_use(_: int) -> bytes:
        with KeyService(db, MASTER) as kms:
            return kms.unwrap(dek.wrapped)

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert set(pool.map(open_and_use, range(8))) == {dek.plaintext}
    assert _schema(db)[0] == 4
    with KeyService(db, MASTER) as kms:
        assert [e.op for e in kms.audit.entries()].count("state_anchor") == 1


def test_a_failed_migration_leaves_the_store_at_version_1(
    v1_store: tuple[Path, DataKey], monkeypatch: pytest.MonkeyPatch
) -> None:
    db, dek = v1_store
    monkeypatch.setitem(kms_sqlite._MIGRATIONS, 1, (*kms_sqlite._MIGRATIONS[1], "NOT SQL"))
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
    raw.execute("PRAGMA user_version = 5")
    raw.close()
    with pytest.raises(ConfigurationError, match="schema version 5 is not supported"):
        KeyService(db, MASTER)


def test_a_new_store_starts_at_the_current_version(tmp_path: Path) -> None:
    db = tmp_path / "kms.db"
    KeyService(db, MASTER).close()
    assert _schema(db)[0] == kms_sqlite.SCHEMA_VERSION == 4


@pytest.fixture
def v3_store(tmp_path: Path) -> Path:
    """A store as the version-3 code left it: a key with one release rule, no state record."""
    db = tmp_path / "kms.db"
    with KeyService(db, MASTER) as old:
        old.create_key("sales")
        old.policies(allow_sim=False).allow("sales", Rule(TeeType.SGX, M))
    downgrade(db, 3)
    return db


def test_a_version_3_store_is_anchored_once(v3_store: Path) -> None:
    db = v3_store
    with KeyService(db, MASTER) as kms:
        assert kms.policies(allow_sim=False).show("sales").rules == (Rule(TeeType.SGX, M),)
        state = kms.verify_state()
        assert state.ok and (state.version, state.keys) == (1, 1)
        assert kms.audit.verify().ok


def test_a_store_is_not_anchored_over_an_altered_rule(v3_store: Path) -> None:
    db = v3_store
    raw = sqlite3.connect(db)
    with raw:
        raw.execute("UPDATE release_rules SET debug_ok = 1")
    raw.close()
    with KeyService(db, MASTER) as kms, pytest.raises(IntegrityError, match="not anchoring"):
        kms.list_keys()
    assert _schema(db)[0] == 4
    raw = sqlite3.connect(db)
    assert raw.execute("SELECT count(*) FROM state_head").fetchone() == (0,)
    raw.close()


RE_ANCHORING = {
    # Deleting the state record, to have edited rows anchored as genuine: the audit head is
    # still bound to a state version.
    "state record deleted": (("DELETE FROM state_head",), "state record is missing"),
    # Also dropping the head's state column (user_version 3), so that the store looks older:
    # the head's MAC binds the state version, so it no longer verifies.
    "schema downgraded": (
        (
            "DROP TABLE state_head",
            "ALTER TABLE audit_head DROP COLUMN state_version",
            "PRAGMA user_version = 3",
        ),
        "head is missing or forged",
    ),
}


@pytest.mark.parametrize("attack", RE_ANCHORING.values(), ids=RE_ANCHORING.keys())
def test_a_store_is_never_anchored_twice(
    tmp_path: Path, attack: tuple[tuple[str, ...], str]
) -> None:
    statements, refusal = attack
    db = tmp_path / "kms.db"
    with KeyService(db, MASTER) as kms:
        kms.create_key("sales")
    raw = sqlite3.connect(db)
    with raw:
        for statement in statements:
            raw.execute(statement)
    raw.close()
    with KeyService(db, MASTER) as kms, pytest.raises(IntegrityError, match=refusal):
        kms.describe("sales")
