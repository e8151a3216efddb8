"""The import guard of an attested workload: Python loads only measured code, or stops.

The launcher copies this file as ``sitecustomize.py`` into the run's boot directory (mounted
read-only at ``/tmp/.ppml`` inside the sandbox, on ``PYTHONPATH``), beside ``workload.json``,
the part of the manifest the guard needs. Every Python process of the workload, the workload
itself and every Python program it starts with the workload's variables (not one started with
``-I`` or ``-E``), imports it at start-up, before any of its own code, and the guard then:

- stops the process unless its interpreter is the measured one, and unless its main script (if
  any) is a measured file, a file of the measured environment or a file the run wrote in its own
  private ``/tmp``; code from standard input is refused. A measured script's bytes are read once
  and compiled; when the interpreter compiles the file itself to run it, the two code objects
  must be equal (a file renamed over the script in between is refused);
- stops the process unless Python reads bytecode from ppml's own cache only
  (``PYTHONPYCACHEPREFIX``, which no workload can write: see `ppml.tee.environment.bytecode_dir`),
  never from a ``__pycache__`` directory that a workload may once have written; a module of the
  environment that has no bytecode there yet is compiled from its source and named in a hint
  file of the run's /tmp, from which the launcher fills the cache after the run;
- puts a finder first on ``sys.meta_path`` that lets the usual finders choose a module's file,
  then allows it only if it is a measured file (its bytes checked against the manifest's SHA-256
  and compiled from those bytes, never from a bytecode cache), a file of the measured
  environment (the interpreter's standard library and site-packages), or a file of the run's
  private ``/tmp`` or ``/dev/shm``. Anything else, such as a package directory or an extension
  module planted beside a measured module, a forged ``__pycache__`` file, or a module named like
  a standard one in a data directory, is refused with `ImportError`, whether imported by a
  statement, `importlib.import_module` or `__import__`;
- adds an audit hook (which cannot be removed) that refuses to compile Python source attributed
  to a ``.py`` file outside those places (``runpy.run_path``, ``exec(compile(..., path))``), or
  bytes attributed to a measured file that are not its measured bytes, and to load a shared
  library with ctypes from a data directory.

``exec`` of a string is not restricted: libraries generate code that way (dataclasses, typing).

The module uses the standard library only. `parse_python_argv` is the one grammar of CPython's
command line that ppml uses, here and in the launcher.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import linecache
import os
import sys
from typing import Any

__all__ = ["ParsedArgv", "PythonArgvError", "parse_python_argv"]

WORKLOAD_FILE = "workload.json"
REFUSED_EXIT = 126

# CPython's options (3.11): flags, options with a value, and the ones that end the options.
_NO_ARG = frozenset("bBdEhiIOPqsSuvVxR?")
_WITH_ARG = frozenset("WX")
_ENDS = frozenset("cm")


class PythonArgvError(ValueError):
    """A Python command line that the grammar does not accept."""


class ParsedArgv:
    """A Python command line split as CPython does: options, then the mode and its target."""

    __slots__ = ("args", "flags", "mode", "target")

    def __init__(self, flags: list[str], mode: str, target: str | None, args: list[str]) -> None:
        self.flags = flags  # each option as one normalized item: "-u", "-W" "error" -> "-Werror"
        self.mode = mode  # "script", "module", "command" or "stdin"
        self.target = target  # the script path, the module name, the command text, or None
        self.args = args  # sys.argv[1:] of the program

    def __repr__(self) -> str:
        return f"ParsedArgv({self.flags!r}, {self.mode!r}, {self.target!r}, {self.args!r})"


def parse_python_argv(argv: list[str]) -> ParsedArgv:
    """Split the arguments after the interpreter's name (``sys.orig_argv[1:]``)."""
    flags: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if name == "--check-hash-based-pycs":
                if not eq:
                    if i + 1 >= len(argv):
                        raise PythonArgvError(f"{name} needs a value")
                    value = argv[i + 1]
                    i += 1
                flags.append(f"{name}={value}")
                i += 1
                continue
            flags.append(arg)
            i += 1
            continue
        if not arg.startswith("-") or arg == "-":
            break
        j = 1
        while j < len(arg):
            ch = arg[j]
            if ch in _NO_ARG:
                flags.append("-" + ch)
                j += 1
                continue
            if ch in _WITH_ARG or ch in _ENDS:
                value = arg[j + 1 :]
                if not value:
                    if i + 1 >= len(argv):
                        raise PythonArgvError(f"-{ch} needs a value")
                    i += 1
                    value = argv[i]
                if ch in _ENDS:
                    mode = "command" if ch == "c" else "module"
                    return ParsedArgv(flags, mode, value, argv[i + 1 :])
                flags.append(f"-{ch}{value}")
                break
            raise PythonArgvError(f"unknown Python option -{ch}")
        i += 1
    if i >= len(argv) or argv[i] == "-":
        return ParsedArgv(flags, "stdin", None, argv[i + 1 :])
    return ParsedArgv(flags, "script", argv[i], argv[i + 1 :])


# -- the guard itself ----------------------------------------------------------------------------


def _refuse(message: str) -> None:
    sys.stderr.write(f"ppml: refused: {message}\n")
    sys.stderr.flush()
    os._exit(REFUSED_EXIT)


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r + "/") for r in roots)


class _Rules:
    """Where code may come from: the manifest's files and the environment's roots."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.trusted: dict[str, str] = dict(doc["trusted"])
        self.roots = tuple(str(r).rstrip("/") for r in doc["roots"])
        self.scratch = tuple(str(r).rstrip("/") for r in doc["scratch"])
        self.host = tuple(str(r).rstrip("/") for r in doc["host"])
        self.writable = tuple(str(r).rstrip("/") for r in doc["writable"])
        self.bytecode = str(doc["bytecode"])
        self.hints = str(doc["hints"]) if doc.get("hints") else None
        self._noted: set[str] = set()

    def note_uncached(self, spec: Any) -> None:
        """Tell the launcher (a line in the run's own /tmp) that a module of the environment
        had no bytecode in ppml's cache, so that it compiles the source there after the run.
        Only a hint: the launcher compiles the environment's own file, whatever is written."""
        origin, cached = spec.origin, spec.cached
        if self.hints is None or not cached or origin in self._noted:
            return
        if not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            return
        if not _under(os.path.realpath(origin), self.roots) or os.path.exists(cached):
            return
        self._noted.add(origin)
        try:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(self.hints, flags, 0o600)
            try:
                os.write(fd, f"{sys.flags.optimize} {origin}\n".encode())
            finally:
                os.close(fd)
        except OSError:
            pass  # a cache that is not filled costs time, never correctness

    def allowed(self, path: str) -> bool:
        """A measured file, a file of the environment, or one the run wrote in its own /tmp
        or /dev/shm (not a host directory mounted there)."""
        if path in self.trusted or _under(path, self.roots):
            return True
        return _under(path, self.scratch) and not _under(path, self.host)

    def check_file(self, path: str) -> bytes | None:
        """The bytes of a measured file, checked; None for a file of the environment."""
        expected = self.trusted.get(path)
        if expected is None:
            return None
        with open(path, "rb") as fh:
            data = fh.read()
        if hashlib.sha256(data).hexdigest() != expected:
            raise ImportError(f"ppml: refused {path}: it is not the file that was measured")
        return data


class _MeasuredLoader(importlib.machinery.SourceFileLoader):
    """A measured module: compiled from the bytes whose digest the manifest names."""

    def __init__(self, fullname: str, path: str, rules: _Rules) -> None:
        super().__init__(fullname, path)
        self._rules = rules

    def get_code(self, fullname: str) -> Any:
        data = self._rules.check_file(os.path.realpath(self.path))
        assert data is not None
        text = data.decode("utf-8", "replace")
        linecache.cache[self.path] = (len(data), None, text.splitlines(True), self.path)
        return compile(data, self.path, "exec", dont_inherit=True)


_FILE_LOADERS = (
    importlib.machinery.SourceFileLoader,
    importlib.machinery.SourcelessFileLoader,
    importlib.machinery.ExtensionFileLoader,
)


def _resolved(fullname: str, spec: Any, real: str) -> Any:
    """The spec of the very file that was checked: a loader that reads `real` (the path with
    its symbolic links resolved), and a package's submodules looked up in its real directory.
    Otherwise the loader would open the path as found, through links that a process able to
    write a directory on the way (a data directory) could point elsewhere after the check."""
    if real == spec.origin or not isinstance(spec.loader, _FILE_LOADERS):
        return spec
    package = spec.submodule_search_locations is not None
    return importlib.util.spec_from_file_location(
        fullname,
        real,
        loader=type(spec.loader)(fullname, real),
        submodule_search_locations=[os.path.dirname(real)] if package else None,
    )


class _Finder(importlib.abc.MetaPathFinder):
    """First on `sys.meta_path`: the usual finders choose, this one allows or refuses."""

    def __init__(self, rules: _Rules) -> None:
        self._rules = rules

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        spec = None
        for finder in sys.meta_path:
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        if spec is None or not spec.has_location or spec.origin is None:
            return spec  # built-in, frozen, namespace package, or not found
        real = os.path.realpath(spec.origin)
        if not self._rules.allowed(real):
            raise ImportError(
                f"ppml: refused to import {fullname} from {spec.origin}: not a measured file "
                "(measure it with --trusted, or remove it)",
                name=fullname,
                path=spec.origin,
            )
        spec = _resolved(fullname, spec, real)
        if real in self._rules.trusted:
            if isinstance(spec.loader, importlib.machinery.SourceFileLoader):
                spec.loader = _MeasuredLoader(fullname, spec.origin, self._rules)
                spec.cached = None
            else:
                self._rules.check_file(real)  # an extension module: read-only, checked once
        else:
            self._rules.note_uncached(spec)
        return spec


class _Main:
    """The main script's code, compiled from the bytes that were checked. The interpreter
    compiles the file again when it runs it (``cpython.run_file``, then ``exec`` with its code
    object, with nothing executed in between): the two code objects must be equal, so that a
    file swapped in after the check (by a rename, through a symbolic link, as another kind of
    file) is refused, not run."""

    __slots__ = ("armed", "code", "name")

    def __init__(self, name: str, code: Any) -> None:
        self.name = name
        self.code = code
        self.armed = False


def _audit_hook(rules: _Rules, main: _Main | None) -> Any:
    pending = [main] if main is not None else []

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "cpython.run_file" and pending:
            pending[0].armed = True
        elif event == "exec" and pending and pending[0].armed:
            main_script = pending.pop()
            if not args or args[0] != main_script.code:
                _refuse(f"{main_script.name} changed after it was measured")
        elif event == "compile" and len(args) == 2:
            source, filename = args
            if isinstance(filename, bytes):
                filename = os.fsdecode(filename)
            if isinstance(filename, str) and filename.endswith((".py", ".pyw")):
                real = os.path.realpath(filename)
                if os.path.exists(real) and not rules.allowed(real):
                    if pending and pending[0].armed:  # the main script, now another file
                        _refuse(f"{pending[0].name} changed after it was measured")
                    raise RuntimeError(f"ppml: refused to compile {filename}: not a measured file")
                digest = rules.trusted.get(real)
                if (
                    digest is not None
                    and isinstance(source, bytes)
                    and hashlib.sha256(source).hexdigest() != digest
                ):
                    raise RuntimeError(
                        f"ppml: refused to compile {filename}: it is not the file that was measured"
                    )
        elif event == "ctypes.dlopen" and args and isinstance(args[0], str) and "/" in args[0]:
            real = os.path.realpath(args[0])
            if _under(real, rules.writable) and real not in rules.trusted:
                raise RuntimeError(f"ppml: refused to load {args[0]}: not a measured file")

    return hook


def _check_main(rules: _Rules) -> _Main | None:
    """Refuse a main program that is not measured; for a measured script, the code its checked
    bytes compile to (the bytes are read once: the file may change after this)."""
    try:
        parsed = parse_python_argv(list(sys.orig_argv[1:]))
    except PythonArgvError as exc:
        _refuse(str(exc))
        return None
    if parsed.mode == "stdin":
        _refuse("Python code from standard input cannot be measured")
    if parsed.mode != "script" or parsed.target is None:
        return None
    real = os.path.realpath(parsed.target)
    if not rules.allowed(real):
        _refuse(f"{parsed.target} is not a measured file (measure it with --trusted)")
    try:
        data = rules.check_file(real)
    except (ImportError, OSError) as exc:
        _refuse(str(exc))
        return None
    if data is None:
        return None  # a file of the environment or of the run's own /tmp
    try:
        code = compile(data, os.path.abspath(parsed.target), "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        _refuse(f"{parsed.target} does not compile: {exc}")
        return None
    return _Main(parsed.target, code)


def _chain_original(boot: str, rules: _Rules) -> None:
    """Run the environment's own sitecustomize, if it has one (Debian's, for example)."""
    spec = importlib.machinery.PathFinder.find_spec(
        "sitecustomize", [p for p in sys.path if p != boot]
    )
    if spec is None or spec.loader is None:
        return
    if spec.origin is None or not rules.allowed(os.path.realpath(spec.origin)):
        _refuse(f"{spec.origin}: a sitecustomize module that is not a measured file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


def install(boot: str) -> None:
    """Install the guard from ``<boot>/workload.json``; stop the process when it does not hold."""
    try:
        with open(os.path.join(boot, WORKLOAD_FILE), "rb") as fh:
            doc = json.load(fh)
        rules = _Rules(doc)
        interpreter = str(doc["interpreter"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _refuse(f"the workload manifest cannot be read ({exc})")
        return
    if os.path.realpath(sys.executable) != interpreter:
        _refuse(f"{sys.executable} is not the measured Python interpreter ({interpreter})")
    if sys.pycache_prefix != rules.bytecode:
        _refuse(
            "Python may read bytecode from ppml's cache only "
            "(no -X pycache_prefix, no PYTHONPYCACHEPREFIX of the workload's own)"
        )
    main = _check_main(rules)
    for module in list(sys.modules.values()):  # imported before the guard: site, .pth files
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.has_location and spec.origin:
            rules.note_uncached(spec)
    while boot in sys.path:
        sys.path.remove(boot)
    sys.dont_write_bytecode = True
    sys.meta_path.insert(0, _Finder(rules))
    sys.addaudithook(_audit_hook(rules, main))
    _chain_original(boot, rules)


if __name__ == "sitecustomize":
    install(os.path.dirname(os.path.abspath(__file__)))
