"""The KMS audit log: records for every operation, and tamper detection by editing the file."""

from __future__ import annotations

import datetime as dt
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ppml.crypto.envelope import WrappedKey
from ppml.errors import IntegrityError, KeyNotFound, UsageError
from ppml.kms import AuditVerification, KeyService

MASTER = bytes(range(32, 64))
RECORDS = 8
START = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def _clock() -> Callable[[], dt.datetime]:
    ticks = iter(range(1, 10_000))
    return lambda: START + dt.timedelta(seconds=next(ticks))


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Path]:
    """A store with RECORDS audit records of several kinds; the service is closed again."""
    path = tmp_path / "kms.db"
    with KeyService(path, MASTER, actor="tester", clock=_clock()) as kms:
        kms.create_key("alpha")
        kms.create_key("beta")
        dek = kms.generate_data_key("alpha")
        kms.rotate("alpha")
        kms.unwrap(dek.wrapped)
        kms.rewrap(dek.wrapped)
        with pytest.raises(KeyNotFound):
            kms.generate_data_key("ghost")
        kms.generate_data_key("beta")
        assert kms.audit.verify() == AuditVerification(
            True, RECORDS, None, f"{RECORDS} records, chain and head intact"
        )
    yield path


def _edit(db: Path, *statements: str | tuple[str, tuple[object, ...]]) -> None:
    raw = sqlite3.connect(db)
    with raw:
        for statement in statements:
            sql, args = statement if isinstance(statement, tuple) else (statement, ())
            raw.execute(sql, args)
    raw.close()


def _verify(db: Path) -> AuditVerification:
    with KeyService(db, MASTER) as kms:
        return kms.audit.verify()


def test_every_operation_is_recorded(db: Path) -> None:
    with KeyService(db, MASTER) as kms:
        entries = kms.audit.entries()
    assert [(e.seq, e.op, e.key_name, e.version, e.outcome) for e in entries] == [
        (1, "create", "alpha", 1, "ok"),
        (2, "create", "beta", 1, "ok"),
        (3, "generate_data_key", "alpha", 1, "ok"),
        (4, "rotate", "alpha", 2, "ok"),
        (5, "unwrap", "alpha", 1, "ok"),
        (6, "rewrap", "alpha", 2, "ok"),
        (7, "generate_data_key", "ghost", None, "denied"),
        (8, "generate_data_key", "beta", 1, "ok"),
    ]
    assert {e.actor for e in entries} == {"tester"}
    assert entries[0].to_dict() == {
        "seq": 1,
        "ts": "2030-01-01T00:00:01.000000+00:00",
        "actor": "tester",
        "op": "create",
        "key_name": "alpha",
        "version": 1,
        "outcome": "ok",
        "detail": {"state": 1},  # the KMS state version this operation made
    }


def test_entries_can_be_limited_and_filtered(db: Path) -> None:
    with KeyService(db, MASTER) as kms:
        assert [e.seq for e in kms.audit.entries(limit=3)] == [6, 7, 8]
        assert [e.seq for e in kms.audit.entries(key_name="beta")] == [2, 8]
        assert [e.seq for e in kms.audit.entries(limit=1, key_name="alpha")] == [6]
        assert kms.audit.entries(limit=0) == []
        with pytest.raises(UsageError):
            kms.audit.entries(limit=-1)


def test_appending_continues_a_valid_chain(db: Path) -> None:
    with KeyService(db, MASTER) as kms:
        kms.rotate("beta")
        kms.unwrap(kms.generate_data_key("beta").wrapped)
        assert kms.audit.verify().count == RECORDS + 3


EDITS = {
    "ts": "UPDATE audit SET ts = '2030-01-01T00:00:00.000000+00:00' WHERE seq = 4",
    "actor": "UPDATE audit SET actor = 'someone-else' WHERE seq = 4",
    "op": "UPDATE audit SET op = 'create' WHERE seq = 4",
    "key_name": "UPDATE audit SET key_name = 'beta' WHERE seq = 4",
    "key_name-none": "UPDATE audit SET key_name = NULL WHERE seq = 4",
    "version": "UPDATE audit SET version = 3 WHERE seq = 4",
    "version-as-text": "UPDATE audit SET version = 'v2' WHERE seq = 4",
    "outcome": "UPDATE audit SET outcome = 'denied' WHERE seq = 4",
    "detail": """UPDATE audit SET detail = '{"previous_version":0}' WHERE seq = 4""",
    "detail-respelled": """UPDATE audit SET detail = '{"previous_version": 1}' WHERE seq = 4""",
    "detail-not-json": "UPDATE audit SET detail = 'nope' WHERE seq = 4",
    "mac": "UPDATE audit SET mac = zeroblob(32) WHERE seq = 4",
    "mac-as-text": "UPDATE audit SET mac = 'x' WHERE seq = 4",
    "mac-of-next-row": "UPDATE audit SET mac = (SELECT mac FROM audit WHERE seq = 5) WHERE seq = 4",
}


@pytest.mark.parametrize("edit", EDITS.values(), ids=EDITS.keys())
def test_an_edited_record_is_detected(db: Path, edit: str) -> None:
    _edit(db, edit)
    result = _verify(db)
    assert (result.ok, result.first_bad_seq, result.count) == (False, 4, 3)
    assert result.reason == "record 4 does not match its MAC"


def test_a_record_deleted_in_the_middle_is_detected(db: Path) -> None:
    _edit(db, "DELETE FROM audit WHERE seq = 5")
    result = _verify(db)
    assert (result.ok, result.first_bad_seq, result.reason) == (False, 5, "record 5 is missing")


def test_a_renumbered_record_is_detected(db: Path) -> None:
    _edit(db, "UPDATE audit SET seq = 100 WHERE seq = 5")
    assert _verify(db).first_bad_seq == 5


@pytest.mark.parametrize("deleted", [1, 3])
def test_deleted_last_records_are_detected(db: Path, deleted: int) -> None:
    _edit(db, f"DELETE FROM audit WHERE seq > {RECORDS - deleted}")
    result = _verify(db)
    first_missing = RECORDS - deleted + 1
    assert (result.ok, result.count, result.first_bad_seq) == (
        False,
        RECORDS - deleted,
        first_missing,
    )
    assert result.reason == f"records {first_missing} to {RECORDS} are missing"


def test_deleting_every_record_is_detected(db: Path) -> None:
    _edit(db, "DELETE FROM audit")
    assert (_verify(db).ok, _verify(db).first_bad_seq) == (False, 1)


def test_a_record_inserted_in_the_middle_is_detected(db: Path) -> None:
    _edit(
        db,
        "UPDATE audit SET seq = seq + 1000 WHERE seq >= 4",
        "UPDATE audit SET seq = seq - 999 WHERE seq > 1000",
        "INSERT INTO audit SELECT 4, ts, actor, op, key_name, version, outcome, detail, mac "
        "FROM audit WHERE seq = 3",
    )
    result = _verify(db)
    assert (result.ok, result.first_bad_seq) == (False, 4)


def test_a_record_appended_behind_the_head_is_detected(db: Path) -> None:
    _edit(
        db,
        f"INSERT INTO audit SELECT {RECORDS + 1}, ts, actor, op, key_name, version, outcome, "
        f"detail, mac FROM audit WHERE seq = {RECORDS}",
    )
    result = _verify(db)
    assert (result.ok, result.first_bad_seq) == (False, RECORDS + 1)


def test_a_record_before_the_first_is_detected(db: Path) -> None:
    _edit(db, "INSERT INTO audit SELECT 0, ts, actor, op, key_name, version, outcome, detail, mac "
          "FROM audit WHERE seq = 1")  # fmt: skip
    result = _verify(db)
    assert (result.ok, result.first_bad_seq) == (False, 0)


def test_swapped_records_are_detected(db: Path) -> None:
    _edit(
        db,
        "UPDATE audit SET seq = -3 WHERE seq = 3",
        "UPDATE audit SET seq = 3 WHERE seq = 4",
        "UPDATE audit SET seq = 4 WHERE seq = -3",
    )
    result = _verify(db)
    assert (result.ok, result.first_bad_seq) == (False, 3)


HEAD_EDITS = {
    "deleted": "DELETE FROM audit_head",
    "seq": f"UPDATE audit_head SET seq = {RECORDS - 1}",
    "mac": "UPDATE audit_head SET mac = (SELECT mac FROM audit WHERE seq = 3)",
    "head_mac": "UPDATE audit_head SET head_mac = zeroblob(32)",
}


@pytest.mark.parametrize("edit", HEAD_EDITS.values(), ids=HEAD_EDITS.keys())
def test_an_edited_head_is_detected_and_stops_new_records(db: Path, edit: str) -> None:
    _edit(db, edit)
    result = _verify(db)
    assert not result.ok and result.count == RECORDS
    with KeyService(db, MASTER) as kms, pytest.raises(IntegrityError, match="audit log's head"):
        kms.rotate("alpha")


def test_a_different_master_key_cannot_verify(db: Path) -> None:
    with KeyService(db, bytes(32)) as kms, pytest.raises(Exception, match="master key"):
        kms.audit.verify()


def test_records_carry_no_key_material(tmp_path: Path) -> None:
    with KeyService(tmp_path / "kms.db", MASTER) as kms:
        kms.create_key("alpha")
        dek = kms.generate_data_key("alpha")
        kms.unwrap(WrappedKey("alpha", 1, dek.wrapped.blob))
        raw = sqlite3.connect(tmp_path / "kms.db")
        dump = "\n".join(raw.iterdump())
        raw.close()
    assert dek.plaintext.hex().upper() not in dump.upper()
    assert MASTER.hex().upper() not in dump.upper()


def test_rolling_back_the_whole_file_is_not_detected(db: Path, tmp_path: Path) -> None:
    """The documented limit: an older copy of the entire file is itself a valid log."""
    copy = tmp_path / "old.db"
    shutil.copyfile(db, copy)
    with KeyService(db, MASTER) as kms:
        kms.rotate("beta")
    shutil.copyfile(copy, db)
    assert _verify(db).ok
