"""Processes by identity: a pid with its start time, so that a reused pid is not mistaken."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from ppml._internal.fs import write_private

__all__ = [
    "OWNER_FILE",
    "WITHHELD_ENV",
    "keep_memory_private",
    "process_identity",
    "record_owner",
    "sweep_orphaned",
    "without_secrets",
]

OWNER_FILE = "owner"  # in a private directory: the identity of the process it belongs to
# What no child process of ppml inherits: the workspace passphrase unseals every key.
WITHHELD_ENV = frozenset({"PPML_PASSPHRASE"})


@functools.cache
def keep_memory_private() -> bool:
    """Keys or decrypted data live in this process's memory from here on: no core dump may write
    them to a disk (soft limit 0), and no other process of the user, this one's children
    included, may read its memory or take its file descriptors (``ptrace``, ``/proc/PID/mem``,
    ``pidfd_getfd``): not dumpable. Whether that took (False where unsupported)."""
    import contextlib
    import ctypes
    import resource

    with contextlib.suppress(OSError, ValueError):
        _soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
        resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    try:
        return int(ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)) == 0  # DUMPABLE 0
    except (OSError, AttributeError):
        return False


def without_secrets(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """`env` for a child process (a probe, pip, a JVM): without the passphrase."""
    return {k: v for k, v in env.items() if k not in WITHHELD_ENV}


def process_identity(pid: int) -> str | None:
    """``PID:START`` (start time in clock ticks since boot) of a live, non-zombie process;
    None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    rest = stat.rsplit(")", 1)[1].split()
    if rest[0] in ("Z", "X"):
        return None
    return f"{pid}:{rest[19]}"


def record_owner(directory: Path, pid: int) -> None:
    """Record in `directory` that it lives as long as process `pid` (see `sweep_orphaned`)."""
    identity = process_identity(pid)
    if identity is not None:
        write_private(directory / OWNER_FILE, identity.encode())


def sweep_orphaned(parent: Path, pattern: str, remove: Callable[[Path], None]) -> list[Path]:
    """`remove` the directories under `parent` matching `pattern` whose recorded owner process
    no longer runs (left by a process killed before it could clean up); a directory whose owner
    runs, or that has no owner record yet, is kept. Returns what was removed."""
    removed: list[Path] = []
    for d in sorted(parent.glob(pattern)):
        try:
            owner = (d / OWNER_FILE).read_text().strip()
            pid = int(owner.split(":", 1)[0])
        except (OSError, ValueError):
            continue
        if process_identity(pid) != owner:
            remove(d)
            removed.append(d)
    return removed
