"""Command forms: what each resolves to and how it is started, or why it is refused."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from ppml.errors import InputNotFound, UsageError
from ppml.tee.command import resolve_command


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "job.py").write_text("print('job')\n")
    (tmp_path / "job.sh").write_text("echo job\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_python_script_with_flags(project: Path) -> None:
    c = resolve_command([sys.executable, "-u", "-I", "-E", "-X", "utf8", "job.py", "--rows", "3"])
    assert (c.kind, c.mode, c.target, c.args) == ("python", "script", "job.py", ("--rows", "3"))
    assert c.flags == ("-u", "-I", "-E", "-Xutf8")
    assert c.real == os.path.realpath(sys.executable) and len(c.real_sha256) == 64
    # -I and -E become -P (the launcher controls the environment; the guard comes through it);
    # bytecode is never written, the user site never read.
    assert c.launch_argv() == [sys.executable, "-B", "-s", "-u", "-P", "-Xutf8", "job.py",
                               "--rows", "3"]  # fmt: skip


def test_python_module_and_command(project: Path) -> None:
    c = resolve_command([sys.executable, "-m", "job", "x"])
    assert (c.mode, c.target, c.module_file) == ("module", "job", project / "job.py")
    assert c.launch_argv() == [sys.executable, "-B", "-s", "-m", "job", "x"]
    safe = resolve_command([sys.executable, "-I", "-m", "job"])
    assert safe.module_file is None  # -I: the working directory is not on the path
    c = resolve_command([sys.executable, "-c", "print(1)", "a"])
    assert (c.mode, c.target, c.args) == ("command", "print(1)", ("a",))
    assert c.launch_argv()[-3:] == ["-c", "print(1)", "a"]


def test_shell_scripts(project: Path) -> None:
    bash = shutil.which("bash")
    assert bash is not None
    c = resolve_command(["bash", "-e", "-o", "pipefail", "job.sh", "a"])
    assert (c.kind, c.mode, c.script, c.flags) == ("shell", "script", Path("job.sh"),
                                                   ("-e", "-o", "pipefail"))  # fmt: skip
    assert c.launch_argv() == [bash, "-e", "-o", "pipefail", "job.sh", "a"]
    c = resolve_command(["bash", "-c", "echo hi", "name"])
    assert (c.mode, c.target, c.args) == ("command", "echo hi", ("name",))


def test_shebang_scripts_run_with_their_interpreter(project: Path) -> None:
    script = project / "tool"
    script.write_text(f"#!{sys.executable} -u\nprint('tool')\n")
    script.chmod(0o755)
    c = resolve_command([str(script), "arg"])
    assert (c.kind, c.flags, c.mode, c.target, c.args) == (
        "python",
        ("-u",),
        "script",
        str(script),
        ("arg",),
    )
    env_script = project / "tool2"
    env_script.write_text(f"#!/usr/bin/env {Path(sys.executable).name}\nprint('tool')\n")
    env_script.chmod(0o755)
    c = resolve_command([str(env_script)], path=str(Path(sys.executable).parent))
    assert c.kind == "python" and c.program == sys.executable and c.target == str(env_script)


def test_env_resolves_on_path(project: Path) -> None:
    c = resolve_command(["/usr/bin/env", sys.executable, "job.py"])
    assert c.program == sys.executable and c.target == "job.py"
    for bad in (["/usr/bin/env"], ["/usr/bin/env", "-i", "python"], ["/usr/bin/env", "A=1", "x"]):
        with pytest.raises(UsageError, match="env"):
            resolve_command(bad)


def test_other_programs_and_refusals(project: Path) -> None:
    c = resolve_command(["true"])
    assert (c.kind, c.mode) == ("program", "program")
    with pytest.raises(UsageError, match="neither a program"):
        (project / "data.txt").write_text("not a program\n")
        resolve_command([str(project / "data.txt")])
    with pytest.raises(InputNotFound):
        resolve_command([sys.executable, "missing.py"])
    with pytest.raises(InputNotFound):
        resolve_command(["no-such-program-anywhere"])
    fake_java = project / "bin" / "java"
    fake_java.parent.mkdir()
    shutil.copy("/bin/true", fake_java)
    with pytest.raises(UsageError, match="cannot measure the code that java loads"):
        resolve_command(["java", "-jar", "x.jar"], path=str(fake_java.parent))
