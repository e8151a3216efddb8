"""`ppml encrypt`, `decrypt`, `inspect` and `rewrap`: files and directories of files."""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ppml.cli._common import (
    ByteProgress,
    FormatOption,
    PassphraseFileOption,
    WorkspaceOption,
    check_format,
    handle_errors,
    open_workspace,
    print_json,
)
from ppml.errors import InputNotFound, NotEncrypted, UsageError

if TYPE_CHECKING:
    from ppml.crypto.envelope import DataKeyProvider


class FileFormat(enum.StrEnum):
    AUTO = "auto"
    BYTES = "bytes"
    CSV = "csv"
    JSON = "json"
    TEXT = "text"
    PARQUET = "parquet"


def register(app: typer.Typer) -> None:
    app.command("encrypt")(encrypt)
    app.command("decrypt")(decrypt)
    app.command("inspect")(inspect)
    app.command("rewrap")(rewrap)


def _input(path: Path) -> Path:
    if not path.exists():
        raise InputNotFound("no such file or directory", path=path)
    return path


def _data_files(root: Path) -> list[Path]:
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
        typer.echo(f"ppml: left out {len(links)} symbolic link(s), not followed: {shown}", err=True)
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
    files = _data_files(src)
    total = sum(p.stat().st_size for p in files)
    with output_directory(output, overwrite=force) as tmp, ByteProgress(total, f"{verb}ing") as bar:
        for f in files:
            dst = tmp / f.relative_to(src)
            dst.parent.mkdir(parents=True, exist_ok=True)
            one(f, dst, True, bar)
    typer.echo(f"{verb}ed {len(files)} files into {output}", err=True)


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
    with handle_errors():
        src = _input(input_path)
        column_keys = _parse_column_keys(column_key or [])
        ws = open_workspace(workspace, passphrase_file)
        with ws.key_service() as keys:
            keys.describe(key)  # an unknown key fails before any output is made
            for name in column_keys:
                keys.describe(name)

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
    with handle_errors():
        src = _input(input_path)
        ws = open_workspace(workspace, passphrase_file)
        with ws.key_service() as keys:

            def one(src: Path, dst: Path, replace: bool, bar: ByteProgress) -> None:
                _decrypt_one(src, dst, keys, replace, bar)

            _each_file(src, output, force, "decrypt", one)


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
        path = _input(file)
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
            src = _input(p)
            files.extend([(f, False) for f in _data_files(src)] if src.is_dir() else [(src, True)])
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
