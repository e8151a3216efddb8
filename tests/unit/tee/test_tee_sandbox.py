"""The workload's sandbox, for real: namespaces, mounts, privileges, signals, exit codes.

Each test starts `ppml/tee/sandbox.py` as the launcher does and runs a small Python program in
it that tries what an attacker would."""

from __future__ import annotations

import json
import os
import pwd
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ppml.tee import sandbox
from ppml.tee.sandbox import Spec


def start(spec: Spec, *, stdout: int = subprocess.PIPE) -> tuple[subprocess.Popen[bytes], str]:
    """Start the sandbox as the launcher does; (process, set-up error or "")."""
    spec_r, spec_w = os.pipe()
    status_r, status_w = os.pipe()
    spec = _with(spec, status_fd=status_w)
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", sandbox.__file__, str(spec_r)],
        pass_fds=(spec_r, status_w, *spec.keep_fds),
        stdout=stdout,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env={"PATH": os.defpath},
    )
    os.close(spec_r)
    os.close(status_w)
    with os.fdopen(spec_w, "wb") as fh:
        fh.write(spec.to_json())
    with os.fdopen(status_r, "rb") as fh:
        status = fh.read()
    return proc, json.loads(status)["error"] if status else ""


def _with(spec: Spec, **changes: object) -> Spec:
    from dataclasses import replace

    return replace(spec, **changes)  # type: ignore[arg-type]


def run(spec: Spec) -> tuple[int, str, str]:
    proc, error = start(spec)
    out, err = proc.communicate(timeout=60)
    assert error == "", error
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
def world() -> Iterator[dict[str, Path]]:
    """A workspace with a secret, a passphrase file, a project (data), a snapshot, a run
    directory; outside /tmp, so that the covers are what hides them."""
    base = Path(os.environ.get("PPML_SANDBOX_TEST_ROOT", Path.home())) / ".ppml-sandbox-tests"
    base.mkdir(exist_ok=True)
    root = Path(
        subprocess.run(
            ["mktemp", "-d", str(base / "w.XXXXXX")], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    paths = {
        "root": root,
        "ws": root / "ws",
        "passfile": root / "passphrase.txt",
        "project": root / "project",
        "snap": root / "ws" / "run" / "snapshot",
        "tmp": root / "ws" / "run" / "tmp",
        "boot": root / "ws" / "run" / "boot",
        "elsewhere": root / "elsewhere",
    }
    for key in ("project", "snap", "tmp", "boot", "elsewhere"):
        paths[key].mkdir(parents=True)
    (paths["ws"] / "master-key.sealed").write_text("SECRET-MASTER")
    paths["passfile"].write_text("SECRET-PASSPHRASE\n")
    (paths["boot"] / "marker").write_text("boot")
    yield paths
    subprocess.run(["rm", "-rf", str(root)], check=False)


def spec_for(world: dict[str, Path], code: str, **changes: object) -> Spec:
    spec = Spec(
        argv=[sys.executable, "-I", "-c", textwrap.dedent(code)],
        env={"PATH": os.defpath},
        cwd=str(world["project"]),
        tmp=str(world["tmp"]),
        boot=str(world["boot"]),
        writable=[str(world["project"])],
        visible=[sys.prefix, sys.base_prefix],
        hidden=[str(world["ws"]), str(world["passfile"])],
    )
    return _with(spec, **changes)


def test_no_process_outside_the_sandbox_is_visible(world: dict[str, Path]) -> None:
    """The launcher's /proc entries (environ, cmdline) are not there to be read: only the
    sandbox's init and the workload are. The needles are built at run time, so that the
    workload's own command line does not hold them."""
    code, out, err = run(
        spec_for(
            world,
            f"""
            import os, sys
            needles = [b"SECRET-" + b"PASSPHRASE", {str(world["ws"]).encode()[:-1]!r} + b"s"]
            pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
            print(os.getpid(), os.getppid(), pids)
            found = []
            for pid in (p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()):
                for name in ("environ", "cmdline", "mem"):
                    try:
                        found.append(open(f"/proc/{{pid}}/{{name}}", "rb").read(1 << 20))
                    except OSError:
                        pass
            print(any(n in d for n in needles for d in found))
            """,
        )
    )
    assert code == 0, err
    first, leaked = out.splitlines()
    assert first == "2 1 [1, 2]"  # PID 2, its parent the sandbox's init, nothing else
    assert leaked == "False"


def test_the_workspace_and_the_passphrase_file_are_covered(world: dict[str, Path]) -> None:
    code, out, err = run(
        spec_for(
            world,
            f"""
            import os
            print(os.listdir({str(world["ws"])!r}))
            print(repr(open({str(world["passfile"])!r}).read()))
            for path in ({str(world["ws"] / "master-key.sealed")!r}, {str(world["ws"] / "x")!r}):
                try:
                    open(path, "w")
                except OSError as exc:
                    print(exc.errno)
            """,
        )
    )
    assert code == 0, err
    assert out.splitlines() == ["[]", "''", "30", "30"]  # EROFS
    assert (world["ws"] / "master-key.sealed").read_text() == "SECRET-MASTER"


def test_only_data_directories_and_the_private_tmp_are_writable(world: dict[str, Path]) -> None:
    code, out, err = run(
        spec_for(
            world,
            f"""
            import os
            def attempt(path):
                try:
                    with open(path, "w") as fh:
                        fh.write("x")
                    return "ok"
                except OSError as exc:
                    return exc.errno
            print(attempt("out.csv"), attempt("/tmp/t"), attempt("/dev/shm/s"),
                  attempt({str(world["elsewhere"] / "x")!r}),
                  attempt(os.path.expanduser("~/.bashrc-x")),
                  attempt({sys.prefix + "/evil.pth"!r}))
            print(sorted(os.listdir("/tmp")))
            """,
        )
    )
    assert code == 0, err
    first, second = out.splitlines()
    assert first.split() == ["ok", "ok", "ok", "30", "30", "30"]
    assert (world["project"] / "out.csv").read_text() == "x"
    assert (world["tmp"] / "t").read_text() == "x"  # the run's own /tmp
    assert not (world["elsewhere"] / "x").exists()
    assert "marker" not in second and ".ppml" in second


def test_pinned_files_run_whatever_the_original_holds(world: dict[str, Path]) -> None:
    original = world["project"] / "job.py"
    original.write_text("print('SWAPPED IN')\n")
    copy = world["snap"] / "00000"
    copy.write_text("print('measured')\n")
    spec = spec_for(
        world, "", argv=[sys.executable, "-I", "job.py"], pinned=[[str(copy), str(original)]]
    )
    code, out, err = run(spec)
    assert code == 0, err
    assert out == "measured\n"
    code, out, _ = run(
        _with(spec, argv=[sys.executable, "-I", "-c", "open('job.py', 'w').write('x')"])
    )
    assert code != 0 and original.read_text() == "print('SWAPPED IN')\n"


def test_exposed_paths_inside_a_hidden_one(world: dict[str, Path]) -> None:
    inner = world["ws"] / "serving" / "default"
    inner.mkdir(parents=True)
    (inner / "payload.key.ppml").write_text("ENCRYPTED")
    code, out, err = run(
        spec_for(
            world,
            f"""
            import os
            print(sorted(os.listdir({str(world["ws"])!r})))
            print(open({str(inner / "payload.key.ppml")!r}).read())
            """,
            exposed=[str(inner)],
        )
    )
    assert code == 0, err
    assert out.splitlines() == ["['serving']", "ENCRYPTED"]


def test_the_workload_has_no_capability_and_cannot_undo_a_mount(world: dict[str, Path]) -> None:
    code, out, err = run(
        spec_for(
            world,
            f"""
            import ctypes, os
            status = open("/proc/self/status").read()
            wanted = ("CapEff", "CapPrm", "CapBnd", "NoNewPrivs")
            print([l.split()[1] for l in status.splitlines() if l.startswith(wanted)])
            libc = ctypes.CDLL(None, use_errno=True)
            print(libc.umount2({str(world["ws"]).encode()!r}, 2), ctypes.get_errno())
            print(libc.mount(b"none", b"/mnt", b"tmpfs", 0, None), ctypes.get_errno())
            print(libc.unshare(0x10000000 | 0x00020000))
            """,
        )
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "['0000000000000000', '0000000000000000', '0000000000000000', '1']"
    assert lines[1] == "-1 1" and lines[2] == "-1 1"  # EPERM
    assert lines[3] == "-1"


def test_no_user_namespace_of_its_own(world: dict[str, Path]) -> None:
    """In a user namespace of its own the workload would have every capability again (and could
    rearrange its mounts there): creating one is refused, whatever is asked with it."""
    code, out, err = run(
        spec_for(
            world,
            """
            import ctypes, os
            libc = ctypes.CDLL(None, use_errno=True)
            for flags in (0x10000000, 0x10000000 | 0x00020000):
                print(libc.unshare(flags), ctypes.get_errno())
            print(open("/proc/sys/user/max_user_namespaces").read().strip())
            try:
                open("/proc/sys/user/max_user_namespaces", "w").write("10")
                print("raised")
            except OSError as exc:
                print("refused", exc.errno)
            """,
        )
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[0] == "-1" and lines[1].split()[0] == "-1"
    assert lines[2] == "0"
    assert lines[3].startswith("refused")


def test_only_harmless_devices(world: dict[str, Path]) -> None:
    """/dev holds null, zero, full, random, urandom, tty, a private shm and pts: no disk, no
    virtual console, no loop, tun or KVM device, even for a workload whose uid owns them."""
    code, out, err = run(
        spec_for(
            world,
            """
            import json, os
            print(json.dumps(sorted(os.listdir("/dev"))))
            with open("/dev/null", "w") as fh:
                fh.write("x")
            print(len(open("/dev/urandom", "rb").read(16)))
            open("/dev/shm/mine", "w").write("ok")
            for dev in ("/dev/vcs", "/dev/loop-control", "/dev/kvm", "/dev/net/tun", "/dev/sda"):
                try:
                    os.open(dev, os.O_RDONLY)
                    print("opened", dev)
                except OSError:
                    pass
            try:
                os.mknod("/dev/mine")
                print("made a node")
            except OSError:
                pass
            """,
        )
    )
    assert code == 0, err
    lines = out.splitlines()
    names = json.loads(lines[0])
    assert set(names) <= {
        "null", "zero", "full", "random", "urandom", "tty", "shm", "pts", "fd", "stdin",
        "stdout", "stderr", "ptmx",
    }  # fmt: skip
    assert {"null", "urandom", "shm"} <= set(names)
    assert lines[1:] == ["16"]


def test_sysv_ipc_is_private(world: dict[str, Path]) -> None:
    """A System V shared memory segment of the launcher's user (another process's memory) is
    not reachable from the sandbox, which has an IPC namespace of its own."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    key = 0x5EC0 + os.getpid() % 1000
    shmid = libc.shmget(key, 4096, 0o1000 | 0o600)  # IPC_CREAT
    assert shmid >= 0, ctypes.get_errno()
    try:
        code, out, err = run(
            spec_for(
                world,
                f"""
                import ctypes
                libc = ctypes.CDLL(None, use_errno=True)
                print(libc.shmget({key}, 0, 0), ctypes.get_errno())
                """,
            )
        )
    finally:
        libc.shmctl(shmid, 0, None)  # IPC_RMID
    assert code == 0, err
    assert out.split() == ["-1", "2"]  # ENOENT: no such segment in here


def test_no_descriptor_but_the_named_ones(world: dict[str, Path]) -> None:
    keep_r, keep_w = os.pipe()
    leak_r, leak_w = os.pipe()
    os.set_inheritable(leak_r, True)
    try:
        code, out, err = run(
            spec_for(
                world,
                "import os; print(sorted(int(f) for f in os.listdir('/proc/self/fd')))",
                keep_fds=[keep_r],
            )
        )
    finally:
        for fd in (keep_r, keep_w, leak_r, leak_w):
            os.close(fd)
    assert code == 0, err
    fds = json.loads(out)
    assert keep_r in fds and leak_r not in fds and set(fds) <= {0, 1, 2, 3, keep_r}


def test_exit_codes_and_signals_pass_through(world: dict[str, Path]) -> None:
    assert run(spec_for(world, "raise SystemExit(7)"))[0] == 7
    assert run(spec_for(world, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"))[0] == 137
    ready = world["project"] / "ready"
    proc, error = start(
        spec_for(
            world,
            """
            import signal, sys, time
            signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))
            open("ready", "w").close()
            time.sleep(60)
            """,
        )
    )
    assert error == ""
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 42


def test_the_sandbox_dies_with_its_launcher(world: dict[str, Path], tmp_path: Path) -> None:
    """A launcher killed with SIGKILL takes its workload (and the workload's children) along."""
    script = tmp_path / "launcher.py"
    # A duration no other process uses, so that only this workload's child is looked for (a
    # `sleep` of another program on the machine is not the workload's).
    duration = f"300.{os.getpid()}{time.monotonic_ns() % 1000000}"
    spec = spec_for(
        world,
        f"""
        import subprocess, time
        subprocess.Popen(["sleep", "{duration}"])
        open("ready", "w").close()
        time.sleep(300)
        """,
    )
    script.write_text(
        textwrap.dedent(
            f"""
            import os, subprocess, sys, time
            r, w = os.pipe()
            os.write(w, {spec.to_json()!r}); os.close(w)
            argv = [sys.executable, "-I", "-S", {sandbox.__file__!r}, str(r)]
            subprocess.Popen(argv, pass_fds=(r,))
            time.sleep(300)
            """
        )
    )
    launcher = subprocess.Popen([sys.executable, str(script)])
    ready = world["project"] / "ready"
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    before = _sleepers(duration)
    assert before
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 30
    while _sleepers(duration) & before:
        assert time.monotonic() < deadline, "the workload outlived its launcher"
        time.sleep(0.05)


def _sleepers(duration: str) -> set[int]:
    pattern = f"^sleep {re.escape(duration)}$"
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def test_set_up_failures_are_reported_not_run(world: dict[str, Path]) -> None:
    proc, error = start(spec_for(world, "print('ran')", cwd=str(world["ws"] / "nope")))
    out, _ = proc.communicate(timeout=30)
    assert "working directory" in error and out == b""
    proc, error = start(spec_for(world, "", argv=["/nonexistent/program"]))
    proc.communicate(timeout=30)
    assert "cannot start /nonexistent/program" in error


NOBODY_CHECK = r"""
import json, os, subprocess, sys
root = sys.argv[1]
code = "\n".join([
    "import os",
    "print(os.listdir(%r), repr(open(%r).read()),"
    " sorted(p for p in os.listdir('/proc') if p.isdigit()),"
    " open('/proc/self/status').read().split('CapEff:')[1].split()[0])"
    % (root + "/ws", root + "/passphrase.txt"),
])
spec = {"argv": [sys.executable, "-I", "-c", code], "env": {"PATH": os.defpath},
        "cwd": root + "/project", "tmp": root + "/tmp", "writable": [root + "/project"],
        "visible": ["/usr"], "hidden": [root + "/ws", root + "/passphrase.txt"]}
r, w = os.pipe()
os.write(w, json.dumps(spec).encode())
os.close(w)
sys.exit(subprocess.call([sys.executable, "-I", "-S", root + "/sandbox.py", str(r)], pass_fds=(r,)))
"""


@pytest.mark.skipif(
    os.getuid() != 0 or not Path("/usr/bin/python3").exists(),
    reason="switching to another user needs root and a Python that user can run",
)
def test_an_unprivileged_user_gets_the_same_sandbox() -> None:
    """As an ordinary user (nobody): user namespaces need no privilege, and the workspace,
    the passphrase file and the other processes are out of reach just the same."""
    user = pwd.getpwnam("nobody")
    root = Path("/var/tmp") / f"ppml-sandbox-nobody-{os.getpid()}"
    try:
        for d in ("", "ws", "project", "tmp"):
            (root / d).mkdir(mode=0o700)
        (root / "ws" / "master-key.sealed").write_text("SECRET")
        (root / "passphrase.txt").write_text("SECRET-PASSPHRASE")
        (root / "sandbox.py").write_bytes(Path(sandbox.__file__).read_bytes())
        (root / "check.py").write_text(NOBODY_CHECK)
        for path in [root, *root.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid)
        proc = subprocess.run(
            ["/usr/bin/python3", "-I", str(root / "check.py"), str(root)],
            user=user.pw_uid,
            group=user.pw_gid,
            extra_groups=[],
            env={"PATH": os.defpath},
            cwd=str(root),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "[] '' ['1', '2'] 0000000000000000"
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)
