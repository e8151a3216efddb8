"""The embedded KMS: key lifecycle, data keys across rotations, refusals, and the master key."""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import logging
import os
import sqlite3
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ppml.crypto.envelope import DataKeyProvider, WrappedKey
from ppml.errors import (
    ConfigurationError,
    IntegrityError,
    KeyAccessError,
    KeyExists,
    KeyNotFound,
    KeyVersionNotFound,
    UsageError,
)
from ppml.kms import KeyInfo, KeyService, KeyVersionInfo

MASTER = bytes(range(32))
START = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


class StepClock:
    """A clock that advances one second per reading."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> dt.datetime:
        self.now += dt.timedelta(seconds=1)
        return self.now


class CountingRandom:
    """Deterministic, distinct 'random' bytes; remembers everything it handed out."""

    def __init__(self) -> None:
        self._counter = itertools.count()
        self.issued: list[bytes] = []
        self.fail = False

    def __call__(self, n: int) -> bytes:
        if self.fail:
            return b""
        data = hashlib.sha256(next(self._counter).to_bytes(8, "big")).digest()[:n]
        self.issued.append(data)
        return data


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "kms.db"


@pytest.fixture
def kms(db: Path) -> Iterator[KeyService]:
    with KeyService(db, MASTER, clock=StepClock(), random_bytes=CountingRandom()) as service:
        yield service


def _last(kms: KeyService) -> dict[str, object]:
    return kms.audit.entries(limit=1)[0].to_dict()


def test_create_list_describe(kms: KeyService) -> None:
    info = kms.create_key("alpha")
    kms.create_key("beta")
    assert info == KeyInfo(
        "alpha", START + dt.timedelta(seconds=1), 1, (KeyVersionInfo(1, info.created_at),)
    )
    assert [k.name for k in kms.list_keys()] == ["alpha", "beta"]
    assert kms.describe("alpha") == info
    assert info.to_dict() == {
        "name": "alpha",
        "created_at": "2030-01-01T00:00:01.000000+00:00",
        "current_version": 1,
        "versions": [{"version": 1, "created_at": "2030-01-01T00:00:01.000000+00:00"}],
    }
    with pytest.raises(KeyNotFound):
        kms.describe("gamma")


def test_create_refuses_duplicates_and_bad_names(kms: KeyService) -> None:
    kms.create_key("alpha")
    with pytest.raises(KeyExists):
        kms.create_key("alpha")
    assert _last(kms)["outcome"] == "denied"
    with pytest.raises(UsageError):
        kms.create_key("../etc")
    assert len(kms.audit.entries()) == 2


def test_rotation_keeps_old_data_keys_readable(kms: KeyService) -> None:
    kms.create_key("alpha")
    old = kms.generate_data_key("alpha")
    info = kms.rotate("alpha")
    assert info.current_version == 2
    assert [v.version for v in info.versions] == [1, 2]
    new = kms.generate_data_key("alpha")
    assert (old.wrapped.version, new.wrapped.version) == (1, 2)
    assert len(new.plaintext) == 32 and new.plaintext != old.plaintext
    assert kms.unwrap(old.wrapped) == old.plaintext
    assert kms.unwrap(new.wrapped) == new.plaintext
    assert kms.describe("alpha") == info


def test_rewrap_moves_a_data_key_to_the_newest_version(kms: KeyService) -> None:
    kms.create_key("alpha")
    dek = kms.generate_data_key("alpha")
    kms.rotate("alpha")
    kms.rotate("alpha")
    rewrapped = kms.rewrap(dek.wrapped)
    assert (rewrapped.key_name, rewrapped.version) == ("alpha", 3)
    assert rewrapped.blob != dek.wrapped.blob
    assert kms.unwrap(rewrapped) == dek.plaintext
    assert _last(kms)["op"] == "unwrap"
    rewrap_record = kms.audit.entries(limit=2)[0]
    assert (rewrap_record.op, rewrap_record.version) == ("rewrap", 3)
    assert rewrap_record.detail == {"from_version": 1}


def test_implements_the_data_key_provider_protocol(kms: KeyService) -> None:
    assert isinstance(kms, DataKeyProvider)


def test_injected_clock_and_random_make_results_reproducible(tmp_path: Path) -> None:
    blobs = []
    for name in ("a.db", "b.db"):
        with KeyService(
            tmp_path / name, MASTER, clock=StepClock(), random_bytes=CountingRandom()
        ) as service:
            service.create_key("alpha")
            blobs.append(service.generate_data_key("alpha").wrapped.blob)
            assert [e.ts for e in service.audit.entries()] == [
                START + dt.timedelta(seconds=s) for s in (1, 2)
            ]
    assert blobs[0] == blobs[1]


TAMPERINGS: dict[str, Callable[[WrappedKey], WrappedKey]] = {
    "flipped-tag-bit": lambda w: WrappedKey(
        w.key_name, w.version, w.blob[:-1] + bytes([w.blob[-1] ^ 1])
    ),
    "flipped-nonce-bit": lambda w: WrappedKey(
        w.key_name, w.version, bytes([w.blob[0] ^ 1]) + w.blob[1:]
    ),
    "truncated": lambda w: WrappedKey(w.key_name, w.version, w.blob[:-16]),
    "other-key-name": lambda w: WrappedKey("beta", w.version, w.blob),
    "other-version": lambda w: WrappedKey(w.key_name, 1, w.blob),
}


@pytest.mark.parametrize("tamper", TAMPERINGS.values(), ids=TAMPERINGS.keys())
def test_a_tampered_wrapped_key_fails_opaquely_and_is_audited(
    kms: KeyService, tamper: Callable[[WrappedKey], WrappedKey]
) -> None:
    for name in ("alpha", "beta"):
        kms.create_key(name)
        kms.rotate(name)
    wrapped = kms.generate_data_key("alpha").wrapped
    with pytest.raises(IntegrityError) as excinfo:
        kms.unwrap(tamper(wrapped))
    assert str(excinfo.value) == "integrity check failed"
    record = _last(kms)
    assert (record["op"], record["outcome"]) == ("unwrap", "error")
    assert record["detail"] == {"reason": "wrapped data key failed authentication"}
    with pytest.raises(IntegrityError):
        kms.rewrap(tamper(wrapped))
    assert kms.unwrap(wrapped)  # the genuine one still opens


def test_unknown_names_and_versions_are_refused_and_audited(kms: KeyService) -> None:
    kms.create_key("alpha")
    wrapped = kms.generate_data_key("alpha").wrapped
    with pytest.raises(KeyNotFound):
        kms.unwrap(WrappedKey("ghost", 1, wrapped.blob))
    assert _last(kms) | {"seq": 0, "ts": ""} == {
        "seq": 0,
        "ts": "",
        "actor": "local",
        "op": "unwrap",
        "key_name": "ghost",
        "version": 1,
        "outcome": "denied",
        "detail": {"reason": "unknown key"},
    }
    with pytest.raises(KeyVersionNotFound):
        kms.unwrap(WrappedKey("alpha", 7, wrapped.blob))
    assert (_last(kms)["version"], _last(kms)["detail"]) == (7, {"reason": "unknown version"})
    for operation in (kms.rotate, kms.generate_data_key):
        with pytest.raises(KeyNotFound):
            operation("ghost")
        assert (_last(kms)["outcome"], _last(kms)["key_name"]) == ("denied", "ghost")
    with pytest.raises(KeyVersionNotFound):
        kms.rewrap(WrappedKey("alpha", 2, wrapped.blob))
    assert (_last(kms)["op"], _last(kms)["outcome"]) == ("rewrap", "denied")
    assert kms.audit.verify().ok


def test_a_tampered_key_encryption_key_is_an_integrity_error(kms: KeyService, db: Path) -> None:
    kms.create_key("alpha")
    wrapped = kms.generate_data_key("alpha").wrapped
    with sqlite3.connect(db) as raw:
        (blob,) = raw.execute("SELECT wrapped_kek FROM key_versions").fetchone()
        raw.execute("UPDATE key_versions SET wrapped_kek = ?", (blob[:-1] + bytes([blob[-1] ^ 1]),))
    raw.close()
    with pytest.raises(IntegrityError, match="key 'alpha': its versions differ"):
        kms.unwrap(wrapped)
    assert _last(kms)["outcome"] == "error"
    assert _last(kms)["detail"] == {
        "reason": "state check failed",
        "problem": "key 'alpha': its versions differ",
    }


def test_a_wrong_master_key_fails_clearly_and_writes_nothing(kms: KeyService, db: Path) -> None:
    kms.create_key("alpha")
    wrapped = kms.generate_data_key("alpha").wrapped
    with KeyService(db, bytes(32)) as wrong:
        with pytest.raises(KeyAccessError, match="the master key does not open this key store"):
            wrong.unwrap(wrapped)
        for attempt in (
            lambda: wrong.create_key("beta"),
            lambda: wrong.rotate("alpha"),
            lambda: wrong.generate_data_key("alpha"),
            wrong.list_keys,
            wrong.audit.verify,
        ):
            with pytest.raises(KeyAccessError):
                attempt()
    assert kms.audit.verify().count == 2
    assert [k.current_version for k in kms.list_keys()] == [1]


def test_the_master_key_must_be_32_bytes(db: Path) -> None:
    with pytest.raises(ConfigurationError):
        KeyService(db, b"short")
    assert not db.exists()


def test_a_failed_operation_leaves_no_trace(db: Path) -> None:
    rnd = CountingRandom()
    with KeyService(db, MASTER, random_bytes=rnd) as kms:
        kms.create_key("alpha")
        rnd.fail = True
        with pytest.raises(ConfigurationError):
            kms.rotate("alpha")
        assert kms.describe("alpha").current_version == 1
        assert [e.op for e in kms.audit.entries()] == ["create"]


def test_rotation_and_its_audit_record_commit_together(kms: KeyService, db: Path) -> None:
    kms.create_key("alpha")
    with sqlite3.connect(db) as raw:
        raw.execute("UPDATE audit_head SET head_mac = zeroblob(32)")
    raw.close()
    with pytest.raises(IntegrityError):
        kms.rotate("alpha")
    assert kms.describe("alpha").current_version == 1
    assert len(kms.audit.entries()) == 1


def test_files_are_private(tmp_path: Path) -> None:
    db = tmp_path / "kms.db"
    previous = os.umask(0o022)
    try:
        with KeyService(db, MASTER) as kms:
            kms.create_key("alpha")
            files = [db, db.with_name("kms.db-wal"), db.with_name("kms.db-shm")]
            assert all(f.exists() for f in files)
            assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o600}
    finally:
        os.umask(previous)


def test_an_existing_store_file_is_made_private(tmp_path: Path) -> None:
    db = tmp_path / "kms.db"
    KeyService(db, MASTER).close()
    os.chmod(db, 0o644)
    KeyService(db, MASTER).close()
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


def test_foreign_files_and_missing_directories_are_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as raw:
        raw.execute("CREATE TABLE t (x)")
    raw.close()
    with pytest.raises(ConfigurationError, match="not a ppml key store"):
        KeyService(other, MASTER)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(ConfigurationError):
        KeyService(junk, MASTER)
    with pytest.raises(ConfigurationError):
        KeyService(tmp_path / "missing" / "kms.db", MASTER)


def test_no_key_material_in_reprs_errors_or_logs(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rnd = CountingRandom()
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    with KeyService(db, MASTER, random_bytes=rnd) as kms:
        kms.create_key("alpha")
        dek = kms.generate_data_key("alpha")
        texts += [repr(kms), repr(kms.audit), repr(dek), repr(kms.describe("alpha"))]
        for bad in (WrappedKey("alpha", 1, bytes(60)), WrappedKey("alpha", 9, bytes(60))):
            with pytest.raises((KeyAccessError, IntegrityError)) as excinfo:
                kms.unwrap(bad)
            texts.append(str(excinfo.value))
        texts += [str(e.to_dict()) for e in kms.audit.entries()]
    with KeyService(db, bytes(32)) as wrong, pytest.raises(KeyAccessError) as excinfo:
        wrong.unwrap(dek.wrapped)
    texts += [str(excinfo.value), caplog.text]
    secrets = [MASTER, dek.plaintext, *rnd.issued]
    for text in texts:
        for secret in secrets:
            assert secret.hex() not in text and repr(secret)[2:-1] not in text


def test_closed_service_refuses_work(db: Path) -> None:
    kms = KeyService(db, MASTER)
    kms.create_key("alpha")
    kms.close()
    kms.close()
    with pytest.raises(UsageError):
        kms.generate_data_key("alpha")


def test_invalid_actor_and_naive_clock_are_refused(db: Path) -> None:
    with pytest.raises(UsageError):
        KeyService(db, MASTER, actor="")
    with KeyService(db, MASTER, clock=lambda: dt.datetime(2030, 1, 1)) as kms:
        with pytest.raises(ConfigurationError):
            kms.create_key("alpha")
        assert kms.list_keys() == []
