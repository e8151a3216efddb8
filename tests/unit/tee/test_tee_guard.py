"""The import guard on its own: a real interpreter with the guard as its sitecustomize, the
rules written as the launcher writes them (no sandbox here: the guard must hold by itself)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ppml.tee import guard
from ppml.tee.environment import measure_environment
from ppml.tee.guard import PythonArgvError, parse_python_argv


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def roots() -> list[str]:
    return list(measure_environment(sys.executable).roots)


class Guarded:
    def __init__(self, tmp_path: Path, roots: list[str]) -> None:
        self.project = tmp_path / "project"
        self.scratch = tmp_path / "scratch"
        self.boot = tmp_path / "boot"
        self.bytecode = tmp_path / "bytecode"  # the launcher's cache: empty, read by the guard
        self.hints = self.scratch / "hints"
        for d in (self.project, self.scratch, self.boot, self.bytecode):
            d.mkdir()
        self.roots = roots
        self.trusted: dict[str, str] = {}
        (self.boot / "sitecustomize.py").write_bytes(Path(guard.__file__).read_bytes())

    def measured(self, name: str, text: str) -> Path:
        path = self.project / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        self.trusted[str(path.resolve())] = sha(path)
        return path

    def run(
        self,
        *args: str,
        interpreter: str = sys.executable,
        pythonpath: list[Path] = (),
        pycache_prefix: str | None = "",
    ) -> subprocess.CompletedProcess[str]:
        doc = {
            "interpreter": os.path.realpath(sys.executable),
            "roots": self.roots,
            "trusted": self.trusted,
            "scratch": [str(self.scratch)],
            "host": [],
            "writable": [str(self.project)],
            "bytecode": str(self.bytecode),
            "hints": str(self.hints),
        }
        (self.boot / guard.WORKLOAD_FILE).write_text(json.dumps(doc))
        env = {
            "PATH": os.defpath,
            "PYTHONPATH": os.pathsep.join([str(self.boot), *map(str, pythonpath)]),
            "PYTHONNOUSERSITE": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        if pycache_prefix is not None:
            env["PYTHONPYCACHEPREFIX"] = pycache_prefix or str(self.bytecode)
        return subprocess.run(
            [interpreter, "-B", "-s", *args],
            cwd=self.project,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )


@pytest.fixture
def g(tmp_path: Path, roots: list[str]) -> Guarded:
    return Guarded(tmp_path, roots)


def test_measured_code_and_the_environment_run(g: Guarded) -> None:
    g.measured("job.py", "import helper, json, pyarrow\nprint(helper.VALUE, pyarrow.__name__)\n")
    g.measured("helper.py", "VALUE = 'measured'\n")
    r = g.run("job.py")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "measured pyarrow\n"


def test_an_unmeasured_main_script_is_refused(g: Guarded) -> None:
    (g.project / "job.py").write_text("print('ran')\n")
    r = g.run("job.py")
    assert r.returncode == guard.REFUSED_EXIT and r.stdout == ""
    assert "job.py is not a measured file" in r.stderr


def test_a_measured_file_changed_after_measurement_is_refused(g: Guarded) -> None:
    g.measured("job.py", "import helper\n")
    helper = g.measured("helper.py", "VALUE = 1\n")
    helper.write_text("VALUE = 2\nprint('CHANGED')\n")
    r = g.run("job.py")
    assert r.returncode != 0 and "CHANGED" not in r.stdout
    assert "not the file that was measured" in r.stderr
    job = g.project / "job.py"
    job.write_text("print('CHANGED')\n")
    r = g.run("job.py")
    assert r.returncode == guard.REFUSED_EXIT and "CHANGED" not in r.stdout


def test_a_main_script_swapped_after_the_check_is_refused(g: Guarded) -> None:
    """The guard reads the main script once; the interpreter reads it again to run it. A file
    renamed over it in between (here by a sitecustomize module of the environment that runs
    after the guard's check) is refused when the interpreter runs it, whatever the kind of swap:
    another file of the same size or not, or a symbolic link to one."""
    g.measured("job.py", "print('measured')\n")
    evil, new, job = (str(g.project / n) for n in ("evil.py", "new", "job.py"))
    for planted in ("print('SWAPPED!')\n", "SYMLINK", "print('SWAPPED')\n" * 50):
        (g.project / "evil.py").write_text(
            "print('SWAPPED')\n" if planted == "SYMLINK" else planted
        )
        make = "symlink" if planted == "SYMLINK" else "link"
        original = (g.project / "job.py").read_bytes()
        (g.scratch / "sitecustomize.py").write_text(
            f"import os\nos.{make}({evil!r}, {new!r})\nos.rename({new!r}, {job!r})\n"
        )
        try:
            r = g.run("job.py", pythonpath=[g.scratch])
        finally:
            (g.project / "job.py").unlink()
            (g.project / "job.py").write_bytes(original)
            (g.scratch / "sitecustomize.py").unlink()
        assert r.returncode == guard.REFUSED_EXIT, (planted, r.stdout, r.stderr)
        assert "SWAPPED" not in r.stdout
        assert "job.py changed after it was measured" in r.stderr
    r = g.run("job.py")
    assert r.returncode == 0 and r.stdout == "measured\n", r.stderr


def test_a_link_swapped_between_the_check_and_the_load_is_not_followed(g: Guarded) -> None:
    """The guard resolves a module's symbolic links to check where it lives; the loader must
    then read that file, not the path as found: a link in a writable directory (a data
    directory another process can write) could point elsewhere by then. The measured job plays
    the racer here, swapping the link right after the check, so the race is won every time."""
    import email

    stdlib_email = Path(email.__file__).parent
    evil = g.project / "evil"
    evil.mkdir()
    (evil / "__init__.py").write_text("print('UNMEASURED CODE RAN')\n")
    (evil / "utils.py").write_text("print('UNMEASURED CODE RAN')\n")
    (g.project / "mail").symlink_to(stdlib_email, target_is_directory=True)
    g.measured(
        "job.py",
        "import importlib, importlib.util, os, sys\n"
        "spec = importlib.util.find_spec('mail')\n"  # checked: the standard library's email
        "os.symlink('evil', 'swap')\n"
        "os.replace('swap', 'mail')\n"  # now the link leads to unmeasured code
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules['mail'] = module\n"
        "spec.loader.exec_module(module)\n"
        "import mail.utils\n"  # a submodule, looked up after the swap
        "print('loaded', module.__file__, mail.utils.__file__)\n",
    )
    r = g.run("job.py")
    assert "UNMEASURED" not in r.stdout, r.stdout
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("loaded " + str(stdlib_email / "__init__.py"))
    assert str(stdlib_email / "utils.py") in r.stdout


def test_runpy_runs_only_the_measured_bytes(g: Guarded) -> None:
    """`runpy.run_path` of a measured file reads it again: those bytes must be the measured ones."""
    g.measured(
        "job.py", "import os, runpy\nos.rename('evil.py', 'tool.py')\nrunpy.run_path('tool.py')\n"
    )
    g.measured("tool.py", "print('measured tool')\n")
    (g.project / "evil.py").write_text("print('SWAPPED')\n")
    r = g.run("job.py")
    assert r.returncode != 0 and "SWAPPED" not in r.stdout
    assert "not the file that was measured" in r.stderr


def test_an_unmeasured_sitecustomize_is_refused(g: Guarded, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "sitecustomize.py").write_text("print('PLANTED')\n")
    g.measured("job.py", "print('measured')\n")
    r = g.run("job.py", pythonpath=[elsewhere])
    assert r.returncode == guard.REFUSED_EXIT and "PLANTED" not in r.stdout
    assert "sitecustomize module that is not a measured file" in r.stderr


def _environment_module(g: Guarded, tmp_path: Path, text: str) -> Path:
    """A module of the measured environment (its directory one of the roots)."""
    root = tmp_path / "envroot"
    root.mkdir(exist_ok=True)
    g.roots = [*g.roots, str(root.resolve())]
    module = root / "envmod.py"
    module.write_text(text)
    return module


def _forge_pyc(source: Path, text: str) -> Path:
    """A bytecode file beside `source` that Python's own check takes for `source`'s (same
    modification time and size recorded), holding other code."""
    import importlib.util
    import marshal

    st = source.stat()
    code = compile(text, str(source), "exec")
    header = importlib.util.MAGIC_NUMBER + (0).to_bytes(4, "little")
    header += int(st.st_mtime).to_bytes(4, "little")
    header += (st.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    pyc = Path(importlib.util.cache_from_source(str(source)))
    pyc.parent.mkdir(exist_ok=True)
    pyc.write_bytes(header + marshal.dumps(code))
    return pyc


def test_a_planted_pycache_file_of_the_environment_is_never_read(
    g: Guarded, tmp_path: Path
) -> None:
    """A workload that could once write into an environment (a data directory covering
    another virtual environment) plants bytecode there: no measurement covers it, so Python
    must never read it."""
    module = _environment_module(g, tmp_path, "VALUE = 'source'\n")
    _forge_pyc(module, "VALUE = 'PLANTED'\n")
    g.measured("job.py", "import envmod\nprint(envmod.VALUE)\n")
    r = g.run("job.py", pythonpath=[module.parent])
    assert r.returncode == 0, r.stderr
    assert r.stdout == "source\n"


@pytest.mark.parametrize("prefix", [None, "elsewhere"])
def test_a_bytecode_cache_other_than_ppml_s_is_refused(
    g: Guarded, tmp_path: Path, prefix: str | None
) -> None:
    """Without ppml's PYTHONPYCACHEPREFIX (a child started without it, or with its own),
    Python would read __pycache__ files or a cache the workload wrote: refused."""
    g.measured("job.py", "print('ran')\n")
    other = None if prefix is None else str(tmp_path / prefix)
    r = g.run("job.py", pycache_prefix=other)
    assert r.returncode == guard.REFUSED_EXIT and "ran" not in r.stdout
    assert "bytecode from ppml's cache only" in r.stderr


def test_uncached_environment_modules_are_hinted_and_compiled_by_the_launcher(
    g: Guarded, tmp_path: Path
) -> None:
    from ppml.tee.bytecode import cache_hinted
    from ppml.tee.environment import PythonEnvironment

    module = _environment_module(g, tmp_path, "VALUE = 'first'\n")
    g.measured("job.py", "import envmod\nprint(envmod.VALUE)\n")
    r = g.run("job.py", pythonpath=[module.parent])
    assert r.returncode == 0 and r.stdout == "first\n", r.stderr
    hints = g.hints.read_text().splitlines()
    assert f"0 {module}" in hints
    # What a lying workload adds: files outside the environment, relative paths, "..".
    outside = g.project / "job.py"
    g.hints.write_text(
        "\n".join([*hints, f"0 {outside}", "0 envmod.py", f"0 {module.parent}/../x/envmod.py"])
        + "\n"
    )
    env = PythonEnvironment(
        interpreter=os.path.realpath(sys.executable),
        interpreter_sha256="",
        prefix=sys.prefix,
        base_prefix=sys.base_prefix,
        libraries=(),
        version="",
        roots=tuple(g.roots),
        digest="",
        files=0,
        size=0,
    )
    from ppml.tee import bytecode as bc

    original = bc.bytecode_dir
    bc.bytecode_dir = lambda: g.bytecode  # type: ignore[assignment]
    try:
        assert cache_hinted(env, g.hints) >= 1
    finally:
        bc.bytecode_dir = original  # type: ignore[assignment]
    cached = list(g.bytecode.rglob("*.pyc"))
    names = {c.name.split(".")[0] for c in cached}
    assert "envmod" in names and "job" not in names
    assert all(str(c).startswith(str(g.bytecode)) for c in cached)
    envmod_pyc = next(c for c in cached if c.name.startswith("envmod."))
    assert envmod_pyc.read_bytes()[4:8] == (3).to_bytes(4, "little")  # checked-hash bytecode
    g.hints.unlink()
    r = g.run("job.py", pythonpath=[module.parent])
    assert r.returncode == 0 and r.stdout == "first\n", r.stderr
    assert not g.hints.exists() or f"0 {module}" not in g.hints.read_text()
    # The source changes (same size, same modification time): the cached bytecode is not used.
    st = module.stat()
    module.write_text("VALUE = 'later'\n")
    os.utime(module, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = g.run("job.py", pythonpath=[module.parent])
    assert r.returncode == 0 and r.stdout == "later\n", r.stderr


def test_code_from_standard_input_is_refused(g: Guarded) -> None:
    r = g.run("-")
    assert r.returncode == guard.REFUSED_EXIT and "standard input" in r.stderr


def test_another_interpreter_is_refused(g: Guarded, tmp_path: Path) -> None:
    other = Path("/usr/bin/python3")
    if not other.exists() or os.path.realpath(other) == os.path.realpath(sys.executable):
        pytest.skip("no second Python interpreter here")
    g.measured("job.py", "print('ran')\n")
    r = g.run("job.py", interpreter=str(other))
    assert r.returncode == guard.REFUSED_EXIT and "not the measured Python interpreter" in r.stderr


def test_the_scratch_space_is_allowed(g: Guarded) -> None:
    """A module the run wrote in its own /tmp (TorchDistributor writes its training script
    there) is the run's own code."""
    g.measured("job.py", f"import sys\nsys.path.insert(0, {str(g.scratch)!r})\nimport gen\n")
    (g.scratch / "gen.py").write_text("print('generated')\n")
    r = g.run("job.py")
    assert r.returncode == 0 and r.stdout == "generated\n", r.stderr
    r = g.run(str(g.scratch / "gen.py"))
    assert r.returncode == 0 and r.stdout == "generated\n", r.stderr


def test_ctypes_cannot_load_a_library_from_a_data_directory(g: Guarded) -> None:
    g.measured("job.py", "import ctypes\nctypes.CDLL('./planted.so')\n")
    (g.project / "planted.so").write_bytes(b"\x7fELF")
    r = g.run("job.py")
    assert r.returncode != 0 and "refused to load ./planted.so" in r.stderr


def test_the_guard_survives_in_children(g: Guarded) -> None:
    """Python programs started by the workload carry the guard (PYTHONPATH is inherited)."""
    g.measured(
        "job.py",
        "import subprocess, sys\nprint(subprocess.run([sys.executable, 'other.py']).returncode)\n",
    )
    (g.project / "other.py").write_text("print('UNMEASURED')\n")
    r = g.run("job.py")
    assert r.returncode == 0
    assert r.stdout.strip() == str(guard.REFUSED_EXIT) and "UNMEASURED" not in r.stdout


@pytest.mark.parametrize(
    ("argv", "flags", "mode", "target", "args"),
    [
        (["job.py", "a"], [], "script", "job.py", ["a"]),
        (["-u", "-B", "job.py"], ["-u", "-B"], "script", "job.py", []),
        (["-uB", "job.py"], ["-u", "-B"], "script", "job.py", []),
        (["-W", "error", "-Xutf8", "job.py"], ["-Werror", "-Xutf8"], "script", "job.py", []),
        (["-Werror", "job.py", "-m"], ["-Werror"], "script", "job.py", ["-m"]),
        (["-m", "pkg.mod", "x"], [], "module", "pkg.mod", ["x"]),
        (["-Im", "pkg"], ["-I"], "module", "pkg", []),
        (["-c", "print(1)", "y"], [], "command", "print(1)", ["y"]),
        (["-cprint(1)"], [], "command", "print(1)", []),
        (["--check-hash-based-pycs", "always", "j.py"], ["--check-hash-based-pycs=always"],
         "script", "j.py", []),
        ([], [], "stdin", None, []),
        (["-"], [], "stdin", None, []),
        (["--", "job.py"], [], "script", "job.py", []),
    ],
)  # fmt: skip
def test_the_python_command_line_grammar(
    argv: list[str], flags: list[str], mode: str, target: str | None, args: list[str]
) -> None:
    parsed = parse_python_argv(argv)
    assert (parsed.flags, parsed.mode, parsed.target, parsed.args) == (flags, mode, target, args)


@pytest.mark.parametrize("argv", [["-W"], ["-Z", "x.py"], ["-m"], ["-c"]])
def test_bad_python_command_lines(argv: list[str]) -> None:
    with pytest.raises(PythonArgvError):
        parse_python_argv(argv)
