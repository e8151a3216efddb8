"""File-system helpers: private directories and files, and outputs that appear only when complete.

Every output that ppml writes goes through `atomic_output`: the bytes go to a file with no name
in the destination directory (``O_TMPFILE``: it vanishes with the process, even on SIGKILL),
which is linked under a temporary name and renamed over the destination only after the caller's
block finished without an exception (including KeyboardInterrupt and, under the CLI, SIGTERM and
SIGHUP). Where a file system has no ``O_TMPFILE``, a hidden named temporary file is used, locked
(``flock``) while it is written. `sweep_stale` removes the temporaries of processes that died
(their lock is gone), so no partial output outlives the next run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "atomic_output",
    "ensure_private_dir",
    "in_memory_file_system",
    "locked",
    "locked_temp_dir",
    "memory_files",
    "old_name",
    "state_root",
    "sweep_stale",
    "unmark",
    "write_private",
]

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700
# .NAME.ppml-HEX.tmp: an output being written. `sweep_stale` removes one only if it is marked
# as ppml's (the marker file in a directory, the extended attribute on a file) and unlocked.
_TEMP = re.compile(r"\..+\.ppml-[0-9a-f]{12}\.tmp")
MARKER = ".ppml-temporary"
_XATTR = "user.ppml.temporary"
_NO_TMPFILE = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT}
_log = logging.getLogger(__name__)


_MEMORY_FILE_SYSTEMS = frozenset({"tmpfs", "ramfs"})
_fs_types: dict[int, str | None] = {}


def in_memory_file_system(fd: int) -> bool:
    """Whether the open file `fd` is on a file system held in memory (tmpfs, ramfs), where
    reserving a file's blocks up front means allocating and zeroing every page of it."""
    return _file_system_type(os.fstat(fd).st_dev) in _MEMORY_FILE_SYSTEMS


def _file_system_type(dev: int) -> str | None:
    """The type of the mounted file system whose device number is `dev`, from
    /proc/self/mountinfo (None when it cannot be told)."""
    if dev not in _fs_types:
        _fs_types[dev] = None
        wanted = f"{os.major(dev)}:{os.minor(dev)}"
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    # ID PARENT MAJOR:MINOR ROOT MOUNT-POINT OPTIONS [TAGS...] - TYPE SOURCE ...
                    fields = line.split()
                    if len(fields) > 2 and fields[2] == wanted and "-" in fields[6:]:
                        _fs_types[dev] = fields[fields.index("-", 6) + 1]
                        break
        except (OSError, IndexError):
            pass
    return _fs_types[dev]


def ensure_private_dir(path: Path) -> None:
    """Create `path` (and parents) if needed and make it 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    os.chmod(path, PRIVATE_DIR_MODE)


def state_root() -> Path:
    """`$XDG_STATE_HOME/ppml`, else `~/.local/state/ppml`: per-user state that outlives a run
    and must not live in a workspace (the KMS state counters)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(base) / "ppml"


def _temp_name(dest: Path, suffix: str = "tmp") -> Path:
    return dest.with_name(f".{dest.name}.ppml-{os.urandom(6).hex()}.{suffix}")


def _open_unnamed(dest: Path, mode: int) -> int | None:
    """A file with no name in `dest`'s directory, or None where the file system has none."""
    flags = getattr(os, "O_TMPFILE", 0)
    if not flags or not os.path.isdir("/proc/self/fd"):  # naming it later needs /proc
        return None
    try:
        return os.open(dest.parent, flags | os.O_WRONLY | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno in _NO_TMPFILE and dest.parent.is_dir():
            return None
        raise OSError(exc.errno, exc.strerror, str(dest)) from None


def _mark(fd: int, on: bool) -> None:
    """Mark a named temporary file as ppml's, or unmark it (a file system without user
    attributes: it cannot be marked, so a leftover is not swept)."""
    with contextlib.suppress(OSError):
        if on:
            os.setxattr(fd, _XATTR, b"1")
        else:
            os.removexattr(fd, _XATTR)


def _link_unnamed(fd: int, dest: Path) -> None:
    """Give the O_TMPFILE file `fd` the name `dest` (linkat with AT_SYMLINK_FOLLOW through
    /proc: `os.link` uses linkat, which follows the magic link, only when given a dir fd)."""
    dir_fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(
            f"/proc/self/fd/{fd}",
            dest.name,
            src_dir_fd=dir_fd,
            dst_dir_fd=dir_fd,
            follow_symlinks=True,
        )
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def atomic_output(
    dest: Path, *, mode: int = PRIVATE_FILE_MODE, fsync: bool = False
) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces `dest` atomically when the block completes.

    The file is created with `mode` from the start (never world-readable, even briefly), and
    has no name until it is complete. `fsync=True` flushes the data to stable storage before
    the rename, for files whose loss after a crash would lose keys.
    """
    dest = Path(dest)
    tmp = _temp_name(dest)
    fd = _open_unnamed(dest, mode)
    named = fd is None
    new = tmp.with_suffix(".new")  # a named temporary's first name, which `sweep_stale` ignores
    if fd is None:
        try:
            fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        except OSError as exc:
            # Name the destination the caller asked for, not the temporary file.
            raise OSError(exc.errno, exc.strerror, str(dest)) from None
    # Locked until the output is in place: `sweep_stale` leaves a locked temporary alone.
    fcntl.flock(fd, fcntl.LOCK_EX)
    if named:
        _mark(fd, True)  # a leftover named temporary is swept: it is ppml's
        os.rename(new, tmp)
    try:
        with os.fdopen(fd, "wb", buffering=0) as fh:
            yield fh
            if fsync:
                os.fsync(fh.fileno())
            if not named:
                _link_unnamed(fh.fileno(), tmp)
                named = True
            else:
                _mark(fh.fileno(), False)  # the output carries no trace of ppml's temporaries
            os.replace(tmp, dest)
        if fsync:
            _fsync_dir(dest.parent)
    except BaseException:
        if named:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock (``flock``) on the lock file `path` (made 0600 if missing, never
    through a symbolic link) for the block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, PRIVATE_FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked_temp_dir(dest: Path) -> Iterator[Path]:
    """A new private hidden directory beside `dest` (``.NAME.ppml-HEX.tmp``, holding the marker
    file `MARKER`), locked while the block runs so that `sweep_stale` leaves it alone; the
    caller removes the marker (`unmark`) before renaming it into place, or removes it."""
    tmp = _temp_name(dest)
    new = tmp.with_suffix(".new")  # a name `sweep_stale` ignores, until it is locked
    os.mkdir(new, PRIVATE_DIR_MODE)
    fd = os.open(new, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.close(os.open(new / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.rename(new, tmp)
        yield tmp
    finally:
        os.close(fd)


def unmark(directory: Path) -> None:
    """Remove the marker of a temporary directory that is about to become an output."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(directory / MARKER)


def old_name(dest: Path) -> Path:
    """Where `dest` goes while it is being replaced (``.NAME.ppml-HEX.old``)."""
    return _temp_name(dest, "old")


def sweep_stale(directory: Path) -> list[Path]:
    """Remove the ppml temporaries in `directory` that no running process holds (left by a
    process that was killed); returns what was removed. Only ppml's: the name, and the marker
    (a directory's marker file, a file's extended attribute), and no lock; never through a
    symbolic link."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        if not _TEMP.fullmatch(entry.name):
            continue
        path = Path(entry.path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a running process is writing it
            if not _marked(fd, entry):
                continue  # a file that only looks like ppml's
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            removed.append(path)
        finally:
            os.close(fd)
    for path in removed:
        _log.warning("removed %s, left by an interrupted ppml", path)
    return removed


def _marked(fd: int, entry: os.DirEntry[str]) -> bool:
    if entry.is_dir(follow_symlinks=False):
        try:
            st = os.stat(MARKER, dir_fd=fd, follow_symlinks=False)
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode)
    if not entry.is_file(follow_symlinks=False):
        return False
    try:
        return os.getxattr(fd, _XATTR) == b"1"
    except OSError:
        return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private(dest: Path, data: bytes, *, mode: int = PRIVATE_FILE_MODE) -> None:
    """Write `data` to `dest` atomically and durably, with `mode` (0600 by default)."""
    with atomic_output(dest, mode=mode, fsync=True) as fh:
        fh.write(data)


@contextlib.contextmanager
def memory_files(*blobs: bytes) -> Iterator[list[str]]:
    """Each of `blobs` as a file name for APIs that load only files (`ssl`, httpx): in-memory
    files (memfd, never on disk) named ``/proc/self/fd/N``, closed when the block ends."""
    if not hasattr(os, "memfd_create"):  # pragma: no cover -- Linux has memfd
        raise OSError("no in-memory files on this system")
    fds: list[int] = []
    try:
        for data in blobs:
            fd = os.memfd_create("ppml-key-material", 0)
            fds.append(fd)
            os.write(fd, data)
        yield [f"/proc/self/fd/{fd}" for fd in fds]
    finally:
        for fd in fds:
            os.close(fd)
