"""Which code a command runs: the command forms ppml can measure completely, and the others.

`resolve_command` turns ``CMD [ARGS...]`` into a `ResolvedCommand` or refuses it with a message
that says what to do instead:

- **Python** (``python``, ``python3``, ``python3.11`` or the interpreter running ppml): every
  CPython option is parsed (`ppml.tee.guard.parse_python_argv`); ``-i``, ``-S``, code from
  standard input, ``-X pycache_prefix`` and ``--check-hash-based-pycs`` are refused (they read
  unmeasured code or bypass the import guard); the flags are measured; a script is measured
  with its local imports; ``-m MODULE`` is resolved as Python would (the working directory first,
  unless ``-P`` or ``-I``), and a module found there is measured with its local imports, one of
  the environment by the environment's digest; ``-c CODE`` is measured as its text.
- **Shells** (``bash``, ``sh``, ``dash``): the script (or ``-c`` text) is measured; options that
  read other files (``--rcfile``, ``-l``, ``-i``, ...) are refused. Python programs the script
  starts are guarded like the workload's own: they run only measured files (``--trusted``),
  unless the script starts them with ``-I`` or ``-E`` (which the measured script then says).
- **A script with ``#!``** (``./job.py``, a console script such as ``ppml``) runs with the
  interpreter its first line names; ``/usr/bin/env PROGRAM ARGS`` is resolved on ``PATH``.
- **Shims** (pyenv, asdf: shell scripts that pick an interpreter from the working directory) are
  refused: name the interpreter itself (``$(pyenv which python)``).
- Interpreters whose code ppml cannot measure (``java``, ``node``, ``perl``, ...) are refused.
  Any other executable (an ELF binary) is measured by its bytes and arguments.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shutil
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ppml.errors import InputNotFound, UsageError
from ppml.tee.guard import PythonArgvError, parse_python_argv

__all__ = [
    "DEFAULT_ENV",
    "FIXED_ENV",
    "ResolvedCommand",
    "check_env_name",
    "resolve_command",
    "workload_environment",
]

_PYTHON_NAME = re.compile(r"python(\d+(\.\d+)*)?")
_SHELLS = frozenset({"bash", "sh", "dash"})
_UNMEASURABLE = frozenset(
    {
        "java", "node", "nodejs", "deno", "bun", "perl", "ruby", "php", "Rscript", "R",
        "julia", "lua", "luajit", "tclsh", "wish", "make", "awk", "gawk", "mawk", "zsh",
        "fish", "ksh", "csh", "tcsh", "pwsh", "jshell", "scala", "groovy", "kotlin",
        "spark-submit", "pyspark", "spark-shell", "ipython", "jupyter",
    }
)  # fmt: skip
# Python options that read code ppml cannot measure or switch the import guard off.
_REFUSED_PYTHON = {
    "-i": "-i reads code from the terminal after the script",
    "-S": "-S skips the site module, which installs ppml's import guard",
    "-h": "-h prints help and runs nothing",
    "-?": "-? prints help and runs nothing",
    "-V": "-V prints the version and runs nothing",
}
# -X options that change only how measured code runs.
_SAFE_X = frozenset(
    {
        "utf8", "dev", "faulthandler", "tracemalloc", "importtime", "showrefcount",
        "frozen_modules", "int_max_str_digits", "warn_default_encoding", "no_debug_ranges",
        "perf",
    }
)  # fmt: skip
_SHELL_FLAGS = re.compile(r"[-+][euxvfCbhmnaBHPT]+")
_SHELL_SET_OPTIONS = frozenset(
    {"errexit", "nounset", "xtrace", "pipefail", "verbose", "noglob", "noclobber", "allexport"}
)

# -- the environment -----------------------------------------------------------------------------

# Passed to every workload, with their values measured. TERM and TMPDIR are not: a terminal's
# name would make the measurement depend on the terminal, and TMPDIR is the sandbox's /tmp.
DEFAULT_ENV = ("HOME", "LANG", "LC_ALL", "LC_CTYPE", "PATH", "TZ", "USER")
# Set by the launcher, the same on every run (and so measured like any other value).
FIXED_ENV = {"TMPDIR": "/tmp"}  # noqa: S108 -- the sandbox's private /tmp
_SAFE_PYTHON_ENV = frozenset(
    {"PYTHONUNBUFFERED", "PYTHONIOENCODING", "PYTHONHASHSEED", "PYTHONUTF8", "PYTHONFAULTHANDLER"}
)
# Names that make a program load code (or configuration that loads code) from a place the
# measurement does not cover. Never passed, whatever --env says.
_REFUSED_ENV = (
    "LD_*", "DYLD_*", "PYTHON*", "PPML_*", "*PATH", "BASH_ENV", "ENV", "BASH_FUNC_*",
    "SHELLOPTS", "BASHOPTS", "PS4", "PROMPT_COMMAND", "IFS", "GCONV_PATH", "GETCONF_DIR",
    "HOSTALIASES", "LOCALDOMAIN", "RES_OPTIONS", "LOCPATH", "NLSPATH", "GLIBC_TUNABLES",
    "MALLOC_*", "TMPDIR", "JAVA_*", "_JAVA_*", "JDK_*", "CLASSPATH", "*_OPTIONS", "*_OPTS",
    "SPARK_*", "PYSPARK_*", "HADOOP_*", "YARN_*", "OPENSSL_*", "PERL*", "RUBY*", "NODE_*",
    "GIT_*", "TERMINFO*",
)  # fmt: skip
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_env_name(name: str) -> str:
    """`name`, if a workload may receive it; `UsageError` otherwise."""
    if not _ENV_NAME.fullmatch(name):
        raise UsageError(f"invalid environment variable name {name!r}")
    if name == "PATH" or name in _SAFE_PYTHON_ENV:
        return name
    for pattern in _REFUSED_ENV:
        if fnmatch.fnmatchcase(name, pattern):
            raise UsageError(
                f"{name} can change which code runs and is never passed to an attested workload"
            )
    return name


def workload_environment(
    requested: Iterable[str], source: Mapping[str, str] = os.environ
) -> dict[str, str]:
    """The workload's variables: the defaults and each ``--env NAME`` (value from `source`) or
    ``--env NAME=VALUE``, all checked; then the launcher's fixed values."""
    env: dict[str, str] = {}
    for name in DEFAULT_ENV:
        if name in source:
            env[name] = source[name]
    for item in requested:
        name, eq, value = item.partition("=")
        check_env_name(name)
        if eq:
            env[name] = value
        elif name in source:
            env[name] = source[name]
    env.update(FIXED_ENV)
    return dict(sorted(env.items()))


# -- command forms ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResolvedCommand:
    """A command ppml can measure. `program` is what runs (a virtual environment's `python`
    keeps its path: the path decides the environment); `real` is the binary behind it."""

    kind: str  # "python", "shell" or "program"
    program: str
    real: str
    real_sha256: str
    flags: tuple[str, ...]  # interpreter options, one item each
    mode: str  # python: script, module, command; shell: script, command; program: program
    target: str | None  # the script path as given, the module name, the code text
    args: tuple[str, ...]  # the arguments after the target
    script: Path | None  # the script file (mode "script")
    module_file: Path | None = None  # the local file of `-m MODULE`, when not in the env

    def launch_argv(self) -> list[str]:
        """The argv that runs it in the sandbox. Python: ``-B -s`` always (no bytecode written,
        no user site); ``-I`` and ``-E`` become ``-P`` (and nothing), because the launcher
        controls the environment and the import guard arrives through it."""
        if self.kind != "python":
            tail = [*self.flags]
            if self.mode == "command":
                tail += ["-c", self.target or ""]
            elif self.target is not None:
                tail.append(self.target)
            return [self.program, *tail, *self.args]
        flags = ["-B", "-s"]
        for flag in self.flags:
            if flag == "-I":
                flags.append("-P")
            elif flag not in ("-E", "-B", "-s"):
                flags.append(flag)
        mode = {"script": [], "module": ["-m"], "command": ["-c"]}[self.mode]
        return [self.program, *dict.fromkeys(flags), *mode, self.target or "", *self.args]


_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}


def _sha256(path: str) -> str:
    """SHA-256 of a program's binary (remembered per inode and change time)."""
    st = os.stat(path)
    key = (path, st.st_dev, st.st_ino, st.st_size, st.st_ctime_ns)
    if key not in _DIGESTS:
        with open(path, "rb") as fh:
            _DIGESTS[key] = hashlib.file_digest(fh, "sha256").hexdigest()
    return _DIGESTS[key]


def _which(name: str, path: str | None) -> Path:
    found = shutil.which(name, path=path)
    if found is None:
        raise InputNotFound(f"command not found: {name}")
    return Path(os.path.abspath(found))


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(256)
    except OSError as exc:
        raise InputNotFound(f"cannot read {path}: {exc.strerror}") from None


def _is_python(path: Path) -> bool:
    return bool(_PYTHON_NAME.fullmatch(path.name)) or (
        os.path.realpath(path) == os.path.realpath(sys.executable)
    )


def _is_shim(path: Path, head: bytes) -> bool:
    return path.parent.name == "shims" or b"pyenv" in head or b"asdf" in head


def _shebang(head: bytes) -> list[str] | None:
    if not head.startswith(b"#!"):
        return None
    line = head[2:].split(b"\n", 1)[0].decode("utf-8", "replace").strip()
    return line.split() or None


def resolve_command(command: list[str], *, path: str | None = None) -> ResolvedCommand:
    """Resolve `command` (searching `path`, default $PATH) or refuse it."""
    if not command:
        raise UsageError("no command given: use `-- CMD [ARGS...]`")
    name, args = command[0], list(command[1:])
    for _ in range(4):  # env and #! lines, a few levels deep
        program = Path(os.path.abspath(name)) if "/" in name else _which(name, path)
        if not program.is_file():
            raise InputNotFound("no such program", path=program)
        base = program.name
        if base == "env":
            if not args or args[0].startswith("-") or "=" in args[0]:
                raise UsageError(
                    "`env` with options or assignments cannot be measured: pass variables with "
                    "--env NAME=VALUE and name the program directly"
                )
            name, args = args[0], args[1:]
            continue
        head = _head(program)
        if head.startswith(b"\x7fELF"):
            return _resolve_binary(program, args)
        line = _shebang(head)
        if line is None:
            raise UsageError(f"{program} is neither a program nor a script with a #! line")
        if _is_shim(program, head):
            raise UsageError(
                f"{command[0]} resolves to a shim ({program}) that picks an interpreter from "
                "the working directory; name the interpreter itself, for example "
                '`ppml run -- "$(pyenv which python)" job.py`'
            )
        name, args = line[0], [*line[1:], str(program), *args]
    raise UsageError(f"{command[0]}: too many levels of #! and env")


def _resolve_binary(program: Path, args: list[str]) -> ResolvedCommand:
    real = os.path.realpath(program)
    if _is_python(program):
        return _resolve_python(program, real, args)
    if program.name in _SHELLS or Path(real).name in _SHELLS:
        return _resolve_shell(program, real, args)
    if program.name in _UNMEASURABLE or Path(real).name in _UNMEASURABLE:
        raise UsageError(
            f"ppml cannot measure the code that {program.name} loads: run a Python program "
            "(`ppml run -- python job.py`) or a shell script"
        )
    return ResolvedCommand(
        "program", str(program), real, _sha256(real), (), "program", None, tuple(args), None
    )


def _resolve_python(program: Path, real: str, args: list[str]) -> ResolvedCommand:
    try:
        parsed = parse_python_argv(args)
    except PythonArgvError as exc:
        raise UsageError(f"{program.name}: {exc}") from None
    for flag in parsed.flags:
        reason = _REFUSED_PYTHON.get(flag)
        if reason is None and flag.startswith("--"):
            reason = (
                f"{flag}: ppml decides how bytecode caches are used"
                if flag.startswith("--check-hash-based-pycs")
                else f"{flag} runs nothing"
            )
        if reason is None and flag.startswith("-X"):
            option = flag[2:].split("=", 1)[0]
            if option not in _SAFE_X:
                reason = f"-X {option} is not one ppml can measure (allowed: {sorted(_SAFE_X)})"
        if reason is not None:
            raise UsageError(f"cannot measure `{program.name} {flag}`: {reason}")
    if parsed.mode == "stdin":
        raise UsageError(
            f"`{program.name}` without a script reads code from standard input, which cannot be "
            "measured: give a script, -m MODULE or -c CODE"
        )
    script = module_file = None
    if parsed.mode == "script":
        assert parsed.target is not None
        script = Path(parsed.target)
        if not script.is_file():
            raise InputNotFound("no such script", path=script)
    elif parsed.mode == "module":
        assert parsed.target is not None
        safe_path = any(f in ("-I", "-P") for f in parsed.flags)
        module_file = None if safe_path else _local_module(parsed.target)
    return ResolvedCommand(
        "python",
        str(program),
        real,
        _sha256(real),
        tuple(parsed.flags),
        parsed.mode,
        parsed.target,
        tuple(parsed.args),
        script,
        module_file,
    )


def local_package_inits(name: str) -> list[Path]:
    """The ``__init__.py`` files that ``python -m name`` runs from the working directory before
    the module itself (each package on the dotted path)."""
    inits = []
    directory = Path.cwd()
    for part in name.split("."):
        directory = directory / part
        if (directory / "__init__.py").is_file():
            inits.append(directory / "__init__.py")
    return inits


def _local_module(name: str) -> Path | None:
    """The file in the working directory that ``python -m name`` would run, if any."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", name):
        raise UsageError(f"-m {name!r} is not a module name")
    top = Path.cwd() / name.split(".")[0]
    if not (top.with_suffix(".py").is_file() or top.is_dir()):
        return None
    target = Path.cwd().joinpath(*name.split("."))
    for candidate in (target.with_suffix(".py"), target / "__main__.py"):
        if candidate.is_file():
            return candidate
    raise UsageError(
        f"-m {name}: the working directory holds {top.name} but not a module ppml can measure; "
        "run a script instead"
    )


def _resolve_shell(program: Path, real: str, args: list[str]) -> ResolvedCommand:
    flags: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-o", "+o"):
            if i + 1 >= len(args) or args[i + 1] not in _SHELL_SET_OPTIONS:
                raise UsageError(
                    f"{program.name} {arg} takes one of: {', '.join(sorted(_SHELL_SET_OPTIONS))}"
                )
            flags += [arg, args[i + 1]]
            i += 2
        elif arg == "-c":
            if i + 1 >= len(args):
                raise UsageError(f"{program.name} -c needs a command")
            return ResolvedCommand(
                "shell", str(program), real, _sha256(real), tuple(flags), "command", args[i + 1],
                tuple(args[i + 2 :]), None,
            )  # fmt: skip
        elif arg == "--":
            i += 1
            break
        elif _SHELL_FLAGS.fullmatch(arg):
            flags.append(arg)
            i += 1
        elif arg.startswith(("-", "+")):
            raise UsageError(
                f"cannot measure `{program.name} {arg}`: it may read code from other files or "
                "the terminal"
            )
        else:
            break
    if i >= len(args):
        raise UsageError(f"`{program.name}` without a script reads commands from standard input")
    script = Path(args[i])
    if not script.is_file():
        raise InputNotFound("no such script", path=script)
    return ResolvedCommand(
        "shell",
        str(program),
        real,
        _sha256(real),
        tuple(flags),
        "script",
        args[i],
        tuple(args[i + 1 :]),
        script,
    )
