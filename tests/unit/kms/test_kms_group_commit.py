"""Group commit in the key store: concurrent writers share commits, failures stay their own."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from ppml.kms.sqlite import KeyDatabase


def _store(tmp_path: Path) -> KeyDatabase:
    return KeyDatabase(
        tmp_path / "kms.sqlite", new_store_id=lambda: b"\x01" * 16, on_create=lambda conn, sid: None
    )


def _count(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT count(*) FROM meta WHERE name LIKE 'test-%'").fetchone()[0])


def test_many_threads_all_commit_and_failures_are_undone_alone(tmp_path: Path) -> None:
    store = _store(tmp_path)
    results: dict[int, object] = {}

    def writer(i: int) -> None:
        def work(conn: sqlite3.Connection) -> int:
            conn.execute("INSERT INTO meta (name, value) VALUES (?, ?)", (f"test-{i}", b"x"))
            if i % 5 == 0:
                raise ValueError(f"refused {i}")
            return i

        try:
            results[i] = store.write_shared(work)
        except ValueError as exc:
            results[i] = exc

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    assert all(results[i] == i for i in range(40) if i % 5)
    assert all(isinstance(results[i], ValueError) for i in range(0, 40, 5))
    assert _count(tmp_path / "kms.sqlite") == 32  # the 8 failures left nothing behind


def test_a_closed_store_refuses(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.close()
    with pytest.raises(Exception, match="closed"):
        store.write_shared(lambda conn: None)
