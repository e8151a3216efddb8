"""`ppml encrypt`, `decrypt`, `inspect` and `rewrap`: files and directories of files.

The commands are declared here for typer; the work of `encrypt` and `decrypt` is in
`ppml.cli.files`, which also runs their plain command lines without typer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ppml.cli._common import (
    FormatOption,
    PassphraseFileOption,
    WorkspaceOption,
    check_format,
    handle_errors,
    open_workspace,
    print_json,
)
from ppml.cli.files import (
    FileFormat,
    data_files,
    decrypt_files,
    encrypt_files,
    existing_input,
)
from ppml.errors import NotEncrypted, UsageError


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


def _describe(path: Path) -> dict[str, Any]:
    from ppml.crypto.stream import TAG_SIZE
    from ppml.data import detect_file_kind, read_stream_header

    size = path.stat().st_size
    kind = detect_file_kind(path)
    if kind == "stream":
        header, header_len = read_stream_header(path)
        seg_ct = header.segment_size + TAG_SIZE
        body = size - header_len
        segments = max(1, -(-body // seg_ct))
        return {
            "file": str(path),
            "format": "ppml stream v1",
            "algorithm": "AES-256-GCM segments, HKDF-SHA256 per-file key",
            "content_type": header.content_type.name.lower(),
            "key_name": header.key_name,
            "key_version": header.wrapped.version,
            "segment_size": header.segment_size,
            "segments": segments,
            "header_bytes": header_len,
            "file_bytes": size,
            "plaintext_bytes": body - segments * TAG_SIZE,
        }
    if kind == "parquet":
        from ppml.data.parquet import is_encrypted_parquet, parquet_footer_key

        if not is_encrypted_parquet(path):
            raise NotEncrypted("a plaintext Parquet file (not encrypted)", path=path)
        footer = parquet_footer_key(path)
        return {
            "file": str(path),
            "format": "Parquet, Parquet Modular Encryption (encrypted footer)",
            "algorithm": "AES_GCM_V1",
            "key_name": footer.key_name,
            "key_version": footer.version,
            "file_bytes": size,
            "note": "column keys are listed inside the encrypted footer",
        }
    raise NotEncrypted("not a ppml encrypted file", path=path)


def inspect(
    file: Annotated[Path, typer.Argument(help="An encrypted file.")],
    fmt: FormatOption = "text",
) -> None:
    """Show an encrypted file's header: format, algorithm, key name and version, sizes.

    Needs no key and shows nothing secret.
    """
    with handle_errors():
        check_format(fmt)
        path = existing_input(file)
        if path.is_dir():
            raise UsageError("is a directory, expected a file", path=path)
        info = _describe(path)
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
    with handle_errors():
        from ppml.data import detect_file_kind, rewrap_file

        files: list[tuple[Path, bool]] = []  # (path, named explicitly)
        for p in paths:
            src = existing_input(p)
            files.extend([(f, False) for f in data_files(src)] if src.is_dir() else [(src, True)])
        for f, explicit in files:
            if explicit and detect_file_kind(f) == "plain":
                raise NotEncrypted("not a ppml encrypted file", path=f)
        ws = open_workspace(workspace, passphrase_file)
        changed = 0
        with ws.key_service() as keys:
            for f, _ in files:
                kind = detect_file_kind(f)
                if kind == "stream":
                    old, new = rewrap_file(f, keys.rewrap)
                    if old.version != new.version:
                        changed += 1
                        typer.echo(f"{f}: {old.key_name} v{old.version} -> v{new.version}")
                    else:
                        typer.echo(f"{f}: {old.key_name} v{old.version} (already newest)")
                elif kind == "parquet":
                    changed += _reencrypt_parquet(f, keys)
                else:
                    typer.echo(f"{f}: skipped (not encrypted)")
        typer.echo(f"rewrapped {changed} of {len(files)} files", err=True)


def _reencrypt_parquet(path: Path, keys: Any) -> int:
    from ppml.data.files import annotate_errors
    from ppml.data.parquet import parquet_footer_key, reencrypt_parquet_file

    footer = parquet_footer_key(path)
    current = keys.describe(footer.key_name).current_version
    if footer.version == current:
        typer.echo(f"{path}: {footer.key_name} v{footer.version} (already newest)")
        return 0
    with annotate_errors(path):
        reencrypt_parquet_file(path, keys)
    typer.echo(f"{path}: {footer.key_name} v{footer.version} -> v{current} (re-encrypted)")
    return 1
