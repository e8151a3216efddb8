"""The registry of running workloads' claims: who may write where, who needs what unchanged."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ppml.tee.claims import Claim, ClaimConflict, Registry


def claim(writable: list[str], readonly: list[str] = (), protected: list[str] = ()) -> Claim:
    return Claim("1:1", tuple(writable), tuple(readonly), tuple(protected), "job")


def test_a_path_in_a_data_directory_can_be_changed() -> None:
    c = claim(["/p"])
    assert c.can_change("/p/job.sh")
    assert c.can_change("/p/sub/deep/job.sh")
    assert c.can_change("/p")
    assert not c.can_change("/q/job.sh")
    assert not c.can_change("/pp/job.sh")


def test_a_read_only_mount_point_directly_in_a_data_directory_protects() -> None:
    """/p/.venv bound read-only (its parent is the data directory's root, which cannot be
    renamed): its files are safe. /p/envs/venv is not: /p/envs can be moved aside."""
    c = claim(["/p"], readonly=["/p/.venv", "/p/envs/venv", "/p/job.sh", "/elsewhere/x"])
    assert not c.can_change("/p/.venv/lib/site.py")
    assert not c.can_change("/p/job.sh")
    assert c.can_change("/p/envs/venv/lib/site.py")
    assert c.can_change("/p/job2.sh")


def test_conflicting_claims_are_refused_both_ways(tmp_path: Path) -> None:
    """A launcher (this process) holds a claim; a second one that could write the first one's
    files, or whose files the first one could write, is refused; a disjoint one is not."""
    reg = Registry(tmp_path / "runs")
    first = reg.claim(writable=["/p"], readonly=["/p/.venv"], protected=["/p/a.sh"], what="a")
    with pytest.raises(ClaimConflict, match=r"/p/b\.sh is needed unchanged.*process \d+: a"):
        reg.claim(writable=["/q"], readonly=[], protected=["/p/b.sh"], what="b")
    with pytest.raises(ClaimConflict, match=r"--data directory holds /p/a\.sh"):
        reg.claim(writable=["/"], readonly=[], protected=["/q/b.sh"], what="b")
    second = reg.claim(
        writable=["/q"], readonly=[], protected=["/q/b.sh", "/p/.venv/lib/x.py"], what="b"
    )
    reg.release(first)
    reg.release(second)
    assert reg.claim(writable=["/"], readonly=[], protected=["/p/b.sh"], what="c")


def test_claims_of_processes_that_ended_are_dropped(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "runs")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = reg.claim(
            writable=["/p"], readonly=[], protected=[], what="a", owner_pid=child.pid
        )
        with pytest.raises(ClaimConflict):
            reg.claim(writable=["/q"], readonly=[], protected=["/p/x"], what="b")
    finally:
        child.kill()
        child.wait()
    assert reg.claim(writable=["/q"], readonly=[], protected=["/p/x"], what="b")
    assert not record.exists()
