"""Long-running JVM processes of a local cluster: start in their own session, find, stop."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from ppml._internal.clock import MonotonicClock
from ppml.errors import ConfigurationError

__all__ = ["cmdline_has", "free_port", "pid_alive", "start_daemon", "terminate", "wait_for_log"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie child of ours counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def cmdline_has(pid: int, needle: bytes) -> bool:
    """Whether `pid` runs with `needle` in its command line (not a recycled pid)."""
    try:
        return needle in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def start_daemon(
    command: list[str], env: Mapping[str, str], log: Path, what: str, *, cwd: Path | None = None
) -> int:
    """Start `command` in a session of its own (in `cwd`), its output appended to `log`; its
    pid."""
    with open(log, "ab") as out:
        try:
            proc = subprocess.Popen(  # noqa: S603 -- a distribution's own launcher script
                command,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=cwd,
            )
        except OSError as exc:
            raise ConfigurationError(f"cannot start {what}: {exc.strerror}") from None
    return proc.pid


def wait_for_log(
    log: Path,
    pid: int,
    needle: str,
    timeout: float,
    what: str,
    clock: MonotonicClock = time.monotonic,
) -> None:
    """Wait until `needle` shows in `log`; `ConfigurationError` if `pid` exits first or time
    runs out."""
    deadline = clock() + timeout
    while clock() < deadline:
        with contextlib.suppress(FileNotFoundError):
            if needle in log.read_text(errors="replace"):
                return
        if not pid_alive(pid):
            break
        time.sleep(0.2)
    raise ConfigurationError(f"{what} did not start (see {log})", path=log)


def terminate(pid: int, is_ours: Callable[[int], bool], grace: float = 20.0) -> bool:
    """SIGTERM `pid`'s process group, SIGKILL after `grace` seconds; False when `pid` is not
    one of ours (`is_ours`) any more."""
    if not is_ours(pid):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    return True
