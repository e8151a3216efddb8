"""`ppml encrypt` and `ppml decrypt` run plain command lines without typer
(`ppml.cli.files.parse_direct`); wherever that parser answers, it must give the command exactly
the arguments typer gives the commands declared in `file_cmds`, and it must leave everything
else to typer."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from ppml.cli import file_cmds, files
from ppml.cli.files import FileFormat, parse_direct

Parse = Callable[[list[str]], dict[str, Any] | None]


@pytest.fixture(scope="module")
def typer_parse() -> Parse:
    """Typer's parse of a command line: an app whose `encrypt` and `decrypt` have the real
    commands' signatures and only record the arguments they are called with."""
    seen: dict[str, dict[str, Any]] = {}
    root = typer.Typer()

    @root.callback()
    def _root() -> None:
        """Test root."""

    for name, command in (("encrypt", file_cmds.encrypt), ("decrypt", file_cmds.decrypt)):

        def record(*, _name: str = name, **kwargs: Any) -> None:
            seen[_name] = kwargs

        root.command(name)(functools.wraps(command)(record))
    runner = CliRunner()

    def parse(argv: list[str]) -> dict[str, Any] | None:
        seen.clear()
        result = runner.invoke(root, argv)
        return seen.get(argv[0]) if result.exit_code == 0 else None

    return parse


def _direct(argv: list[str]) -> dict[str, Any] | None:
    parsed = parse_direct(argv)
    if parsed is None:
        return None
    command, kwargs = parsed
    assert command is {"encrypt": files.encrypt_files, "decrypt": files.decrypt_files}[argv[0]]
    return kwargs


PLAIN = [
    ["encrypt", "people.csv", "-o", "people.csv.ppml", "--key", "sales"],
    ["encrypt", "people.csv", "--output", "out", "-k", "sales", "--force"],
    ["encrypt", "--key=sales", "--output=out", "people.csv"],
    ["encrypt", "raw dir/", "-o", "enc dir", "-k", "k", "--format", "csv", "--segment-size", "16"],
    ["encrypt", "e.parquet", "-o", "x", "-k", "k", "--column-key", "pii:a,b", "--column-key=o:c"],
    ["encrypt", "a", "-o", "b", "-k", "k", "-w", "ws", "--passphrase-file", "p", "--format=bytes"],
    ["encrypt", "a", "-o", "b", "-k", "k", "--segment-size=0", "--workspace=/srv/ppml"],
    ["decrypt", "people.csv.ppml", "-o", "people.csv"],
    ["decrypt", "a.ppml", "--output", "b", "--force", "--workspace", "w"],
    ["decrypt", "--passphrase-file=p", "-o", "b", "x.ppml"],
]

LEFT_TO_TYPER = [
    [],
    ["encrypt"],
    ["inspect", "a.ppml"],
    ["encrypt", "--help"],
    ["decrypt", "a", "-o", "b", "-h"],
    ["encrypt", "a", "-o", "b"],  # no key
    ["decrypt", "a"],  # no output
    ["decrypt", "a", "b", "-o", "c"],
    ["decrypt", "-o", "c"],
    ["decrypt", "a", "-o"],
    ["decrypt", "a", "-o", "b", "-o", "c"],
    ["decrypt", "a", "-o", "b", "--force", "--force"],
    ["decrypt", "a", "-o", "b", "--force=yes"],
    ["decrypt", "a", "-o", "b", "--no-force"],
    ["decrypt", "a", "-ob"],
    ["decrypt", "a", "--output="],
    ["decrypt", "a", "-o", "-"],
    ["decrypt", "a", "-o", "--force"],
    ["decrypt", "--", "a", "-o", "b"],
    ["decrypt", "-", "-o", "b"],
    ["decrypt", "", "-o", "b"],
    ["decrypt", "a", "-o", "b", "--frobnicate"],
    ["decrypt", "a", "-o", "b", "--key", "k"],
    ["encrypt", "a", "-o", "b", "-k", "k", "--format", "CSV"],
    ["encrypt", "a", "-o", "b", "-k", "k", "--format", "yaml"],
    ["encrypt", "a", "-o", "b", "-k", "k", "--segment-size", "016"],
    ["encrypt", "a", "-o", "b", "-k", "k", "--segment-size", "+16"],
    ["encrypt", "a", "-o", "b", "-k", "k", "--segment-size", "1e6"],
    ["encrypt", "a", "-o", "b", "-k", "k", "--segment-size", "\u0661\u0666"],
]


@pytest.mark.parametrize("argv", PLAIN, ids=" ".join)
def test_plain_command_lines_are_parsed_as_typer_parses_them(
    argv: list[str], typer_parse: Parse
) -> None:
    direct = _direct(argv)
    assert direct is not None
    assert direct == typer_parse(argv)


def test_the_values_are_converted(typer_parse: Parse) -> None:
    argv = PLAIN[3]
    direct = _direct(argv)
    assert direct is not None
    assert direct["input_path"] == Path("raw dir/") and direct["output"] == Path("enc dir")
    assert direct["fmt"] is FileFormat.CSV and direct["segment_size"] == 16
    assert direct["force"] is False and direct["workspace"] is None
    assert _direct(PLAIN[4]) == typer_parse(PLAIN[4])
    assert (_direct(PLAIN[4]) or {})["column_key"] == ["pii:a,b", "o:c"]


@pytest.mark.parametrize("argv", LEFT_TO_TYPER, ids=lambda a: " ".join(a) or "(empty)")
def test_anything_else_is_left_to_typer(argv: list[str]) -> None:
    assert parse_direct(argv) is None


_ODD_VALUES = ["-", "", "--force", "-o", "016", "CSV", "+1"]
_VALUES: dict[str, list[str]] = {
    "fmt": ["csv", "bytes", "parquet", "auto"],
    "segment_size": ["0", "16", "1048576"],
    "column_key": ["pii:a", "o:b,c"],
}
_OPTIONS: dict[str, tuple[list[str], bool]] = {  # spellings, whether it takes a value
    "output": (["-o", "--output"], True),
    "force": (["--force"], False),
    "workspace": (["-w", "--workspace"], True),
    "passphrase_file": (["--passphrase-file"], True),
}
_ENCRYPT_OPTIONS: dict[str, tuple[list[str], bool]] = {
    "key": (["-k", "--key"], True),
    "fmt": (["--format"], True),
    "segment_size": (["--segment-size"], True),
    "column_key": (["--column-key"], True),
}


@st.composite
def _command_lines(draw: st.DrawFn) -> list[str]:
    """Mostly well-formed command lines, in any order, with odd values and repeats now and
    then: the direct parser answers about half of them."""
    command = draw(st.sampled_from(["encrypt", "decrypt"]))
    options = _OPTIONS | (_ENCRYPT_OPTIONS if command == "encrypt" else {})
    parts = [[draw(st.sampled_from(["in.csv"] * 6 + ["a dir/", "x", "", "-"]))]]
    for dest, (spellings, takes_value) in options.items():
        usual = dest in ("output", "key", "column_key")
        counts = [1] * 12 + [0, 2] if usual else [0] * 8 + [1, 1, 2]
        for _ in range(draw(st.sampled_from(counts))):
            name = draw(st.sampled_from(spellings))
            if not takes_value:
                parts.append([name])
                continue
            good = _VALUES.get(dest, ["x", "a b", "ü.csv", "0"])
            value = draw(st.sampled_from(good * 12 + _ODD_VALUES))
            parts.append([f"{name}={value}"] if draw(st.booleans()) else [name, value])
    if draw(st.integers(0, 19)) == 0:
        parts.append([draw(st.sampled_from(["--", "-x", "--help", "extra", "-ob"]))])
    return [command, *(token for part in draw(st.permutations(parts)) for token in part)]


@settings(max_examples=400, deadline=None)
@given(argv=_command_lines())
def test_wherever_the_direct_parser_answers_typer_agrees(
    argv: list[str], typer_parse: Parse
) -> None:
    direct = _direct(argv)
    if direct is not None:
        assert direct == typer_parse(argv)
