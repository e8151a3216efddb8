"""Outputs that appear only when complete, and the sweep of temporaries a killed process left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ppml._internal import fs


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_an_output_has_no_name_until_it_is_complete(tmp_path: Path) -> None:
    dest = tmp_path / "out.bin"
    with fs.atomic_output(dest) as fh:
        fh.write(b"secret plaintext")
        assert _names(tmp_path) == []  # O_TMPFILE: nothing anyone could find or leave behind
    assert dest.read_bytes() == b"secret plaintext"
    assert oct(dest.stat().st_mode & 0o777) == "0o600"


def test_a_failed_output_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"previous")
    with pytest.raises(RuntimeError), fs.atomic_output(dest) as fh:
        fh.write(b"partial")
        raise RuntimeError("boom")
    assert _names(tmp_path) == ["out.bin"]
    assert dest.read_bytes() == b"previous"


def test_without_o_tmpfile_a_locked_named_temporary_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fs, "_open_unnamed", lambda dest, mode: None)
    dest = tmp_path / "out.bin"
    with fs.atomic_output(dest) as fh:
        fh.write(b"data")
        (tmp,) = tmp_path.iterdir()
        assert tmp.name.startswith(".out.bin.ppml-") and tmp.name.endswith(".tmp")
        assert fs.sweep_stale(tmp_path) == []  # held by this process: left alone
    assert _names(tmp_path) == ["out.bin"]
    with pytest.raises(OSError):  # the output carries no marker of ppml's temporaries
        os.getxattr(dest, "user.ppml.temporary")


_KILLED_WRITER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from ppml._internal import fs
    if sys.argv[2] == "named":
        fs._open_unnamed = lambda dest, mode: None
    target = Path(sys.argv[1])
    if sys.argv[3] == "dir":
        with fs.locked_temp_dir(target) as tmp:
            with fs.atomic_output(tmp / "done.csv") as fh:
                fh.write(b"completed plaintext")
            print("ready", flush=True)
            time.sleep(60)
    else:
        with fs.atomic_output(target) as fh:
            fh.write(b"partial plaintext")
            print("ready", flush=True)
            time.sleep(60)
    """
)


@pytest.mark.parametrize("kind", ["file", "dir"])
@pytest.mark.parametrize("how", ["unnamed", "named"])
def test_a_killed_writer_s_temporaries_are_swept(tmp_path: Path, how: str, kind: str) -> None:
    target = tmp_path / "out.csv"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(target), how, kind],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        before = _names(tmp_path)
        assert fs.sweep_stale(tmp_path) == []  # alive: nothing is taken from under it
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    left = _names(tmp_path)
    if how == "unnamed" and kind == "file":
        assert before == left == []  # vanished with the process
        return
    assert len(left) == 1 and left[0].startswith(".out.csv.ppml-")
    removed = fs.sweep_stale(tmp_path)
    assert [p.name for p in removed] == left
    assert _names(tmp_path) == []


def test_the_sweep_touches_only_ppml_temporaries(tmp_path: Path) -> None:
    keep = [".hidden", ".x.tmp", ".x.abcdef123456.tmp", "data.ppml-abcdef123456.tmp", "x.csv"]
    for name in keep:
        (tmp_path / name).write_text("user data")
    (tmp_path / ".y.ppml-abcdef123456.new").mkdir()  # being made by a live process
    assert fs.sweep_stale(tmp_path) == []
    assert _names(tmp_path) == sorted([*keep, ".y.ppml-abcdef123456.new"])


def test_the_sweep_does_not_follow_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "file").write_text("keep me")
    work = tmp_path / "work"
    work.mkdir()
    (work / ".out.ppml-abcdef123456.tmp").symlink_to(victim)
    assert fs.sweep_stale(work) == []
    assert (victim / "file").read_text() == "keep me"


def test_the_sweep_leaves_look_alikes_that_ppml_did_not_make(tmp_path: Path) -> None:
    """A directory or file that only has the name of a ppml temporary (no marker file in the
    directory, no ppml attribute on the file) is the user's: never removed."""
    mine = tmp_path / ".mine.ppml-cccccccccccc.tmp"
    mine.mkdir()
    (mine / "notes.txt").write_text("user data")
    report = tmp_path / ".Report.ppml-0123456789ab.tmp"
    report.write_text("important")
    assert fs.sweep_stale(tmp_path) == []
    assert (mine / "notes.txt").read_text() == "user data"
    assert report.read_text() == "important"


def test_an_output_directory_holds_no_marker(tmp_path: Path) -> None:
    from ppml.data.files import output_directory

    with output_directory(tmp_path / "out") as staging:
        assert (staging / fs.MARKER).is_file()
        (staging / "part-0.csv").write_text("a\n")
    assert _names(tmp_path / "out") == ["part-0.csv"]


def test_file_systems_held_in_memory_are_told_apart(tmp_path: Path) -> None:
    mounts = {}
    with open("/proc/self/mounts") as fh:
        for line in fh:
            _, mount_point, fs_type, *_ = line.split()
            mounts[mount_point] = fs_type
    for path in (Path("/dev/shm"), tmp_path):
        if not path.is_dir():
            continue
        # The longest mount point that holds `path` gives its file system's type.
        holder = max((m for m in mounts if path.resolve().is_relative_to(m)), key=len)
        fd = os.open(path, os.O_RDONLY)
        try:
            expected = mounts[holder] in ("tmpfs", "ramfs")
            assert fs.in_memory_file_system(fd) is expected, (path, mounts[holder])
        finally:
            os.close(fd)
