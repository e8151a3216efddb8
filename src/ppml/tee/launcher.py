"""The attested launcher: one way to start a measured workload, for `ppml run`, `ppml sql --tee`,
`ppml spark-submit --tee` and `ppml serving up --tee`.

The caller (which holds the workspace) hardens its own process first (`harden_launcher`: not
dumpable, the passphrase variable gone), then:

1. `RunDirectory.create` makes a private directory under the workspace (hidden from every
   workload) with the snapshot of the measured files, the workload's private ``/tmp`` and the
   boot directory;
2. `build_manifest(..., snapshot=run.snapshot)` measures the copies;
3. `start` writes the boot directory (the import guard and the part of the manifest it needs),
   opens an evidence channel whose quotes carry the measurement the launcher computed, and
   starts the workload in its sandbox (`ppml.tee.sandbox`) with only the manifest's variables and
   the launcher's protocol variables (``PPML_TEE``, ``PPML_TEE_CHANNEL``, ``PPML_KMS_URL``,
   ``PPML_KMS_CA_PEM``, ``PPML_MEASUREMENT``, the guard's ``PYTHONPATH``). It returns once the
   workload's program has been executed, or raises the sandbox's set-up error.

Nothing secret is handed over: the workload gets keys only from the key broker, after
attestation, sealed to a key of its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ppml._internal.fs import ensure_private_dir, state_root, write_private
from ppml._internal.procs import record_owner, sweep_orphaned
from ppml.errors import ConfigurationError, UsageError
from ppml.tee import guard, sandbox
from ppml.tee.bytecode import HINTS_NAME, cache_hinted
from ppml.tee.channel import CHANNEL_ENV, EvidenceChannelServer
from ppml.tee.environment import bytecode_dir
from ppml.tee.manifest import WorkloadManifest
from ppml.tee.workload_env import CA_PEM_ENV, KMS_URL_ENV, TEE_ENV

__all__ = [
    "MEASUREMENT_ENV",
    "Isolation",
    "LaunchedWorkload",
    "RunDirectory",
    "harden_launcher",
    "prepared_run",
    "shared_directory",
    "start",
    "unseen_arguments",
    "wait_forwarding_signals",
]

MEASUREMENT_ENV = "PPML_MEASUREMENT"
_PR_SET_DUMPABLE = 4
_RUN_PREFIX = "run-"

Quote = Callable[[bytes], bytes]


def shared_directory() -> Path:
    """A private per-user directory that no workload sees: the registry of running workloads'
    claims (`ppml.tee.claims`), and what a launcher shares with processes outside the sandbox
    (a Spark cluster's executors read the key stores there)."""
    from ppml.tee.environment import cache_root

    return cache_root() / "shared"


def _code_directories(manifest: WorkloadManifest) -> list[str]:
    """What no data directory may be or lie in, and what stays read-only inside one: the
    workload's Python environment (its import roots, its prefix, the installation its
    interpreter belongs to, the directories of its interpreter and shared libraries) and ppml's
    caches (the environments' digests, the bytecode attested workloads read)."""
    from ppml.tee.environment import bytecode_dir, cache_root

    ensure_private_dir(cache_root())
    ensure_private_dir(bytecode_dir())
    paths = [str(cache_root())]
    env = manifest.environment
    if env is not None:
        paths += [*env.roots, env.prefix, env.base_prefix, os.path.dirname(env.interpreter)]
        paths += [os.path.dirname(lib) for lib, _ in env.libraries]
    return list(dict.fromkeys(os.path.realpath(p) for p in paths))


def _check_data_directory(label: str, real: str, code: Sequence[str]) -> None:
    """Refuse a data directory that would let the workload change code that runs later."""
    home = os.path.realpath(os.path.expanduser("~"))
    if real == "/":
        raise UsageError(f"{label}: the root directory cannot be a data directory")
    if home != "/" and (home == real or home.startswith(real + "/")):
        raise UsageError(
            f"{label}: holds your home directory ({home}), whose start-up files and caches an "
            "attested workload could change; give it a directory of its own (--data DIR)"
        )
    for c in code:
        if real == c or real.startswith(c + "/"):
            raise UsageError(
                f"{label}: lies in {c}, which holds the workload's Python environment or "
                "ppml's caches, and no workload may change those; give it another directory"
            )


def _registry() -> Any:
    from ppml.tee.claims import Registry

    return Registry(shared_directory() / "runs")


def harden_launcher() -> None:
    """Make this process unreadable to other processes of the same user: no /proc/PID/mem,
    environ or ptrace (its memory holds the master key). Every child it starts gets an
    environment of its own, never this process's (which may hold the passphrase)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise ConfigurationError("cannot make the launcher non-dumpable (prctl failed)")


@dataclass(frozen=True, slots=True)
class Isolation:
    """What the workload must not see, and where it may write.

    `hidden`: covered by empty read-only mounts (the workspace, the passphrase file).
    `writable`: data directories (default: the working directory; none with `no_data`).
    `exposed`: read-only views of paths inside hidden ones (a serving deployment's encrypted
    files). `visible`: paths that must stay readable (files under /tmp are otherwise gone)."""

    hidden: tuple[Path, ...] = ()
    writable: tuple[Path, ...] = ()
    exposed: tuple[Path, ...] = ()
    visible: tuple[Path, ...] = ()
    no_data: bool = False  # no data directory at all (a serving worker writes nothing)

    def data_directories(self, cwd: Path) -> tuple[Path, ...]:
        if self.no_data:
            return ()
        return self.writable or (cwd,)


class RunDirectory:
    """A private directory for one launch: ``snapshot/``, ``tmp/`` and ``boot/``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def snapshot(self) -> Path:
        return self.path / "snapshot"

    @property
    def tmp(self) -> Path:
        return self.path / "tmp"

    @property
    def boot(self) -> Path:
        return self.path / "boot"

    @classmethod
    def create(cls, parent: Path) -> RunDirectory:
        """Under `parent` (made private), after removing the directories of launches whose
        owner is gone."""
        ensure_private_dir(parent)
        cls.sweep(parent)
        path = parent / f"{_RUN_PREFIX}{secrets.token_hex(8)}"
        path.mkdir(mode=0o700)
        run = cls(path)
        for d in (run.snapshot, run.tmp, run.boot):
            d.mkdir(mode=0o700)
        run.set_owner(os.getpid())
        return run

    def set_owner(self, pid: int) -> None:
        record_owner(self.path, pid)

    def remove(self) -> None:
        _remove_tree(self.path)

    @staticmethod
    def sweep(parent: Path) -> list[Path]:
        """Remove run directories whose recorded owner process no longer runs."""
        return sweep_orphaned(parent, f"{_RUN_PREFIX}*", _remove_tree)


def _remove_tree(path: Path) -> None:
    def writable(func: Any, p: str, _exc: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o600)
            func(p)

    shutil.rmtree(path, onerror=writable)


@dataclass
class LaunchedWorkload:
    """A started workload (its sandbox process) and what must live as long as it does."""

    proc: subprocess.Popen[bytes]
    measurement: str
    run: RunDirectory
    channel: EvidenceChannelServer | None = None
    keep_run: bool = False
    claim: Path | None = None  # released when the workload ends (detached: when its sandbox does)
    manifest: WorkloadManifest | None = None
    _closed: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self) -> int:
        """Wait for the workload (forwarding Ctrl-C and SIGTERM), clean up, return its code."""
        try:
            return wait_forwarding_signals(self.proc)
        finally:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.channel is not None:
            self.channel.close()
        if not self.keep_run:
            env = self.manifest.environment if self.manifest is not None else None
            if env is not None:
                cache_hinted(env, self.run.tmp / HINTS_NAME)
            self.run.remove()
            if self.claim is not None:
                _registry().release(self.claim)


def wait_forwarding_signals(proc: subprocess.Popen[bytes]) -> int:
    """Wait for `proc`, passing Ctrl-C and SIGTERM on to it."""

    def forward(signum: int, _frame: object) -> None:
        proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _guard_document(
    manifest: WorkloadManifest, isolation: Isolation, visible: Sequence[str]
) -> dict[str, Any]:
    env = manifest.environment
    replaced = (sandbox.TMP, sandbox.SHM)
    # Host paths re-mounted inside /tmp or /dev/shm are not the run's own scratch space.
    host = [
        p
        for p in [*visible, *(str(w) for w in isolation.writable)]
        if any(p == r or p.startswith(r + "/") for r in replaced)
    ]
    return {
        "interpreter": env.interpreter if env else "",
        "roots": list(env.roots) if env else [],
        "trusted": {f.source: f.sha256 for f in manifest.trusted_files},
        "scratch": list(replaced),
        "host": host,
        "writable": [str(w) for w in isolation.writable],
        "bytecode": str(bytecode_dir()),
        "hints": f"{sandbox.TMP}/{HINTS_NAME}",
    }


def _write_boot(run: RunDirectory, document: Mapping[str, Any]) -> None:
    source = Path(guard.__file__).read_bytes()
    write_private(run.boot / "sitecustomize.py", source)
    write_private(run.boot / guard.WORKLOAD_FILE, json.dumps(document).encode())
    for f in run.boot.iterdir():
        if f.is_file():
            os.chmod(f, 0o400)


def unseen_arguments(manifest: WorkloadManifest, isolation: Isolation, cwd: Path) -> list[str]:
    """The workload's arguments that name a file or directory of this host which the workload
    will not see (its /tmp and /dev/shm are its own; the hidden paths appear empty), so that the
    caller can say so instead of leaving the user with "no such file"."""
    replaced = (sandbox.TMP, sandbox.SHM)
    hidden = [os.path.realpath(h) for h in isolation.hidden]
    shown = [
        os.path.realpath(p)
        for p in [*isolation.data_directories(cwd), *isolation.visible, *isolation.exposed]
    ]

    def under(path: str, roots: Iterable[str]) -> bool:
        return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)

    unseen = []
    for arg in manifest.command.args:
        candidate = arg.split("=", 1)[-1] if arg.startswith("-") else arg
        if not candidate or "\0" in candidate:
            continue
        path = cwd / candidate
        try:
            if not path.exists():
                continue
        except OSError:
            continue
        real = os.path.realpath(path)
        if under(real, shown):
            continue
        if under(real, hidden) or under(real, replaced):
            unseen.append(arg)
    return unseen


def _visible_paths(manifest: WorkloadManifest, isolation: Isolation, cwd: Path) -> list[str]:
    paths: list[str] = [str(manifest.base_dir), str(cwd)]
    env = manifest.environment
    if env is not None:
        paths += [*env.roots, env.prefix, os.path.dirname(env.interpreter)]
    paths.append(os.path.dirname(os.path.realpath(manifest.command.program)))
    paths.append(os.path.dirname(os.path.abspath(manifest.command.program)))
    paths += [os.path.dirname(f.source) for f in manifest.trusted_files]
    paths += [str(p) for p in isolation.visible]
    return list(dict.fromkeys(os.path.realpath(p) for p in paths))


def start(
    manifest: WorkloadManifest,
    run: RunDirectory,
    *,
    tee: str,
    quote: Quote | None,
    kms_url: str,
    ca_pem: str,
    isolation: Isolation,
    extra_env: Mapping[str, str] | None = None,
    pass_fds: Iterable[int] = (),
    cwd: Path | None = None,
    stdin: int | IO[Any] | None = None,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    detach: bool = False,
) -> LaunchedWorkload:
    """Start `manifest` (built with ``snapshot=run.snapshot``) in its sandbox.

    `quote(report_data)` makes evidence for the measurement (sim, tdx, snp: served on the
    evidence channel); None when the workload makes its own (sgx). `extra_env` adds launcher
    variables (their names must start with ``PPML_``). With `detach`, the workload outlives this
    process (its own session, the run directory kept)."""
    cwd = Path(os.path.realpath(cwd or Path.cwd()))
    measurement = manifest.measurement()
    for t in manifest.trusted_files:
        if t.copy is None:
            raise UsageError("the manifest was built without a snapshot")
    env = _workload_environment(manifest, tee, kms_url, ca_pem, measurement, extra_env or {})
    isolation, code = _resolved_isolation(manifest, isolation, cwd)
    visible = list(dict.fromkeys([*_visible_paths(manifest, isolation, cwd), *code]))
    _write_boot(run, _guard_document(manifest, isolation, visible))
    fds = list(pass_fds)
    channel = None
    if quote is not None:
        channel = EvidenceChannelServer(quote, tee=tee)
        env[CHANNEL_ENV] = str(channel.child_fd)
        fds.append(channel.child_fd)
    claim = _claim(manifest, isolation, visible)
    status_read, status_write = os.pipe()
    spec_read, spec_write = os.pipe()
    spec = sandbox.Spec(
        argv=manifest.launch_argv(),
        env=env,
        cwd=str(cwd),
        tmp=str(run.tmp),
        boot=str(run.boot),
        writable=[str(w) for w in isolation.writable],
        visible=visible,
        pinned=[[str(f.copy), f.source] for f in manifest.trusted_files],
        hidden=[str(h) for h in isolation.hidden],
        exposed=[str(e) for e in isolation.exposed],
        keep_fds=fds,
        status_fd=status_write,
        die_with_parent=not detach,
    )
    try:
        proc = subprocess.Popen(  # noqa: S603 -- ppml's own sandbox, then the measured command
            [sys.executable, "-I", "-S", sandbox.__file__, str(spec_read)],
            pass_fds=(spec_read, status_write, *fds),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
            cwd="/",
            env={"PATH": os.defpath},  # never the launcher's own (the passphrase may be there)
        )
    except OSError as exc:
        for fd in (status_read, status_write, spec_read, spec_write):
            os.close(fd)
        if channel is not None:
            channel.close()
        _registry().release(claim)
        raise ConfigurationError(f"cannot start the workload's sandbox: {exc.strerror}") from None
    os.close(spec_read)
    os.close(status_write)
    with os.fdopen(spec_write, "wb") as fh:
        fh.write(spec.to_json())
    return _started(proc, measurement, run, channel, claim, manifest, status_read, detach=detach)


def _workload_environment(
    manifest: WorkloadManifest,
    tee: str,
    kms_url: str,
    ca_pem: str,
    measurement: str,
    extra_env: Mapping[str, str],
) -> dict[str, str]:
    """The measured command's environment: the manifest's, the sandbox's Python settings and what
    the workload needs to attest (its TEE, the KMS and its CA, the expected measurement)."""
    for name in extra_env:
        if not name.startswith("PPML_"):
            raise UsageError(f"launcher variables are PPML_*, not {name}")
    env = manifest.child_environment()
    env.update(
        {
            "PYTHONPATH": sandbox.BOOT_DIR,
            "PYTHONNOUSERSITE": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONPYCACHEPREFIX": str(bytecode_dir()),
            TEE_ENV: tee,
            KMS_URL_ENV: kms_url,
            CA_PEM_ENV: ca_pem,
            MEASUREMENT_ENV: measurement,
            **extra_env,
        }
    )
    return env


def _resolved_isolation(
    manifest: WorkloadManifest, isolation: Isolation, cwd: Path
) -> tuple[Isolation, list[str]]:
    """`isolation` with real paths, the workspace and the shared directory hidden, and its data
    directories checked (never inside what is hidden, never over code); and the code directories.
    Refuses code or a working directory inside the workspace."""
    hidden = [os.path.realpath(p) for p in [*isolation.hidden, shared_directory(), state_root()]]
    hidden = list(dict.fromkeys(hidden))
    for inside in [cwd, manifest.base_dir, *(Path(f.source) for f in manifest.trusted_files)]:
        if any(str(inside) == h or str(inside).startswith(h + "/") for h in hidden):
            raise UsageError(
                f"{inside} is inside the workspace, which an attested workload never sees: "
                "keep the workload's code and data outside it"
            )
    _check_program_visible(manifest, hidden)
    writable = isolation.data_directories(cwd)
    code = _code_directories(manifest)
    for data in writable:
        real = os.path.realpath(data)
        label = f"--data {data}" if isolation.writable else f"the working directory {cwd}"
        if any(real == h or real.startswith(h + "/") for h in hidden):
            raise UsageError(f"{label}: the workspace is never visible to a workload")
        if not os.path.isdir(real):
            raise UsageError(f"{label}: not a directory")
        _check_data_directory(label, real, code)
    resolved = Isolation(
        hidden=tuple(Path(h) for h in hidden),
        writable=tuple(Path(os.path.realpath(w)) for w in writable),
        exposed=tuple(Path(os.path.realpath(e)) for e in isolation.exposed),
        visible=isolation.visible,
        no_data=isolation.no_data,
    )
    return resolved, code


def _check_program_visible(manifest: WorkloadManifest, hidden: Sequence[str]) -> None:
    """Refuse a program or Python environment inside a hidden directory: the sandbox would show
    it empty, and the workload would fail with "No such file or directory" for a file that is
    there outside."""
    program = manifest.command.program
    paths = [("program", program)]
    env = manifest.environment
    if env is not None:
        paths += [("Python environment", p) for p in (env.prefix, *env.roots)]
    for what, path in paths:
        for real in dict.fromkeys([os.path.abspath(path), os.path.realpath(path)]):
            for h in hidden:
                if real == h or real.startswith(h.rstrip("/") + "/"):
                    raise ConfigurationError(
                        f"the workload's {what} {path} lies in {h}, which is hidden from "
                        "attested workloads (ppml's workspace, state and shared directories): "
                        "install it elsewhere"
                    )


def _started(
    proc: subprocess.Popen[bytes],
    measurement: str,
    run: RunDirectory,
    channel: EvidenceChannelServer | None,
    claim: Path,
    manifest: WorkloadManifest,
    status_read: int,
    *,
    detach: bool,
) -> LaunchedWorkload:
    """The sandbox is spawned and has its spec: serve evidence, hand over a detached workload's
    claim, and wait for the sandbox to report that the measured command started (or why not)."""
    if channel is not None:
        channel.start()
        channel.child_started()
    launched = LaunchedWorkload(
        proc, measurement, run, channel, keep_run=detach, claim=claim, manifest=manifest
    )
    if detach:
        run.set_owner(proc.pid)
        _registry().transfer(claim, proc.pid)
    failure = _read_status(status_read)
    if failure is not None:
        proc.wait()
        launched.close()
        _registry().release(claim)
        raise ConfigurationError(f"cannot start the attested workload: {failure}")
    return launched


def _claim(manifest: WorkloadManifest, isolation: Isolation, visible: Sequence[str]) -> Path:
    """Record what this workload may write and what it needs unchanged (`ppml.tee.claims`), or
    refuse while another running workload could change its files (or it another's)."""
    env = manifest.environment
    protected = [f.source for f in manifest.trusted_files]
    if env is not None:
        protected += [*env.roots, os.path.realpath(env.interpreter)]
        protected += [lib for lib, _ in env.libraries]
    protected += [manifest.command.real, str(bytecode_dir())]
    registry = _registry()
    return Path(
        registry.claim(
            writable=[str(w) for w in isolation.writable],
            readonly=[*visible, *(f.source for f in manifest.trusted_files)],
            protected=protected,
            what=" ".join(manifest.command.launch_argv())[:160],
        )
    )


def _read_status(fd: int) -> str | None:
    """The sandbox's set-up error, or None once the workload's program runs (end of file)."""
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(1 << 16)
    if not data:
        return None
    try:
        return str(json.loads(data.splitlines()[0])["error"])
    except (ValueError, KeyError, IndexError):
        return data.decode("utf-8", "replace").strip()


@contextlib.contextmanager
def prepared_run(parent: Path) -> Iterator[RunDirectory]:
    """A run directory that is removed when the block fails before the workload starts."""
    run = RunDirectory.create(parent)
    try:
        yield run
    except BaseException:
        run.remove()
        raise
