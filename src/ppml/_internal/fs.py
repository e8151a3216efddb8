"""File-system helpers: private directories and files, and outputs that appear only when complete.

Every output that ppml writes goes through `atomic_output`: the bytes go to a hidden temporary
file in the destination directory, which is renamed over the destination only after the caller's
block finished without an exception (including KeyboardInterrupt). On any failure the temporary
file is removed, so no partial output is ever left behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "atomic_output",
    "ensure_private_dir",
    "state_root",
    "write_private",
]

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


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


def _temp_name(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.tmp")


@contextlib.contextmanager
def atomic_output(
    dest: Path, *, mode: int = PRIVATE_FILE_MODE, fsync: bool = False
) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces `dest` atomically when the block completes.

    The temporary file is created with `mode` from the start (never world-readable, even
    briefly). `fsync=True` flushes the data to stable storage before the rename, for files
    whose loss after a crash would lose keys.
    """
    dest = Path(dest)
    tmp = _temp_name(dest)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except OSError as exc:
        # Name the destination the caller asked for, not the temporary file.
        raise OSError(exc.errno, exc.strerror, str(dest)) from None
    try:
        with os.fdopen(fd, "wb", buffering=0) as fh:
            yield fh
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, dest)
        if fsync:
            _fsync_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
