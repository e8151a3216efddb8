"""`ppml sql`: one SELECT over encrypted tables, with DuckDB in this process, in memory only."""

from __future__ import annotations

import enum
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ppml.cli._common import PassphraseFileOption, WorkspaceOption, key_provider
from ppml.errors import InputNotFound, OutputExists, UsageError

if TYPE_CHECKING:
    import pyarrow as pa

    from ppml.engines.sql import SqlOptions


class OutputFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"
    CSV = "csv"


def register(app: typer.Typer) -> None:
    app.command("sql")(sql)


def parse_table_specs(specs: Iterable[str]) -> dict[str, Path]:
    """``NAME=PATH`` options into {name: path}; names are checked, paths must exist."""
    from ppml.engines.sql import validate_table_name

    tables: dict[str, Path] = {}
    lowered: set[str] = set()
    for spec in specs:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise UsageError(f"--table expects NAME=PATH (got {spec!r})")
        validate_table_name(name)
        if name.lower() in lowered:
            raise UsageError(f"table {name!r} given twice")
        lowered.add(name.lower())
        file = Path(path)
        if not file.exists():
            raise InputNotFound("no such file or directory", path=file)
        tables[name] = file
    if not tables:
        raise UsageError("give at least one table: --table NAME=PATH")
    return tables


TableOption = Annotated[
    list[str] | None,
    typer.Option(
        "--table",
        "-t",
        metavar="NAME=PATH",
        help="A table for the query: an encrypted CSV, JSON, text or Parquet file, or a "
        "directory of such part files (repeatable). Plaintext files are refused.",
    ),
]

SqlOutputOption = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        metavar="OUT",
        help="Write the result encrypted to OUT (.csv, .json or .parquet) instead of printing it.",
    ),
]

MemoryLimitOption = Annotated[
    str | None,
    typer.Option(
        "--memory-limit",
        help="DuckDB's memory limit, e.g. 4GB or 50% (default: 80% of RAM). Nothing "
        "spills to disk: a query over the limit fails.",
    ),
]

SqlTeeOption = Annotated[
    str | None,
    typer.Option(
        "--tee",
        help="Run the query attested inside this TEE backend (sim): keys are released "
        "only if their policies name the measurement of this exact command (printed by "
        "the same command with --measure).",
    ),
]

SqlMeasureOption = Annotated[
    bool,
    typer.Option(
        "--measure",
        help="Print the measurement of the attested query (for `ppml policy allow`) and exit.",
    ),
]

SqlDataOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--data",
        metavar="DIR",
        help="With --tee: a directory the attested query may write to (default: the "
        "current directory).",
    ),
]


def sql(
    query: Annotated[str, typer.Argument(metavar="QUERY", help="One SELECT statement.")],
    table: TableOption = None,
    output: SqlOutputOption = None,
    key: Annotated[
        str | None, typer.Option("--key", "-k", help="Named key for the encrypted output.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing OUT.")] = False,
    fmt: Annotated[
        OutputFormat | None,
        typer.Option("--format", help="How to print the result: text (default), json or csv."),
    ] = None,
    max_rows: Annotated[
        int, typer.Option("--max-rows", min=1, help="Rows shown by --format text.")
    ] = 1000,
    memory_limit: MemoryLimitOption = None,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="DuckDB threads (default: cores).")
    ] = None,
    tee: SqlTeeOption = None,
    measure_only: SqlMeasureOption = False,
    data: SqlDataOption = None,
    workspace: WorkspaceOption = None,
    passphrase_file: PassphraseFileOption = None,
) -> None:
    """Run one read-only SQL query (DuckDB) over encrypted tables.

    The tables are decrypted into memory only; the query cannot read or write files, load
    extensions or change settings. Prints the result (text, json lines or csv), or with -o OUT
    --key NAME writes it encrypted and prints a one-line summary on stderr.
    """
    from ppml.engines.sql import SqlOptions, check_query, run_sql

    tables = parse_table_specs(table or [])
    if output is not None:
        _check_output(output, key, fmt, force)
    elif key is not None:
        raise UsageError("--key applies to an encrypted output: add -o OUT")
    options = SqlOptions(memory_limit=memory_limit, threads=threads)
    check_query(query)  # a bad query fails before the passphrase is asked for
    if tee is not None or measure_only:
        inner = _inner_command(query, table or [], output, key, force, fmt, max_rows, options)
        _run_attested(inner, tee, measure_only, data, workspace, passphrase_file)
        return
    with key_provider(workspace, passphrase_file) as keys:
        if output is not None and key is not None:
            describe = getattr(keys, "describe", None)
            if callable(describe):
                describe(key)  # an unknown key fails before any decryption
        result = run_sql(query, tables, keys, options=options)
        if output is not None and key is not None:
            _write(result, output, keys, key, force)
            return
    _print(result, fmt or OutputFormat.TEXT, max_rows)


def _run_attested(
    inner: list[str],
    tee: str | None,
    measure_only: bool,
    data: list[Path] | None,
    workspace: Path | None,
    passphrase_file: Path | None,
) -> None:
    """`ppml sql --tee sim` (or --measure): the same query as an attested workload."""
    from ppml.cli._attested import Launch, Workload, launch

    if tee not in (None, "sim"):
        raise UsageError(f"unknown or unsupported TEE backend {tee!r} (available: sim)")
    # -I: ppml comes from the measured environment, never from the working directory.
    workload = Workload((sys.executable, "-I", "-m", "ppml", *inner))
    if measure_only:
        typer.echo(workload.manifest().measurement())
        return
    how = Launch("sim", data=tuple(data or ()))
    raise typer.Exit(launch(workload, how, workspace, passphrase_file))


def _check_output(output: Path, key: str | None, fmt: OutputFormat | None, force: bool) -> None:
    from ppml.data import TableFormat
    from ppml.data.files import check_output_name

    check_output_name(output)
    if key is None:
        raise UsageError("-o OUT needs --key NAME (the key to encrypt the result under)")
    if fmt is not None:
        raise UsageError("--format is for printed results; -o takes the format from OUT's suffix")
    if TableFormat.for_path(output) is TableFormat.TEXT:
        raise UsageError("write the result as .csv, .json or .parquet", path=output)
    if output.is_dir():
        raise UsageError("is a directory, expected a file name", path=output)
    if output.exists() and not force:
        raise OutputExists("output exists (use --force to replace it)", path=output)
    if not output.parent.is_dir():
        raise InputNotFound("the output's directory does not exist", path=output.parent)


def _write(result: pa.Table, output: Path, keys: Any, key: str, force: bool) -> None:
    from ppml.data import write_table

    write_table(result, output, keys, key_name=key, overwrite=force)
    typer.echo(
        f"wrote {result.num_rows} rows x {result.num_columns} columns to {output} "
        f"(encrypted under {key})",
        err=True,
    )


# --------------------------------------------------------------------------- printing


def _print(result: pa.Table, fmt: OutputFormat, max_rows: int) -> None:
    """Print the result; a value that cannot be printed (a date past Python's range, ...)
    fails with a message that does not quote it (Python's would: "days=N")."""
    try:
        _print_as(result, fmt, max_rows)
    except (ArithmeticError, ValueError, TypeError, pa_error()) as exc:
        raise UsageError(
            f"the result could not be printed ({type(exc).__name__}); the message is withheld "
            "because it may quote values: use -o OUT --key NAME to write it"
        ) from None


def pa_error() -> type[Exception]:
    import pyarrow as pa

    error: type[Exception] = pa.ArrowException
    return error


def _print_as(result: pa.Table, fmt: OutputFormat, max_rows: int) -> None:
    if fmt is OutputFormat.CSV:
        import pyarrow.csv as pacsv

        sys.stdout.flush()
        pacsv.write_csv(_csv_ready(result), sys.stdout.buffer)
        sys.stdout.buffer.flush()
    elif fmt is OutputFormat.JSON:
        out = sys.stdout
        for batch in result.to_batches(max_chunksize=8192):
            for row in batch.to_pylist():
                out.write(json.dumps(row, default=_json_value, ensure_ascii=False) + "\n")
        out.flush()
    else:
        _print_text(result, max_rows)


def _csv_ready(result: pa.Table) -> pa.Table:
    """pyarrow's CSV writer takes flat columns only: nested values are written as JSON text."""
    import pyarrow as pa

    columns: list[Any] = []
    for column in result.columns:
        if pa.types.is_nested(column.type):
            texts = [
                None if v is None else json.dumps(v, default=_json_value, ensure_ascii=False)
                for v in column.to_pylist()
            ]
            columns.append(pa.array(texts, type=pa.string()))
        else:
            columns.append(column)
    return pa.table(columns, names=result.column_names)


def _json_value(value: object) -> object:
    from ppml.data.tables import json_default

    try:
        return json_default(value)
    except TypeError:
        return str(value)


def _text_value(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, dict | list):
        return json.dumps(value, default=_json_value, ensure_ascii=False)
    return str(value)


def _print_text(result: pa.Table, max_rows: int) -> None:
    from rich.console import Console
    from rich.table import Table

    view = Table(show_header=True, header_style="bold")
    for field in result.schema:
        numeric = _is_numeric(field.type)
        view.add_column(f"{field.name}\n{field.type}", justify="right" if numeric else "left")
    shown_rows = result.slice(0, max_rows)
    columns = [column.to_pylist() for column in shown_rows.columns]  # names may repeat
    for row in zip(*columns, strict=True):
        view.add_row(*(_text_value(v) for v in row))
    Console(highlight=False, soft_wrap=False).print(view)
    shown = min(result.num_rows, max_rows)
    more = f", {shown} shown (--max-rows)" if shown < result.num_rows else ""
    typer.echo(f"({result.num_rows} rows{more})", err=True)


def _is_numeric(kind: pa.DataType) -> bool:
    import pyarrow as pa

    return bool(
        pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)
    )


def _inner_command(
    query: str,
    tables: list[str],
    output: Path | None,
    key: str | None,
    force: bool,
    fmt: OutputFormat | None,
    max_rows: int,
    options: SqlOptions,
) -> list[str]:
    """The same query as a `ppml sql` command line, for the attested child: built from the
    parsed options (not copied from argv), so that one query always has one measurement."""
    argv = ["sql", query]
    for spec in tables:
        argv += ["--table", spec]
    if output is not None:
        argv += ["--output", str(output), "--key", str(key)]
    if force:
        argv.append("--force")
    if fmt is not None:
        argv += ["--format", fmt.value]
    argv += ["--max-rows", str(max_rows)]
    if options.memory_limit is not None:
        argv += ["--memory-limit", options.memory_limit]
    if options.threads is not None:
        argv += ["--threads", str(options.threads)]
    return argv
