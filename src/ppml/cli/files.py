"""The work of `ppml encrypt` and `ppml decrypt` (files and directories of files), and the
parser of their plain command lines: all of it without typer, which `file_cmds` uses to declare
the commands, so that a plain command line runs without importing it (see `parse_direct`)."""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ppml.cli._common import ByteProgress, OpeningKeys, echo_error, handle_errors
from ppml.errors import InputNotFound, UsageError

if TYPE_CHECKING:
    from ppml.crypto.envelope import DataKeyProvider

__all__ = [
    "FileFormat",
    "data_files",
    "decrypt_files",
    "encrypt_files",
    "existing_input",
    "parse_direct",
]


class FileFormat(enum.StrEnum):
    AUTO = "auto"
    BYTES = "bytes"
    CSV = "csv"
    JSON = "json"
    TEXT = "text"
    PARQUET = "parquet"


def existing_input(path: Path) -> Path:
    """`path`, when it exists (`InputNotFound` otherwise)."""
    if not path.exists():
        raise InputNotFound("no such file or directory", path=path)
    return path


def data_files(root: Path) -> list[Path]:
    """Regular files under `root`, hidden ones (name starting with '.') left out. Symbolic
    links are not followed (a link could lead out of the tree): they are named on stderr and
    left out."""
    files: list[Path] = []
    links: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        for d in list(dirnames):
            if d.startswith(".") or (here / d).is_symlink():
                if not d.startswith("."):
                    links.append(here / d)
                dirnames.remove(d)
        for f in filenames:
            path = here / f
            if f.startswith("."):
                continue
            if path.is_symlink():
                links.append(path)
            elif path.is_file():
                files.append(path)
    if links:
        shown = ", ".join(str(p) for p in sorted(links)[:3]) + (", ..." if len(links) > 3 else "")
        echo_error(f"ppml: left out {len(links)} symbolic link(s), not followed: {shown}")
    return sorted(files)


def _each_file(
    src: Path,
    output: Path,
    force: bool,
    verb: str,
    one: Callable[[Path, Path, bool, ByteProgress], None],
) -> None:
    """Apply `one` to a file, or to every file of a directory into an output directory that
    appears only when all of them succeeded."""
    from ppml._internal.fs import sweep_stale
    from ppml.data import output_directory
    from ppml.data.files import check_output_name

    check_output_name(output)
    if not src.is_dir():
        sweep_stale(output.parent if str(output.parent) else Path("."))
        with ByteProgress(src.stat().st_size, f"{verb}ing") as bar:
            one(src, output, force, bar)
        return
    files = data_files(src)
    total = sum(p.stat().st_size for p in files)
    with output_directory(output, overwrite=force) as tmp, ByteProgress(total, f"{verb}ing") as bar:
        for f in files:
            dst = tmp / f.relative_to(src)
            dst.parent.mkdir(parents=True, exist_ok=True)
            one(f, dst, True, bar)
    echo_error(f"{verb}ed {len(files)} files into {output}")


def _parse_column_keys(specs: Iterable[str]) -> dict[str, list[str]]:
    result: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, cols = spec.partition(":")
        columns = [c.strip() for c in cols.split(",") if c.strip()]
        if not sep or not name or not columns:
            raise UsageError(f"--column-key expects NAME:col1,col2 (got {spec!r})")
        result.setdefault(name, []).extend(columns)
    return result


def _is_parquet(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"PAR1"


def _encrypt_one(
    src: Path,
    dst: Path,
    keys: DataKeyProvider,
    key: str,
    fmt: FileFormat,
    column_keys: dict[str, list[str]],
    segment_size: int,
    force: bool,
    progress: ByteProgress,
) -> None:
    from ppml.crypto.stream import ContentType
    from ppml.data import encrypt_file

    parquet = fmt is FileFormat.PARQUET or (
        fmt is FileFormat.AUTO and src.is_file() and _is_parquet(src)
    )
    if parquet:
        from ppml.data.files import annotate_errors
        from ppml.data.parquet import encrypt_parquet_file

        if dst.exists() and not force:
            from ppml.errors import OutputExists

            raise OutputExists("output exists (use --force to replace it)", path=dst)
        with annotate_errors(src):
            encrypt_parquet_file(src, dst, keys, key_name=key, column_keys=column_keys or None)
        progress.advance(src.stat().st_size)
        return
    if column_keys:
        raise UsageError("--column-key applies to Parquet only", path=src)
    ctype = None if fmt is FileFormat.AUTO else ContentType.parse(fmt.value)
    encrypt_file(
        src,
        dst,
        keys,
        key,
        content_type=ctype,
        segment_size=segment_size,
        overwrite=force,
        progress=progress.callback,
    )


def encrypt_files(
    input_path: Path,
    output: Path,
    key: str,
    fmt: FileFormat = FileFormat.AUTO,
    column_key: list[str] | None = None,
    segment_size: int = 1 << 20,
    force: bool = False,
    workspace: Path | None = None,
    passphrase_file: Path | None = None,
) -> None:
    """`ppml encrypt`: a file, or every file of a directory, under a fresh data key of `key`."""
    with handle_errors():
        src = existing_input(input_path)
        column_keys = _parse_column_keys(column_key or [])
        with OpeningKeys(workspace, passphrase_file, check_keys=[key, *column_keys]) as keys:

            def one(src: Path, dst: Path, replace: bool, bar: ByteProgress) -> None:
                _encrypt_one(src, dst, keys, key, fmt, column_keys, segment_size, replace, bar)

            _each_file(src, output, force, "encrypt", one)


def _decrypt_one(
    src: Path, dst: Path, keys: DataKeyProvider, force: bool, progress: ByteProgress
) -> None:
    from ppml.data import decrypt_file, detect_file_kind

    # A pipe can be read once only: it can only be the streaming format.
    kind = detect_file_kind(src) if src.is_file() else "stream"
    if kind == "parquet":
        from ppml.data.files import annotate_errors
        from ppml.data.parquet import decrypt_parquet_file

        if dst.exists() and not force:
            from ppml.errors import OutputExists

            raise OutputExists("output exists (use --force to replace it)", path=dst)
        with annotate_errors(src):
            decrypt_parquet_file(src, dst, keys)
        progress.advance(src.stat().st_size)
        return
    decrypt_file(src, dst, keys, overwrite=force, progress=progress.callback)


def decrypt_files(
    input_path: Path,
    output: Path,
    force: bool = False,
    workspace: Path | None = None,
    passphrase_file: Path | None = None,
) -> None:
    """`ppml decrypt`: a file, or a directory of encrypted files into a directory."""
    with handle_errors():
        src = existing_input(input_path)
        with OpeningKeys(workspace, passphrase_file) as keys:

            def one(src: Path, dst: Path, replace: bool, bar: ByteProgress) -> None:
                _decrypt_one(src, dst, keys, replace, bar)

            _each_file(src, output, force, "decrypt", one)


# -- plain command lines, parsed without typer -------------------------------------------------
# `ppml encrypt` and `ppml decrypt` move big files and run in scripts' loops, so their fixed cost
# counts. A plain command line (one input; every option known, given once, with a value) is
# parsed here, which skips importing typer and building its parser (0.1-0.2 s, most of it the
# pydantic type adapters typer builds for each parameter). Anything else (help, a misspelled or
# repeated option, a missing or odd value) goes to typer, which parses and reports it as it
# always does; the two agree wherever this one answers (tests/unit/test_cli_direct_parse.py
# runs both on the same command lines). `encrypt_files` and `decrypt_files` take exactly the
# parameters of the typer commands in `file_cmds`, with the same defaults.


def _plain_int(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or (value.startswith("0") and value != "0"):
        raise ValueError(value)
    return int(value)


_Option = tuple[str, Callable[[str], Any] | None]  # the parameter, its conversion (None: a flag)
_COMMON_OPTIONS: dict[str, _Option] = {
    "-o": ("output", Path),
    "--output": ("output", Path),
    "--force": ("force", None),
    "-w": ("workspace", Path),
    "--workspace": ("workspace", Path),
    "--passphrase-file": ("passphrase_file", Path),
}
_DIRECT: dict[str, tuple[Callable[..., None], dict[str, _Option], tuple[str, ...]]] = {
    "encrypt": (
        encrypt_files,
        {
            **_COMMON_OPTIONS,
            "-k": ("key", str),
            "--key": ("key", str),
            "--format": ("fmt", FileFormat),
            "--column-key": ("column_key", str),
            "--segment-size": ("segment_size", _plain_int),
        },
        ("output", "key"),
    ),
    "decrypt": (decrypt_files, _COMMON_OPTIONS, ("output",)),
}
_REPEATABLE = frozenset({"column_key"})


def parse_direct(argv: Sequence[str]) -> tuple[Callable[..., None], dict[str, Any]] | None:
    """The command function and its arguments for a plain `encrypt` or `decrypt` command line
    (`argv` without the program name), or None when typer must parse it."""
    if not argv or argv[0] not in _DIRECT:
        return None
    command, options, required = _DIRECT[argv[0]]
    kwargs: dict[str, Any] = {}
    inputs: list[str] = []
    tokens = iter(argv[1:])
    for token in tokens:
        if not token.startswith("-"):
            inputs.append(token)
            continue
        name, eq, value = token.partition("=") if token.startswith("--") else (token, "", "")
        if name not in options:
            return None  # help, "--", "-", an unknown option, a short option with its value
        dest, convert = options[name]
        if convert is None:
            if eq or dest in kwargs:
                return None
            kwargs[dest] = True
            continue
        if not eq:
            value = next(tokens, "")
        if not value or value.startswith("-") or (dest in kwargs and dest not in _REPEATABLE):
            return None
        try:
            converted = convert(value)
        except ValueError:
            return None
        if dest in _REPEATABLE:
            kwargs.setdefault(dest, []).append(converted)
        else:
            kwargs[dest] = converted
    if len(inputs) != 1 or not inputs[0] or any(r not in kwargs for r in required):
        return None
    kwargs["input_path"] = Path(inputs[0])
    # The defaults of the parameters not given (from the function itself: `inspect` costs more
    # to import than the whole parse).
    code, defaults = command.__code__, command.__defaults__ or ()
    names = code.co_varnames[code.co_argcount - len(defaults) : code.co_argcount]
    for name, default in zip(names, defaults, strict=True):
        kwargs.setdefault(name, default)
    return command, kwargs
