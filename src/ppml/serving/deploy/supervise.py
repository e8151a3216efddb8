"""The deployment's processes: starting a child (a development one with its keys on stdin, or an
attested one in its sandbox), its ready pipe, its log, and stopping processes by identity."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ppml._internal.fs import ensure_private_dir
from ppml._internal.procs import process_identity
from ppml.crypto.envelope import WrappedKey
from ppml.errors import ConfigurationError, UsageError
from ppml.serving.contract import READY_FD_ENV, READY_LINE, key_bundle
from ppml.serving.deploy.plan import BOOT_SUBDIR, Plan
from ppml.serving.deploy.state import ProcessEntry
from ppml.tee.command import DEFAULT_ENV

if TYPE_CHECKING:
    from ppml.tee.channel import EvidenceChannelServer
    from ppml.tee.launcher import LaunchedWorkload
    from ppml.workspace import Workspace

__all__ = ["Child", "Launch", "bind", "launch", "signals_to_event", "tail", "terminate"]


@dataclass
class Child:
    """A started front end or worker, and the read end of its ready pipe."""

    role: str
    proc: subprocess.Popen[bytes]
    log: Path
    identity: str
    ready_fd: int | None = None
    channel: EvidenceChannelServer | None = None

    def entry(self) -> ProcessEntry:
        return ProcessEntry(pid=self.proc.pid, identity=self.identity, log=str(self.log))

    def has_signalled_ready(self) -> bool:
        """Whether it wrote its ready line (reads the pipe without blocking)."""
        if self.ready_fd is None:
            return False
        with contextlib.suppress(BlockingIOError):
            if os.read(self.ready_fd, len(READY_LINE)) == READY_LINE:
                self.close_ready()
                return True
        return False

    def close_ready(self) -> None:
        if self.ready_fd is not None:
            os.close(self.ready_fd)
            self.ready_fd = None

    def close_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None


@dataclass(frozen=True, slots=True)
class Launch:
    """How `up` starts its children: attested through `kms_url` (with the workspace's sim
    platform key), else with the data keys on stdin."""

    plan: Plan
    ws: Workspace
    logs: Path
    kms_url: str | None = None


def launch(
    how: Launch,
    role: str,
    command: Sequence[str],
    env_extra: Mapping[str, str],
    *,
    log_name: str,
    keys: Mapping[WrappedKey, bytes] | None,
    pass_fds: tuple[int, ...] = (),
) -> Child:
    """Start one child with a ready pipe (``$PPML_SERVING_READY_FD``) and its output in its
    log (0600)."""
    log = how.logs / log_name
    ready_read, ready_write = os.pipe()
    os.set_blocking(ready_read, False)
    env = {**env_extra, READY_FD_ENV: str(ready_write)}
    fds = (*pass_fds, ready_write)
    out = _open_log(log)
    try:
        if how.kms_url is not None:
            launched = _start_attested(how, role, command, env, out, fds)
            proc, channel = launched.proc, launched.channel
        else:
            proc, channel = _start_dev(role, command, env, out, fds, keys, cwd=how.logs), None
    except BaseException:
        os.close(ready_read)
        raise
    finally:
        os.close(out)
        os.close(ready_write)
    identity = process_identity(proc.pid) or f"{proc.pid}:?"
    return Child(role, proc, log, identity, ready_read, channel)


def _start_dev(
    role: str,
    command: Sequence[str],
    env_extra: Mapping[str, str],
    out: int,
    pass_fds: tuple[int, ...],
    keys: Mapping[WrappedKey, bytes] | None,
    *,
    cwd: Path,
) -> subprocess.Popen[bytes]:
    """A development child: no workspace, no passphrase; its data keys on stdin."""
    env = {k: os.environ[k] for k in DEFAULT_ENV if k in os.environ}
    env.update(env_extra)
    try:
        proc = subprocess.Popen(  # noqa: S603 -- our own command, no shell
            list(command),
            env=env,
            stdin=subprocess.PIPE if keys is not None else subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            pass_fds=pass_fds,
            start_new_session=True,
            cwd=str(cwd),
        )
    except OSError as exc:
        raise ConfigurationError(f"cannot start the {role}: {exc.strerror}") from None
    if keys is not None:
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(key_bundle(keys))
        proc.stdin.close()
    return proc


def _start_attested(
    how: Launch,
    role: str,
    command: Sequence[str],
    env_extra: Mapping[str, str],
    out: int,
    pass_fds: tuple[int, ...],
) -> LaunchedWorkload:
    """A sandboxed, attested child (`ppml.tee.launcher`), detached: it outlives `up`."""
    from ppml.tee import launcher
    from ppml.tee.manifest import build_manifest
    from ppml.tee.sim_launch import start_sim

    assert how.kms_url is not None
    ws = how.ws
    with launcher.prepared_run(ws.path / "run") as run:
        boot = run.boot / BOOT_SUBDIR
        ensure_private_dir(boot)
        for name, source in how.plan.boot_files(role).items():
            shutil.copyfile(source, boot / name)
        manifest = build_manifest(list(command), snapshot=run.snapshot, forbidden=[ws.path])
        return start_sim(
            manifest,
            run,
            platform_key=ws.sim_platform_key(),
            kms_url=how.kms_url,
            ca_pem=ws.ca_cert.read_text(),
            isolation=launcher.Isolation(
                hidden=(ws.path,), visible=(how.plan.settings.model,), no_data=True
            ),
            extra_env=env_extra,
            pass_fds=pass_fds,
            cwd=Path("/"),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            detach=True,
        )


def _open_log(path: Path) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def tail(path: Path, lines: int = 6) -> str:
    """The last lines of a log, for an error message (empty when unreadable)."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return ""
    return (": " + " | ".join(text)) if text else ""


def _signal(entry: ProcessEntry, signum: int, *, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(entry.pid, signum)
        else:
            os.kill(entry.pid, signum)


def terminate(entries: Sequence[ProcessEntry], *, group: bool, grace: float) -> int:
    """SIGTERM every live entry (its process group when `group`), SIGKILL after `grace` s.
    Returns how many were alive."""
    live = [e for e in entries if e.alive]
    for e in live:
        _signal(e, signal.SIGTERM, group=group)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(e.alive for e in live):
        time.sleep(0.05)
    for e in live:
        if e.alive:
            _signal(e, signal.SIGKILL, group=group)
    return len(live)


def bind(host: str, port: int) -> socket.socket:
    """The front end's listening socket (it inherits it: its port is not on its command line)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(512)
    return sock


@contextlib.contextmanager
def signals_to_event(stop: threading.Event) -> Iterator[None]:
    """SIGINT and SIGTERM set `stop` for the block (a foreground `up` stops cleanly)."""

    def handler(signum: int, frame: object) -> None:
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
