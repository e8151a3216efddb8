"""Files and directories of files, whole: encrypt, decrypt, describe and re-wrap them.

The verbs behind `ppml encrypt`, `decrypt`, `inspect` and `rewrap`. Each takes a file or a
directory; what a file is (ppml's streaming format, Parquet, anything else) is read from the
file, never from its name alone. Outputs appear only when complete: a file is renamed into place
after its last byte was written and verified, a directory after its last file; on any error
nothing is left behind, and an existing output is replaced only with ``overwrite=True``.

>>> with workspace.key_service() as keys:  # doctest: +SKIP
...     encrypt_path("sales.csv", "sales.csv.ppml", keys, "sales")
...     decrypt_path("sales.csv.ppml", "copy.csv", keys)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ppml._internal.fs import sweep_stale
from ppml.crypto.envelope import DataKeyProvider, WrappedKey
from ppml.crypto.stream import DEFAULT_SEGMENT_SIZE, TAG_SIZE, ContentType
from ppml.data.files import (
    annotate_errors,
    check_output_name,
    decrypt_file,
    encrypt_file,
    output_directory,
    read_stream_header,
    rewrap_file,
)
from ppml.data.kinds import sniff
from ppml.data.tree import data_files, existing
from ppml.errors import NotEncrypted, OutputExists, UsageError

__all__ = [
    "PATH_FORMATS",
    "KeyRewrapper",
    "PathResult",
    "Rewrapped",
    "decrypt_path",
    "describe",
    "encrypt_path",
    "rewrap_path",
]

PATH_FORMATS = ("auto", "bytes", "csv", "json", "text", "parquet")
"""`encrypt_path`'s formats. auto: Parquet input -> encrypted Parquet (PME), anything else ->
the streaming format with the content type taken from the file name."""

# Given the total bytes of the input, the callback for bytes done (or None: no progress).
ProgressStart = Callable[[int], Callable[[int], None] | None]
OneFile = Callable[[Path, Path, bool, Callable[[int], None] | None], None]


@dataclass(frozen=True)
class PathResult:
    """What a verb did: the input files it worked on, whether the input was a directory, and
    the symbolic links it left out (never followed)."""

    files: tuple[Path, ...]
    directory: bool
    links: tuple[Path, ...] = ()


def _each_file(
    src: Path,
    dst: Path,
    overwrite: bool,
    one: OneFile,
    progress: ProgressStart | None,
    on_links: Callable[[Sequence[Path]], None] | None,
) -> PathResult:
    """Apply `one` to a file, or to every file of a directory into an output directory that
    appears only when all of them succeeded."""
    check_output_name(dst)
    if not src.is_dir():
        sweep_stale(dst.parent if str(dst.parent) else Path("."))
        one(src, dst, overwrite, progress(src.stat().st_size) if progress else None)
        return PathResult((src,), directory=False)
    found = data_files(src)
    if found.links and on_links is not None:
        on_links(found.links)
    with output_directory(dst, overwrite=overwrite) as tmp:
        advance = progress(sum(p.stat().st_size for p in found.files)) if progress else None
        for f in found.files:
            out = tmp / f.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            one(f, out, True, advance)
    return PathResult(found.files, directory=True, links=found.links)


def _refuse_existing(dst: Path, overwrite: bool) -> None:
    if dst.exists() and not overwrite:
        raise OutputExists("output exists (use --force to replace it)", path=dst)


def encrypt_path(
    src: Path | str,
    dst: Path | str,
    provider: DataKeyProvider,
    key_name: str,
    *,
    format: str = "auto",
    column_keys: Mapping[str, Sequence[str]] | None = None,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    overwrite: bool = False,
    progress: ProgressStart | None = None,
    on_links: Callable[[Sequence[Path]], None] | None = None,
) -> PathResult:
    """Encrypt a file, or every file of a directory into a directory, under fresh data keys of
    `key_name`. `format` is one of `PATH_FORMATS`; `column_keys` (Parquet only) puts columns
    under other named keys. `progress`, when given, is called with the total input bytes and
    returns the callback for bytes done; `on_links` gets the symbolic links left out."""
    if format not in PATH_FORMATS:
        raise UsageError(f"unknown format {format!r} (expected {', '.join(PATH_FORMATS)})")
    groups = {name: list(cols) for name, cols in (column_keys or {}).items()}

    def one(src: Path, dst: Path, replace: bool, advance: Callable[[int], None] | None) -> None:
        if format == "parquet" or (format == "auto" and src.is_file() and sniff(src) == "parquet"):
            from ppml.data.parquet import encrypt_parquet_file

            _refuse_existing(dst, replace)
            with annotate_errors(src):
                encrypt_parquet_file(
                    src, dst, provider, key_name=key_name, column_keys=groups or None
                )
            if advance is not None:
                advance(src.stat().st_size)
            return
        if groups:
            raise UsageError("--column-key applies to Parquet only", path=src)
        ctype = None if format == "auto" else ContentType.parse(format)
        encrypt_file(
            src,
            dst,
            provider,
            key_name,
            content_type=ctype,
            segment_size=segment_size,
            overwrite=replace,
            progress=advance,
        )

    return _each_file(existing(Path(src)), Path(dst), overwrite, one, progress, on_links)


def decrypt_path(
    src: Path | str,
    dst: Path | str,
    keys: DataKeyProvider,
    *,
    overwrite: bool = False,
    progress: ProgressStart | None = None,
    on_links: Callable[[Sequence[Path]], None] | None = None,
) -> PathResult:
    """Decrypt a file (streaming format or encrypted Parquet: the kind is read from the file),
    or a directory of encrypted files into a directory. The plaintext appears only after every
    segment (or row group) verified: a tampered file leaves nothing. `progress` and `on_links`
    as for `encrypt_path`."""

    def one(src: Path, dst: Path, replace: bool, advance: Callable[[int], None] | None) -> None:
        # A pipe can be read once only: it can only be the streaming format.
        if src.is_file() and sniff(src) in ("parquet", "encrypted-parquet"):
            from ppml.data.parquet import decrypt_parquet_file

            _refuse_existing(dst, replace)
            with annotate_errors(src):
                decrypt_parquet_file(src, dst, keys)
            if advance is not None:
                advance(src.stat().st_size)
            return
        decrypt_file(src, dst, keys, overwrite=replace, progress=advance)

    return _each_file(existing(Path(src)), Path(dst), overwrite, one, progress, on_links)


def describe(path: Path | str) -> dict[str, Any]:
    """An encrypted file's header: format, algorithm, key name and version, sizes. Needs no key
    and shows nothing secret; `NotEncrypted` for anything but an encrypted file."""
    path = existing(Path(path))
    if path.is_dir():
        raise UsageError("is a directory, expected a file", path=path)
    size = path.stat().st_size
    kind = sniff(path)
    if kind == "stream":
        header, header_len = read_stream_header(path)
        body = size - header_len
        segments = max(1, -(-body // (header.segment_size + TAG_SIZE)))
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
    if kind in ("parquet", "encrypted-parquet"):
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


class KeyRewrapper(DataKeyProvider, Protocol):
    """What re-wrapping needs of a key service: re-wrap a data key under the newest version of
    its named key, and say which version that is (for Parquet, re-encrypted instead)."""

    def rewrap(self, wrapped: WrappedKey) -> WrappedKey: ...

    def describe(self, name: str) -> Any: ...


@dataclass(frozen=True)
class Rewrapped:
    """One file of `rewrap_path`: its kind, its key, and the version before and after
    (`reencrypted`: an encrypted Parquet file rewritten under fresh keys)."""

    path: Path
    kind: str  # "stream", "parquet" or "plain" (left as it is)
    key_name: str = ""
    old_version: int = 0
    new_version: int = 0
    reencrypted: bool = False

    @property
    def changed(self) -> bool:
        return self.old_version != self.new_version


def rewrap_path(
    paths: Path | str | Iterable[Path | str],
    open_keys: Callable[[], AbstractContextManager[KeyRewrapper]],
    *,
    on_links: Callable[[Sequence[Path]], None] | None = None,
) -> Iterator[Rewrapped]:
    """Re-wrap each file's data key under the newest version of its named key, without
    re-encrypting the data (streaming format: only the header changes, atomically). Encrypted
    Parquet keeps its keys inside the encrypted footer: such a file is re-encrypted under fresh
    keys of the newest version instead.

    Files of a directory that are not encrypted are passed over (reported as "plain"); a file
    named explicitly must be encrypted. Every path is checked before `open_keys()` (for
    instance `workspace.key_service`) is called. Yields one `Rewrapped` per file, as done;
    `on_links` gets the symbolic links left out of a directory.
    """
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    named: list[Path] = []  # files named explicitly
    files: list[Path] = []
    for item in items:
        src = existing(Path(item))
        if src.is_dir():
            found = data_files(src)
            if found.links and on_links is not None:
                on_links(found.links)
            files.extend(found.files)
        else:
            named.append(src)
            files.append(src)
    for f in named:
        if sniff(f) == "plain":
            raise NotEncrypted("not a ppml encrypted file", path=f)
    return _rewrap_each(files, open_keys)


def _rewrap_each(
    files: Sequence[Path], open_keys: Callable[[], AbstractContextManager[KeyRewrapper]]
) -> Iterator[Rewrapped]:
    with open_keys() as keys:
        for f in files:
            kind = sniff(f)
            if kind == "stream":
                old, new = rewrap_file(f, keys.rewrap)
                yield Rewrapped(f, "stream", old.key_name, old.version, new.version)
            elif kind in ("parquet", "encrypted-parquet"):
                yield _reencrypt_parquet(f, keys)
            else:
                yield Rewrapped(f, "plain")


def _reencrypt_parquet(path: Path, keys: KeyRewrapper) -> Rewrapped:
    from ppml.data.parquet import parquet_footer_key, reencrypt_parquet_file

    footer = parquet_footer_key(path)
    current = int(keys.describe(footer.key_name).current_version)
    if footer.version != current:
        with annotate_errors(path):
            reencrypt_parquet_file(path, keys)
    return Rewrapped(
        path, "parquet", footer.key_name, footer.version, current, footer.version != current
    )
