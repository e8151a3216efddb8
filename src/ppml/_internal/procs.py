"""Processes by identity: a pid with its start time, so that a reused pid is not mistaken."""

from __future__ import annotations

from pathlib import Path

__all__ = ["process_identity"]


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
