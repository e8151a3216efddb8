"""Whole encrypted files and directories in the streaming format: encrypt, decrypt, rewrap, open.

Outputs appear only when complete: a file is written to a temporary name and renamed into place
after its last segment was written (encrypting) or verified (decrypting); a directory is built
in a temporary sibling directory and renamed into place after its last file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from ppml._internal.fs import (
    atomic_output,
    in_memory_file_system,
    locked_temp_dir,
    old_name,
    sweep_stale,
    unmark,
)
from ppml.crypto.envelope import DataKeyProvider, WrappedKey
from ppml.crypto.stream import (
    DEFAULT_SEGMENT_SIZE,
    ContentType,
    KeyResolver,
    StreamHeader,
    StreamReader,
    StreamWriter,
    body_size,
    check_segment_size,
    decrypt_stream,
    encrypt_stream,
    new_header,
    plaintext_size,
    read_header,
)
from ppml.errors import InputNotFound, OutputExists, PPMLError, UsageError

__all__ = [
    "annotate_errors",
    "check_output_name",
    "content_type_for",
    "create_encrypted",
    "decrypt_file",
    "encrypt_file",
    "open_encrypted",
    "output_directory",
    "read_stream_header",
    "rewrap_file",
]

_SUFFIX_TYPES = {
    ".csv": ContentType.CSV,
    ".tsv": ContentType.CSV,
    ".json": ContentType.JSON,
    ".jsonl": ContentType.JSON,
    ".ndjson": ContentType.JSON,
    ".txt": ContentType.TEXT,
    ".text": ContentType.TEXT,
    ".log": ContentType.TEXT,
    ".md": ContentType.TEXT,
}
_OUTPUT_MODE = 0o600
# More than any stream header takes (its fixed part, the key name, the wrapped data key).
_HEADER_ALLOWANCE = 4096
Progress = Callable[[int], None]


def content_type_for(path: Path) -> ContentType:
    """The content type a plaintext file's name suggests (bytes when it suggests nothing)."""
    return _SUFFIX_TYPES.get(path.suffix.lower(), ContentType.BYTES)


def _check_input_file(path: Path) -> None:
    if not path.exists():
        raise InputNotFound("no such file", path=path)
    if path.is_dir():
        raise UsageError("is a directory, expected a file", path=path)
    if not os.access(path, os.R_OK):
        raise UsageError("cannot read input: permission denied", path=path)


# An output's temporary name adds ".", ".ppml-" and 12 hex digits and ".tmp" to its own.
_MAX_OUTPUT_NAME = 255 - 23


def check_output_name(path: Path) -> None:
    """Refuse an output that ppml cannot write atomically: standard output (``-``) and a name
    too long for a temporary name beside it."""
    if str(path) == "-":
        raise UsageError(
            "writing to standard output (-o -) is not supported: name an output file, which "
            "appears only once complete"
        )
    if len(os.fsencode(path.name)) > _MAX_OUTPUT_NAME:
        raise UsageError(
            f"output name too long: at most {_MAX_OUTPUT_NAME} bytes", path=path.name[:60] + "..."
        )


def _check_output(path: Path, *, overwrite: bool) -> None:
    check_output_name(path)
    if path.is_dir():
        raise UsageError("output is a directory, expected a file path", path=path)
    if path.exists() and not overwrite:
        raise OutputExists("output exists (use --force to replace it)", path=path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError("output directory does not exist", path=path)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError("cannot write output: permission denied", path=path)
    sweep_stale(parent)


@contextlib.contextmanager
def annotate_errors(path: Path) -> Iterator[None]:
    """Attach `path` to ppml errors and turn OS errors into one-line usage errors."""
    try:
        yield
    except PPMLError as exc:
        if exc.path is None:
            exc.path = str(path)
        raise
    except OSError as exc:
        raise UsageError(exc.strerror or str(exc), path=exc.filename or path) from None


def encrypt_file(
    src: Path,
    dst: Path,
    provider: DataKeyProvider,
    key_name: str,
    *,
    content_type: ContentType | None = None,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> StreamHeader:
    """Encrypt `src` into `dst` under a fresh data key of `key_name`; returns the header."""
    src, dst = _checked_paths(src, dst, overwrite)
    ctype = content_type if content_type is not None else content_type_for(src)
    check_segment_size(segment_size)
    with _file_to_file(src, dst) as (fin, fout):
        size = _regular_size(fin)
        if size is not None:
            # Reserved before the data key is asked for: a provider that is still being opened
            # (the CLI unseals the workspace in the background) does so meanwhile. The header's
            # exact size comes with the key; the final truncation trims the allowance.
            _preallocate(fout, _HEADER_ALLOWANCE + body_size(size, segment_size))
        data_key = provider.generate_data_key(key_name)
        header = new_header(data_key, ctype, segment_size)
        encrypt_stream(fin, fout, data_key, header=header, progress=progress)
        os.ftruncate(fout.fileno(), fout.tell())  # the allowance; an input that shrank meanwhile
        return header


def decrypt_file(
    src: Path,
    dst: Path,
    keys: DataKeyProvider | KeyResolver,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> StreamHeader:
    """Decrypt `src` into `dst`; `dst` appears only after every segment verified."""
    src, dst = _checked_paths(src, dst, overwrite)
    with _file_to_file(src, dst) as (fin, fout):
        size = _regular_size(fin)
        if size is not None:
            header, header_len = read_header(fin)
            _preallocate(fout, max(0, plaintext_size(header, header_len, size)))
            fin.seek(0)
        header = decrypt_stream(fin, fout, keys, progress=progress)
        os.ftruncate(fout.fileno(), fout.tell())
        return header


def _checked_paths(src: Path, dst: Path, overwrite: bool) -> tuple[Path, Path]:
    src, dst = Path(src), Path(dst)
    _check_input_file(src)
    _check_output(dst, overwrite=overwrite)
    return src, dst


@contextlib.contextmanager
def _file_to_file(src: Path, dst: Path) -> Iterator[tuple[BinaryIO, BinaryIO]]:
    """`src` open for reading, and the temporary file that becomes `dst` (mode 0600) when the
    block completes; errors name `src`."""
    with (
        annotate_errors(src),
        open(src, "rb", buffering=0) as fin,
        atomic_output(dst, mode=_OUTPUT_MODE) as fout,
    ):
        yield fin, fout


def _regular_size(fh: BinaryIO) -> int | None:
    """The size of a regular file (None for pipes and devices)."""
    st = os.fstat(fh.fileno())
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _preallocate(fh: BinaryIO, size: int) -> None:
    """Reserve the output's blocks up front where that pays: on a disk file system, writing into
    reserved blocks is much cheaper than growing the file a little at a time. Not on tmpfs,
    where reserving allocates and zeroes every page first, which costs more than the writes
    then save."""
    if size > 0 and not in_memory_file_system(fh.fileno()):
        with contextlib.suppress(OSError):
            os.posix_fallocate(fh.fileno(), 0, size)


def read_stream_header(path: Path) -> tuple[StreamHeader, int]:
    """The header of an encrypted file and its length (no key needed)."""
    path = Path(path)
    _check_input_file(path)
    with annotate_errors(path), open(path, "rb") as fh:
        return read_header(fh)


def rewrap_file(
    path: Path, rewrap: Callable[[WrappedKey], WrappedKey]
) -> tuple[WrappedKey, WrappedKey]:
    """Replace the wrapped data key in `path`'s header by `rewrap(old)`, without re-encrypting.

    The new file (new header, the same encrypted body, byte for byte) is written beside the old
    one and renamed over it, so a reader sees either the old file or the new one, never a mix.
    Returns (old, new). When the key is already wrapped by the newest version, the file is
    left as it is.
    """
    path = Path(path)
    header, header_len = read_stream_header(path)
    with annotate_errors(path):
        new = rewrap(header.wrapped)
        if new.version == header.wrapped.version:
            return header.wrapped, header.wrapped
        st = path.stat()
        with (
            open(path, "rb") as fin,
            atomic_output(path, mode=st.st_mode & 0o777, fsync=True) as fout,
        ):
            fout.write(header.with_wrapped(new).to_bytes())
            fin.seek(header_len)
            _copy_rest(fin, fout)
    return header.wrapped, new


def _copy_rest(fin: BinaryIO, fout: BinaryIO) -> None:
    """Copy from the current position to the end, in the kernel where possible."""
    try:
        while os.copy_file_range(fin.fileno(), fout.fileno(), 1 << 30):
            pass
    except OSError:
        shutil.copyfileobj(fin, fout, 1 << 20)


def open_encrypted(path: Path, keys: DataKeyProvider | KeyResolver) -> StreamReader:
    """A seekable plaintext view of an encrypted file (segments verified as they are read)."""
    path = Path(path)
    _check_input_file(path)
    with annotate_errors(path):
        raw = open(path, "rb")  # noqa: SIM115 -- owned by the returned reader
        try:
            return _OwningReader(raw, keys)
        except BaseException:
            raw.close()
            raise


class _OwningReader(StreamReader):
    """A StreamReader that closes the file it was opened on."""

    def __init__(self, raw: BinaryIO, keys: DataKeyProvider | KeyResolver) -> None:
        super().__init__(raw, keys)
        self._owned = raw

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._owned.close()


@contextlib.contextmanager
def create_encrypted(
    path: Path,
    provider: DataKeyProvider,
    key_name: str,
    *,
    content_type: ContentType = ContentType.BYTES,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    overwrite: bool = True,
) -> Iterator[StreamWriter]:
    """Yield a writable file object; the encrypted file appears at `path` when the block ends."""
    path = Path(path)
    _check_output(path, overwrite=overwrite)
    with annotate_errors(path):
        data_key = provider.generate_data_key(key_name)
        with atomic_output(path, mode=_OUTPUT_MODE) as fout:
            writer = StreamWriter(
                fout, data_key, content_type=content_type, segment_size=segment_size
            )
            yield writer
            writer.close()


@contextlib.contextmanager
def output_directory(dst: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `dst` when the block completes.

    On failure the temporary directory is removed and an existing `dst` is left untouched.
    """
    dst = Path(dst)
    check_output_name(dst)
    if dst.exists() and not overwrite:
        raise OutputExists("output exists (use --force to replace it)", path=dst)
    if dst.exists() and not dst.is_dir():
        raise UsageError("output exists and is not a directory", path=dst)
    parent = dst.parent if str(dst.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError("output's parent directory does not exist", path=dst)
    sweep_stale(parent)
    with locked_temp_dir(dst) as tmp:
        try:
            yield tmp
            unmark(tmp)
            if dst.exists():
                old = old_name(dst)
                os.replace(dst, old)
                os.replace(tmp, dst)
                shutil.rmtree(old)
            else:
                os.replace(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
