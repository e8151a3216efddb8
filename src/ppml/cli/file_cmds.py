"""`ppml encrypt`, `decrypt`, `inspect` and `rewrap`: files and directories of files.

The commands are declared here for typer; the work of `encrypt` and `decrypt` is in
`ppml.cli.files`, which also runs their plain command lines without typer.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ppml.cli._common import (
    FormatOption,
    PassphraseFileOption,
    WorkspaceOption,
    check_format,
    open_workspace,
    print_json,
)
from ppml.cli.files import FileFormat, decrypt_files, echo_links, encrypt_files

if TYPE_CHECKING:
    from ppml.data import Rewrapped
    from ppml.kms import KeyService


def register(app: typer.Typer) -> None:
    app.command("encrypt")(encrypt)
    app.command("decrypt")(decrypt)
    app.command("inspect")(inspect)
    app.command("rewrap")(rewrap)


def encrypt(
    input_path: Annotated[Path, typer.Argument(metavar="IN", help="File or directory to encrypt.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", metavar="OUT", help="Output file or directory.")
    ],
    key: Annotated[str, typer.Option("--key", "-k", help="Named key (see `ppml key create`).")],
    fmt: Annotated[
        FileFormat,
        typer.Option(
            "--format",
            help="auto: Parquet input -> encrypted Parquet (PME), anything else -> the streaming "
            "format with the content type taken from the file name.",
        ),
    ] = FileFormat.AUTO,
    column_key: Annotated[
        list[str] | None,
        typer.Option(
            "--column-key",
            metavar="NAME:COL1,COL2",
            help="Parquet only: put these columns under another named key (repeatable).",
        ),
    ] = None,
    segment_size: Annotated[
        int, typer.Option("--segment-size", help="Plaintext bytes per segment (streaming format).")
    ] = 1 << 20,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    workspace: WorkspaceOption = None,
    passphrase_file: PassphraseFileOption = None,
) -> None:
    """Encrypt a file, or every file of a directory, under a fresh data key of KEY.

    The output appears only when complete; on any error nothing is left behind.
    """
    encrypt_files(
        input_path, output, key, fmt, column_key, segment_size, force, workspace, passphrase_file
    )


def decrypt(
    input_path: Annotated[
        Path, typer.Argument(metavar="IN", help="Encrypted file, or directory of encrypted files.")
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", metavar="OUT", help="Output file or directory.")
    ],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    workspace: WorkspaceOption = None,
    passphrase_file: PassphraseFileOption = None,
) -> None:
    """Decrypt a file (streaming format or encrypted Parquet; the kind is read from the file),
    or a directory of encrypted part files into a directory.

    The plaintext appears only after every segment verified: a tampered file leaves nothing.
    """
    decrypt_files(input_path, output, force, workspace, passphrase_file)


def inspect(
    file: Annotated[Path, typer.Argument(help="An encrypted file.")],
    fmt: FormatOption = "text",
) -> None:
    """Show an encrypted file's header: format, algorithm, key name and version, sizes.

    Needs no key and shows nothing secret.
    """
    check_format(fmt)
    from ppml.data import describe

    info = describe(file)
    if fmt == "json":
        print_json(info)
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            typer.echo(f"{k.replace('_', ' '):<{width}}  {v}")


def rewrap(
    paths: Annotated[
        list[Path], typer.Argument(metavar="FILE|DIR...", help="Encrypted files or directories.")
    ],
    workspace: WorkspaceOption = None,
    passphrase_file: PassphraseFileOption = None,
) -> None:
    """Re-wrap each file's data key under the newest version of its named key, without
    re-encrypting the data (streaming format: only the header changes, atomically).

    Encrypted Parquet files keep their keys inside the encrypted footer: they are re-encrypted
    under fresh keys of the newest version instead.
    """
    from ppml.data import rewrap_path

    def open_keys() -> KeyService:
        return open_workspace(workspace, passphrase_file).key_service()

    done = changed = 0
    for r in rewrap_path(paths, open_keys, on_links=echo_links):
        done += 1
        changed += r.changed
        typer.echo(_rewrapped_line(r))
    typer.echo(f"rewrapped {changed} of {done} files", err=True)


def _rewrapped_line(r: Rewrapped) -> str:
    if r.kind == "plain":
        return f"{r.path}: skipped (not encrypted)"
    if not r.changed:
        return f"{r.path}: {r.key_name} v{r.old_version} (already newest)"
    how = " (re-encrypted)" if r.reencrypted else ""
    return f"{r.path}: {r.key_name} v{r.old_version} -> v{r.new_version}{how}"
