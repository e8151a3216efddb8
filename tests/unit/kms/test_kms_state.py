"""The authenticated KMS state: rows edited, deleted or put back with plain sqlite3 (an attacker
who can write the key store file but has no passphrase) are refused, on open and while open."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.unit.kms.test_kms_policy import OTHER, M, claims

from ppml.attestation.claims import TeeType
from ppml.errors import IntegrityError
from ppml.kms import KeyService, Rule
from ppml.kms.policy import Reason

MASTER = bytes(range(64, 96))


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "kms.db"


@pytest.fixture
def counters(tmp_path: Path) -> Path:
    return tmp_path / "counters"


def open_kms(db: Path, counters: Path | None = None) -> KeyService:
    return KeyService(db, MASTER, counter_dir=counters)


@pytest.fixture
def kms(db: Path, counters: Path) -> Iterator[KeyService]:
    with open_kms(db, counters) as service:
        service.create_key("sales")
        service.create_key("pii")
        yield service


def sql(db: Path, *statements: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    raw = sqlite3.connect(db)
    try:
        with raw:
            rows: list[tuple[object, ...]] = []
            for statement in statements:
                rows = raw.execute(statement, params).fetchall()
            return rows
    finally:
        raw.close()


def copy_store(source: Path, dest: Path) -> None:
    """A consistent copy of a live store (SQLite's backup API: the WAL's commits included)."""
    src, dst = sqlite3.connect(source), sqlite3.connect(dest)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


def put_back(db: Path, old: Path, *tables: str) -> None:
    """Replace `tables` of `db` with their rows in the copy `old`."""
    statements = [f"ATTACH '{old}' AS old"]
    for table in tables:
        statements += [f"DELETE FROM {table}", f"INSERT INTO {table} SELECT * FROM old.{table}"]
    sql(db, *statements)


def refused_on_open(db: Path, counters: Path | None, match: str) -> None:
    with open_kms(db, counters) as again, pytest.raises(IntegrityError, match=match):
        again.list_keys()
    with open_kms(db, counters) as again:
        state = again.verify_state()
    assert not state.ok
    assert state.reason  # names what is inconsistent


# -- finding 1: a revoked release rule comes back --------------------------------------------


def test_a_revoked_rule_put_back_is_refused(kms: KeyService, db: Path, counters: Path) -> None:
    prod = kms.policies(allow_sim=False)
    prod.allow("sales", Rule(TeeType.SGX, M))
    saved = sql(db, "SELECT * FROM release_rules")
    prod.revoke("sales", M)
    assert not prod.evaluate("sales", claims()).allowed
    placeholders = ", ".join("?" * len(saved[0]))
    sql(db, f"INSERT INTO release_rules VALUES ({placeholders})", params=saved[0])

    # the open service denies at once, and never releases under the old rule
    assert prod.evaluate("sales", claims()).reason == Reason.POLICY_TAMPERED
    assert "sales" not in prod.matching_keys(claims())
    with pytest.raises(IntegrityError, match="key 'sales': its release rules differ"):
        prod.show("sales")
    # a new opener refuses the store, naming the key
    refused_on_open(db, counters, "key 'sales': its release rules differ")
    with open_kms(db, counters) as again:
        assert again.audit.verify().ok  # the chain alone cannot see it
        assert "sales" in again.verify_state().reason


# -- finding 2: a rotation is undone -----------------------------------------------------------


def test_a_deleted_newest_version_is_refused(kms: KeyService, db: Path, counters: Path) -> None:
    kms.rotate("sales")
    sql(db, "DELETE FROM key_versions WHERE name = 'sales' AND version = 2")
    with pytest.raises(IntegrityError, match="key 'sales': its versions differ"):
        kms.generate_data_key("sales")  # never a new file under the old version
    assert kms.audit.entries()[-1].outcome == "error"
    refused_on_open(db, counters, "key 'sales': its versions differ")


# -- every other way to change the rows --------------------------------------------------------

EDITS = {
    "key created_at edited": (
        "UPDATE keys SET created_at = '2020-01-01' WHERE name = 'pii'",
        "key 'pii': its key row differs",
    ),
    "key inserted": (
        "INSERT INTO keys VALUES ('ghost', '2030-01-01')",
        "key 'ghost' is not in the authenticated state",
    ),
    "key deleted with its versions": (
        "DELETE FROM key_versions WHERE name = 'pii'; DELETE FROM keys WHERE name = 'pii'",
        "key 'pii': all its rows are missing",
    ),
    "version inserted": (
        "INSERT INTO key_versions SELECT name, 9, wrapped_kek, created_at FROM key_versions "
        "WHERE name = 'pii'",
        "key 'pii': its versions differ",
    ),
    "version renumbered": (
        "UPDATE key_versions SET version = 2 WHERE name = 'pii'",
        "key 'pii': its versions differ",
    ),
    "wrapped key swapped between keys": (
        "UPDATE key_versions SET wrapped_kek = (SELECT wrapped_kek FROM key_versions "
        "WHERE name = 'sales') WHERE name = 'pii'",
        "key 'pii': its versions differ",
    ),
    "version's type changed": (
        "UPDATE key_versions SET version = X'31' WHERE name = 'pii'",
        "key 'pii': its versions differ",
    ),
    "rule for a key with none": (
        "INSERT INTO release_rules VALUES "
        f"('pii', 'sgx', '{M}', 0, 'UpToDate', '2030-01-01', zeroblob(32), '{{}}')",
        "key 'pii': its release rules differ",
    ),
    "state record's summary edited": (
        "UPDATE state_head SET summary = CAST('{}' AS BLOB)",
        "does not match its MAC",
    ),
    "state record's version raised": (
        "UPDATE state_head SET version = version + 1",
        "does not match its MAC",
    ),
    "state record deleted": ("DELETE FROM state_head", "state record is missing"),
}


@pytest.mark.parametrize("edit", EDITS.values(), ids=EDITS.keys())
def test_an_edited_row_is_refused_on_open(
    kms: KeyService, db: Path, counters: Path, edit: tuple[str, str]
) -> None:
    statements, problem = edit
    sql(db, *statements.split("; "))
    refused_on_open(db, counters, problem)


def test_a_change_of_one_key_does_not_take_in_an_edit_of_another(
    kms: KeyService, db: Path, counters: Path
) -> None:
    """A state change rewrites the record from that key's rows only: another key's edited rows
    are not laundered into the new record, they stay detected."""
    sql(db, "UPDATE keys SET created_at = '2020-01-01' WHERE name = 'pii'")
    kms.rotate("sales")
    kms.policies(allow_sim=False).allow("sales", Rule(TeeType.SGX, M))
    refused_on_open(db, counters, "key 'pii': its key row differs")


def test_a_refused_store_is_named_with_exit_code_3(kms: KeyService, db: Path) -> None:
    sql(db, "DELETE FROM key_versions WHERE name = 'pii'")
    with open_kms(db) as again, pytest.raises(IntegrityError) as caught:
        again.describe("sales")
    assert caught.value.exit_code == 3
    assert "KMS state check failed: key 'pii'" in str(caught.value)


# -- mixing old and new rows; rolling back ------------------------------------------------------


def test_an_old_state_record_with_its_old_rows_is_refused(
    kms: KeyService, db: Path, counters: Path, tmp_path: Path
) -> None:
    """The rows and the state record of an earlier copy, with today's audit log: the audit head
    says the state went further."""
    kms.policies(allow_sim=False).allow("sales", Rule(TeeType.SGX, M))
    old = tmp_path / "old.db"
    copy_store(db, old)
    kms.policies(allow_sim=False).revoke("sales", M)
    put_back(db, old, "release_rules", "state_head")
    refused_on_open(db, counters, "the audit log reached version 4")


def test_an_old_state_with_an_old_audit_head_is_refused(
    kms: KeyService, db: Path, counters: Path, tmp_path: Path
) -> None:
    """The same with the audit head rolled back too: the newer audit records are still there."""
    kms.policies(allow_sim=False).allow("sales", Rule(TeeType.SGX, M))
    old = tmp_path / "old.db"
    copy_store(db, old)
    kms.policies(allow_sim=False).revoke("sales", M)
    put_back(db, old, "release_rules", "state_head", "audit_head")
    refused_on_open(db, counters, "records after its head")


def test_a_rollback_of_the_whole_file_is_caught_by_the_counter(
    kms: KeyService, db: Path, counters: Path, tmp_path: Path
) -> None:
    kms.policies(allow_sim=False).allow("sales", Rule(TeeType.SGX, M))
    kms.close()
    backup = tmp_path / "backup.db"
    copy_store(db, backup)
    with open_kms(db, counters) as service:
        service.policies(allow_sim=False).revoke("sales", M)
    copy_store(backup, db)  # the revocation undone, audit log and all
    refused_on_open(
        db, counters, "rolled back: its state is version 3, but it had reached version 4"
    )


def test_without_a_counter_a_whole_file_rollback_is_not_detected(
    kms: KeyService, db: Path, tmp_path: Path
) -> None:
    """What the README says is not detected: a copy of the whole file, where no counter is kept
    (or the counter was rolled back too)."""
    kms.policies(allow_sim=False).allow("sales", Rule(TeeType.SGX, M))
    kms.close()
    backup = tmp_path / "backup.db"
    copy_store(db, backup)
    with open_kms(db) as service:
        service.policies(allow_sim=False).revoke("sales", M)
    copy_store(backup, db)
    with open_kms(db) as again:
        assert again.verify_state().ok
        assert again.policies(allow_sim=False).evaluate("sales", claims()).allowed


def test_the_counter_follows_every_state_change(kms: KeyService, counters: Path) -> None:
    (counter,) = counters.glob("*.counter")
    assert json.loads(counter.read_text())["version"] == 2
    kms.rotate("pii")
    kms.unwrap(kms.generate_data_key("pii").wrapped)  # not a state change
    assert json.loads(counter.read_text())["version"] == 3
    assert kms.verify_state().counter == 3
    assert oct(counter.stat().st_mode & 0o777) == "0o600"


def test_a_forged_counter_is_refused(kms: KeyService, db: Path, counters: Path) -> None:
    (counter,) = counters.glob("*.counter")
    doc = json.loads(counter.read_text())
    counter.write_text(json.dumps({**doc, "version": 99}))
    refused_on_open(db, counters, "state counter was altered")


def test_a_deleted_counter_is_refused(kms: KeyService, db: Path, counters: Path) -> None:
    """Rolling the file back and deleting the counter: the counter's lock file shows that one
    was kept here."""
    (counter,) = counters.glob("*.counter")
    counter.unlink()
    refused_on_open(db, counters, "state counter was deleted")


def test_a_counter_is_made_on_the_first_open(kms: KeyService, db: Path, counters: Path) -> None:
    """A machine with no counter for this store yet (the store was copied here): the counter
    starts at the first open, not at the next change."""
    kms.close()
    shutil.rmtree(counters)
    with open_kms(db, counters) as again:
        assert again.verify_state().ok
    (counter,) = counters.glob("*.counter")
    assert json.loads(counter.read_text())["version"] == 2


# -- what must keep working ---------------------------------------------------------------------


def test_another_process_s_changes_are_accepted(db: Path, counters: Path) -> None:
    with open_kms(db, counters) as first, open_kms(db, counters) as second:
        first.create_key("sales")
        assert second.describe("sales").current_version == 1
        second.rotate("sales")
        second.policies(allow_sim=False).allow("sales", Rule(TeeType.SGX, M))
        assert first.describe("sales").current_version == 2
        assert first.policies(allow_sim=False).evaluate("sales", claims()).allowed
        assert first.verify_state().version == 3


def test_refused_operations_leave_the_state_alone(kms: KeyService) -> None:
    before = kms.verify_state().version
    with pytest.raises(Exception, match="exists"):
        kms.create_key("sales")
    with pytest.raises(Exception, match="no release rule"):
        kms.policies(allow_sim=False).revoke("sales", OTHER)
    assert kms.verify_state().version == before


def test_a_running_service_refuses_a_state_record_going_backwards(
    kms: KeyService, db: Path, tmp_path: Path
) -> None:
    old = tmp_path / "old.db"
    copy_store(db, old)
    kms.rotate("sales")
    copy_store(old, db)
    with pytest.raises(IntegrityError):
        kms.describe("sales")


def test_clock_skew_does_not_matter(db: Path, counters: Path) -> None:
    times = iter([dt.datetime(2030, 1, 1, tzinfo=dt.UTC), dt.datetime(2020, 1, 1, tzinfo=dt.UTC)])
    with KeyService(db, MASTER, counter_dir=counters, clock=lambda: next(times)) as service:
        service.create_key("a")
        service.create_key("b")
        assert service.verify_state().ok


def test_a_counter_being_written_for_the_first_time_is_waited_for(tmp_path: Path) -> None:
    """The lock file appears just before the first counter: a reader in between waits for the
    writer instead of calling the counter deleted."""
    import fcntl
    import os
    import threading
    import time

    from ppml._internal.canonical import canonical_json
    from ppml.kms.state import StateCounter

    store_id = b"\x01" * 16
    counter = StateCounter(tmp_path, bytes(32), store_id)
    lock = os.open(tmp_path / (counter.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # the writer, between making the lock and the counter

    def finish_writing() -> None:
        time.sleep(0.3)
        doc = {"format": "ppml-kms-counter/1", "store_id": store_id.hex(), "version": 3,
               "mac": counter._mac(3)}  # fmt: skip
        counter.path.write_bytes(canonical_json(doc))
        os.close(lock)

    writer = threading.Thread(target=finish_writing)
    writer.start()
    assert counter.read() == 3  # waited for the writer, then read its counter
    writer.join()
