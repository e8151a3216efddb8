"""The workload's sandbox: Linux namespaces that keep an attested workload away from its launcher.

An attested workload runs as the same user as the launcher that holds the workspace open. This
module starts it so that it cannot reach what the launcher holds:

- **a user namespace** in which it has no capability at all (no `CAP_SYS_ADMIN` to undo a mount,
  no `CAP_SYS_PTRACE`, no way to gain one: `no_new_privs`, an empty bounding set and the
  "no root" secure bits, so that even uid 0 has nothing), and in which the limit of user
  namespaces is 0, so that it cannot make one of its own and have capabilities there;
- **a PID namespace** with its own `/proc`: the launcher and every other process of the machine
  are not there to be read (`/proc/PPID/environ`, `cmdline`, `mem` do not exist for it);
- **an IPC namespace**: no System V shared memory, semaphore or message queue of the host;
- **a mount namespace** in which the whole file system is read-only, except its data
  directories and a private `/tmp` and `/dev/shm`; `/dev` holds only null, zero, full, random,
  urandom, tty and a new `/dev/pts`; the workspace and the passphrase file are covered by empty
  read-only mounts; the measured files are bind-mounted read-only from the launcher's private
  snapshot over their own paths, so that the bytes that run are the bytes that were measured;
  `/run/user` (the user's session bus and agents) is covered;
- **a new session** (no controlling terminal to push keystrokes into), no inherited descriptor
  but the ones named.

The process tree is ``launcher -> this module (outside) -> init (PID 1 inside) -> workload``.
The init forwards signals and reaps; when it exits, the kernel kills every process left in the
namespace. With ``die_with_parent`` the sandbox dies with the launcher.

This file runs as a script (``python -I -S sandbox.py SPEC_FD``), before any workload code, so it
uses the standard library only. It reads its `Spec` (JSON) from the descriptor `SPEC_FD` and
reports a failure to set up as one JSON line on ``status_fd``; that descriptor is closed on the
workload's `execve`, so end-of-file with nothing written means the workload started.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import resource
import signal
import stat
import sys
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["SandboxError", "Spec", "main"]

# <linux/sched.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
# <linux/mount.h>
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MOUNT_ATTR_RDONLY = 0x1
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
_SYS_MOUNT_SETATTR = 442  # the same number on every architecture (new system call table)
# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
# <linux/securebits.h>: uid 0 gains nothing on execve, and that cannot be undone.
SECBIT_NOROOT = 1 << 0
SECBIT_NOROOT_LOCKED = 1 << 1
SECBIT_NO_SETUID_FIXUP = 1 << 2
SECBIT_NO_SETUID_FIXUP_LOCKED = 1 << 3
SECBIT_KEEP_CAPS_LOCKED = 1 << 5
SECBIT_NO_CAP_AMBIENT_RAISE = 1 << 6
SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED = 1 << 7
_SECUREBITS = (
    SECBIT_NOROOT
    | SECBIT_NOROOT_LOCKED
    | SECBIT_NO_SETUID_FIXUP
    | SECBIT_NO_SETUID_FIXUP_LOCKED
    | SECBIT_KEEP_CAPS_LOCKED
    | SECBIT_NO_CAP_AMBIENT_RAISE
    | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED
)
_CAP_LAST_CAP_FILE = "/proc/sys/kernel/cap_last_cap"
_FORWARDED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
TMP = "/tmp"  # noqa: S108 -- the sandbox's own private /tmp
SHM = "/dev/shm"  # noqa: S108 -- a private tmpfs inside the sandbox
RUN_USER = "/run/user"
DEV = "/dev"
# The devices a program needs; every other one (disks, terminals, /dev/kvm, /dev/net/tun, loop
# devices, the TEE's own) is absent from the sandbox's /dev.
_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
_DEV_LINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
    "ptmx": "pts/ptmx",
}
# Per user namespace: 0 here means the workload cannot create one of its own (in which it would
# have every capability again, over mounts it could then rearrange).
_MAX_USER_NAMESPACES = "/proc/sys/user/max_user_namespaces"
# Where the launcher's boot directory (the import guard and the workload manifest) appears.
BOOT_DIR = "/tmp/.ppml"  # noqa: S108 -- inside the private /tmp, mounted read-only


class SandboxError(Exception):
    """Setting the sandbox up failed; the message says what and how to fix it."""


@dataclass(frozen=True, slots=True)
class Spec:
    """What to start and what it may see. Paths are absolute, as the launcher sees them."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    tmp: str  # a private directory of the launcher's, mounted on /tmp (read-write)
    boot: str | None = None  # mounted read-only on BOOT_DIR
    writable: list[str] = field(default_factory=list)  # data directories (read-write)
    visible: list[str] = field(default_factory=list)  # must stay visible (read-only)
    pinned: list[list[str]] = field(default_factory=list)  # [snapshot copy, original path]
    hidden: list[str] = field(default_factory=list)  # covered by empty read-only mounts
    exposed: list[str] = field(default_factory=list)  # read-only views inside hidden ones
    keep_fds: list[int] = field(default_factory=list)
    status_fd: int = -1
    die_with_parent: bool = True

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Spec:
        doc: Any = json.loads(data)
        if not isinstance(doc, dict):
            raise SandboxError("the sandbox specification is not an object")
        return cls(**doc)


# -- system calls --------------------------------------------------------------------------------

_libc: Any = None


def _c() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mount.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_void_p,
        ]
        _libc.unshare.argtypes = [ctypes.c_int]
        _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        _libc.prctl.argtypes += [ctypes.c_ulong]
    return _libc


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(err)} (errno {err})")


def _enc(path: str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    raw = data.encode() if data else None
    result = _c().mount(_enc(source), _enc(target), _enc(fstype), flags, raw)
    _check(result, f"mount {target}")


def _prctl(option: int, arg: int = 0) -> None:
    _check(_c().prctl(option, arg, 0, 0, 0), f"prctl({option})")


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _set_readonly(path: str, *, readonly: bool, recursive: bool) -> None:
    """mount_setattr(2) (Linux 5.12+): one call for a whole tree."""
    attr = _MountAttr(
        MOUNT_ATTR_RDONLY if readonly else 0, 0 if readonly else MOUNT_ATTR_RDONLY, 0, 0
    )
    flags = AT_RECURSIVE if recursive else 0
    result = _c().syscall(
        _SYS_MOUNT_SETATTR,
        ctypes.c_int(AT_FDCWD),
        _enc(path),
        ctypes.c_uint(flags),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    if result != 0:
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            raise SandboxError("mount_setattr is missing: attested runs need Linux 5.12 or later")
        raise SandboxError(
            f"cannot make {path} {'read-only' if readonly else 'writable'}: {os.strerror(err)}"
        )


# -- namespaces ----------------------------------------------------------------------------------

USERNS_HINT = (
    "attested runs isolate the workload in Linux user namespaces; enable them "
    "(Ubuntu 23.10+: sysctl kernel.apparmor_restrict_unprivileged_userns=0; elsewhere: "
    "sysctl user.max_user_namespaces=15000), or run ppml as root"
)


def _enter_namespaces() -> None:
    uid, gid = os.getuid(), os.getgid()
    if _c().unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC) != 0:
        err = ctypes.get_errno()
        raise SandboxError(
            f"cannot create the workload's namespaces ({os.strerror(err)}): " + USERNS_HINT
        )
    # The same ids inside as outside: files keep their owners, names resolve.
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w") as fh:
            fh.write(text)
    except OSError as exc:
        raise SandboxError(f"cannot write {path}: {exc.strerror}. " + USERNS_HINT) from None


def _forbid_user_namespaces() -> None:
    try:
        with open(_MAX_USER_NAMESPACES, "w") as fh:
            fh.write("0")
    except OSError as exc:
        raise SandboxError(
            f"cannot forbid user namespaces inside the sandbox ({exc.strerror}): attested runs "
            "need a kernel that limits them per namespace (Linux 4.9 or later)"
        ) from None


def _drop_privileges() -> None:
    """No capability now or after any execve, whatever the uid."""
    _prctl(PR_SET_SECUREBITS, _SECUREBITS)
    try:
        with open(_CAP_LAST_CAP_FILE) as fh:
            last = int(fh.read())
    except (OSError, ValueError):
        last = 63
    for cap in range(last + 1):
        _prctl(PR_CAPBSET_DROP, cap)
    _c().prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


# -- the file system view --------------------------------------------------------------------------


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _open_path(path: str) -> int:
    try:
        return os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        raise SandboxError(f"cannot open {path}: {exc.strerror}") from None


def _ensure_mount_point(target: str, *, is_dir: bool) -> None:
    """Create `target` (and its parents) when it is missing: only possible inside the private
    /tmp or /dev/shm, the only writable places before the data directories are mounted."""
    if os.path.lexists(target):
        return
    if not (_under(target, TMP) or _under(target, SHM)):
        raise SandboxError(f"{target} does not exist")
    os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
    if is_dir:
        os.mkdir(target, 0o755)
    else:
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o444))


def _bind(fd: int, target: str, *, writable: bool, is_dir: bool, recursive: bool = False) -> None:
    _ensure_mount_point(target, is_dir=is_dir)
    flags = MS_BIND | (MS_REC if recursive else 0)
    _mount(f"/proc/self/fd/{fd}", target, None, flags)
    _set_readonly(target, readonly=not writable, recursive=False)


def _setup_mounts(spec: Spec) -> None:
    # Nothing done here propagates back to the launcher's mount namespace.
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    # Sources are opened first: later mounts cover some of them (the snapshot lives in the
    # hidden workspace; the data directories may sit in the replaced /tmp).
    tmp_fd = _open_path(spec.tmp)
    boot_fd = _open_path(spec.boot) if spec.boot else -1
    replaced = (TMP, SHM)
    # Directories bound again: the data directories (read-write) and, read-only, whatever must
    # stay visible but lies in a replaced mount or inside a data directory (a virtual
    # environment in the working directory stays read-only). Parents before children.
    dirs: list[tuple[str, int, bool]] = [(p, _open_path(p), True) for p in spec.writable]
    for p in spec.visible:
        if p in spec.writable:
            continue  # a data directory that also holds code: its measured files are pinned
        if os.path.exists(p) and any(_under(p, r) for r in [*replaced, *spec.writable]):
            dirs.append((p, _open_path(p), False))
    dirs.sort(key=lambda item: (item[0], not item[2]))
    pinned = [(dest, _open_path(src)) for src, dest in spec.pinned]
    exposed = [(p, _open_path(p)) for p in spec.exposed]
    devices = [(name, _open_path(f"{DEV}/{name}")) for name in _DEVICES if _exists(f"{DEV}/{name}")]

    _set_readonly("/", readonly=True, recursive=True)
    _bind(tmp_fd, TMP, writable=True, is_dir=True)
    _make_dev(devices)
    for path, fd, writable in dirs:
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        _bind(fd, path, writable=writable, is_dir=is_dir, recursive=True)
    for path, fd in pinned:
        _bind(fd, path, writable=False, is_dir=False)
    if spec.boot:
        _bind(boot_fd, BOOT_DIR, writable=False, is_dir=True)
    for path in [*spec.hidden, RUN_USER]:
        _cover(path, [(p, fd) for p, fd in exposed if _under(p, path) and p != path])
    opened = [*pinned, *exposed, *devices]
    for fd in [tmp_fd, boot_fd, *(d[1] for d in dirs), *(fd for _, fd in opened)]:
        if fd >= 0:
            os.close(fd)


def _exists(path: str) -> bool:
    return os.path.lexists(path)


def _make_dev(devices: list[tuple[str, int]]) -> None:
    """A /dev of its own: the harmless devices bound from the host's, a private /dev/shm and a
    new instance of /dev/pts; nothing else (no disk, terminal, loop, tun or KVM device)."""
    _mount("tmpfs", DEV, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=0755")
    for name, fd in devices:
        target = f"{DEV}/{name}"
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o444))
        _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND)
    for name, link in _DEV_LINKS.items():
        os.symlink(link, f"{DEV}/{name}")
    os.mkdir(SHM, 0o1777)
    _mount("tmpfs", SHM, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    os.mkdir(f"{DEV}/pts", 0o755)
    with contextlib.suppress(SandboxError):  # no pseudo-terminals where devpts is refused
        options = "newinstance,ptmxmode=0666,mode=0620"
        _mount("devpts", f"{DEV}/pts", "devpts", MS_NOSUID | MS_NOEXEC, options)
    _set_readonly(DEV, readonly=True, recursive=False)


def _cover(path: str, exposed: list[tuple[str, int]]) -> None:
    """An empty, read-only view of `path` (nothing when it is not visible anyway), with the
    `exposed` paths below it bound back read-only."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    if stat.S_ISDIR(st.st_mode):
        _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,mode=0755")
        if os.listdir(path):
            raise SandboxError(f"{path} is still visible")
        for inner, fd in exposed:
            is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
            os.makedirs(inner if is_dir else os.path.dirname(inner), mode=0o755, exist_ok=True)
            if not is_dir:
                os.close(os.open(inner, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o444))
            _mount(f"/proc/self/fd/{fd}", inner, None, MS_BIND | MS_REC)
            _set_readonly(inner, readonly=True, recursive=True)
        _set_readonly(path, readonly=True, recursive=False)
    else:
        _mount("/dev/null", path, None, MS_BIND)
        _set_readonly(path, readonly=True, recursive=False)


# -- the processes -----------------------------------------------------------------------------


def _report(status_fd: int, message: str) -> None:
    if status_fd >= 0:
        with contextlib.suppress(OSError):
            os.write(status_fd, json.dumps({"error": message}).encode() + b"\n")


def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


def _forward_signals(pid: int) -> None:
    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for sig in _FORWARDED:
        signal.signal(sig, forward)


def _wait_for(pid: int, *, reap_all: bool) -> int:
    """Wait for `pid` (reaping any other child on the way, as an init must); its exit code."""
    while True:
        try:
            child, status = os.waitpid(-1 if reap_all else pid, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            return 1
        if child == pid:
            return _exit_code(status)


def _die_with_parent(parent: int) -> None:
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _exec_workload(spec: Spec) -> None:
    """In the workload's process: a new session, only the named descriptors, then execve."""
    os.setsid()
    keep = sorted({0, 1, 2, *spec.keep_fds})
    if spec.status_fd >= 0:
        os.set_inheritable(spec.status_fd, False)  # closes on execve: the "started" signal
        keep.append(spec.status_fd)
    for fd in spec.keep_fds:
        os.set_inheritable(fd, True)
    _close_all_but(sorted(set(keep)))
    for sig in _FORWARDED:
        signal.signal(sig, signal.SIG_DFL)
    # No core dump, ever: the workload holds released keys and decrypted data, and a core file
    # would land in a data directory (the limit holds across execve; the workload cannot raise
    # a hard limit back).
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        os.chdir(spec.cwd)
    except OSError as exc:
        raise SandboxError(
            f"cannot enter the working directory {spec.cwd}: {exc.strerror}"
        ) from None
    try:
        os.execve(spec.argv[0], spec.argv, spec.env)  # noqa: S606 -- the measured command
    except OSError as exc:
        raise SandboxError(f"cannot start {spec.argv[0]}: {exc.strerror}") from None


def _close_all_but(keep: list[int]) -> None:
    low = 3
    for fd in keep:
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, 1 << 16)


def _init(spec: Spec) -> None:
    """PID 1 of the namespace: mounts, privileges, then the workload; forwards and reaps."""
    _die_with_parent(0)  # the parent is outside this PID namespace: 0 from in here
    _setup_mounts(spec)
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _forbid_user_namespaces()
    _drop_privileges()
    _prctl(PR_SET_DUMPABLE, 0)  # the workload cannot read this process (the paths it knows)
    pid = _fork_into(_exec_workload, spec)
    _forward_signals(pid)
    os._exit(_wait_for(pid, reap_all=True))


def run(spec: Spec) -> int:
    """Outside the namespace: create it, start its init, and wait for it."""
    launcher = os.getppid()
    if spec.die_with_parent:
        _die_with_parent(launcher)
    _enter_namespaces()
    # Not before: the id maps are written through this process's own /proc entries.
    _prctl(PR_SET_DUMPABLE, 0)
    pid = _fork_into(_init, spec)
    _forward_signals(pid)
    return _wait_for(pid, reap_all=False)


def _fork_into(step: Callable[[Spec], object], spec: Spec) -> int:
    """Fork a child that runs `step(spec)` and never returns into this one's code: why it failed
    goes to the launcher on the status pipe, then it exits 127. Returns the child's pid; the
    parent closes its copy of the status pipe."""
    pid = os.fork()
    if pid == 0:
        try:
            step(spec)
        except SandboxError as exc:
            _report(spec.status_fd, str(exc))
        except Exception as exc:
            _report(spec.status_fd, f"sandbox set-up failed: {type(exc).__name__}: {exc}")
        os._exit(127)
    if spec.status_fd >= 0:
        os.close(spec.status_fd)
    return pid


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: sandbox.py SPEC_FD", file=sys.stderr)
        return 2
    fd = int(args[0])
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    status_fd = -1
    try:
        spec = Spec.from_json(b"".join(chunks))
        status_fd = spec.status_fd
        return run(spec)
    except (SandboxError, ValueError, TypeError) as exc:
        _report(status_fd, str(exc))
        return 127


if __name__ == "__main__":
    sys.exit(main())
