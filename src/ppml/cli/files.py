"""The work of `ppml encrypt` and `ppml decrypt` (files and directories of files), and the
parser of their plain command lines: all of it without typer, which `file_cmds` uses to declare
the commands, so that a plain command line runs without importing it (see `parse_direct`)."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ppml.cli._common import ByteProgress, OpeningKeys, echo_error
from ppml.errors import InputNotFound, UsageError

__all__ = ["FileFormat", "decrypt_files", "echo_links", "encrypt_files", "parse_direct"]


class FileFormat(enum.StrEnum):
    """The choices of `ppml encrypt --format` (`ppml.data.PATH_FORMATS`)."""

    AUTO = "auto"
    BYTES = "bytes"
    CSV = "csv"
    JSON = "json"
    TEXT = "text"
    PARQUET = "parquet"


def echo_links(links: Sequence[Path]) -> None:
    """Name the symbolic links a directory command left out (never followed)."""
    shown = ", ".join(str(p) for p in links[:3]) + (", ..." if len(links) > 3 else "")
    echo_error(f"ppml: left out {len(links)} symbolic link(s), not followed: {shown}")


def _parse_column_keys(specs: Iterable[str]) -> dict[str, list[str]]:
    result: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, cols = spec.partition(":")
        columns = [c.strip() for c in cols.split(",") if c.strip()]
        if not sep or not name or not columns:
            raise UsageError(f"--column-key expects NAME:col1,col2 (got {spec!r})")
        result.setdefault(name, []).extend(columns)
    return result


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
    _require_input(input_path)
    column_keys = _parse_column_keys(column_key or [])
    _with_keys(
        "encrypt",
        (input_path, output),
        workspace,
        passphrase_file,
        check_keys=[key, *column_keys],
        key_name=key,
        format=fmt.value,
        column_keys=column_keys,
        segment_size=segment_size,
        overwrite=force,
    )


def decrypt_files(
    input_path: Path,
    output: Path,
    force: bool = False,
    workspace: Path | None = None,
    passphrase_file: Path | None = None,
) -> None:
    """`ppml decrypt`: a file, or a directory of encrypted files into a directory."""
    _require_input(input_path)
    _with_keys("decrypt", (input_path, output), workspace, passphrase_file, overwrite=force)


def _require_input(path: Path) -> None:
    if not path.exists():  # before the passphrase is asked for
        raise InputNotFound("no such file or directory", path=path)


def _with_keys(
    verb: str,
    paths: tuple[Path, Path],
    workspace: Path | None,
    passphrase_file: Path | None,
    *,
    check_keys: Sequence[str] = (),
    **options: Any,
) -> None:
    """Run `ppml.data`'s `encrypt_path` or `decrypt_path` on (input, output) with the
    workspace's keys, which open in the background meanwhile (see `OpeningKeys`)."""
    with (
        OpeningKeys(workspace, passphrase_file, check_keys=check_keys) as keys,
        ByteProgress(f"{verb}ing") as bar,
    ):
        # Imported while the workspace opens.
        from ppml.data import decrypt_path, encrypt_path

        run = encrypt_path if verb == "encrypt" else decrypt_path
        done = run(*paths, keys, **options, progress=bar.start, on_links=echo_links)
    if done.directory:
        echo_error(f"{verb}ed {len(done.files)} files into {paths[1]}")


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
