"""The data files under a directory: the one walker, and its rule for what is left out.

Hidden entries (a name starting with '.') are never data. A dataset's part files also leave out
`_`-prefixed entries (Spark's `_SUCCESS`, `_temporary`, `_metadata`). Symbolic links to
directories are not followed (a link could lead out of the tree and round in circles).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ppml.errors import InputNotFound, UsageError

__all__ = ["DataFiles", "data_files", "existing", "part_files"]


@dataclass(frozen=True)
class DataFiles:
    """The regular files found under a directory, sorted, and the symbolic links left out."""

    files: tuple[Path, ...]
    links: tuple[Path, ...]


def existing(path: Path) -> Path:
    """`path`, when it exists (`InputNotFound` otherwise)."""
    if not path.exists():
        raise InputNotFound("no such file or directory", path=path)
    return path


def data_files(
    root: Path, *, skip_underscore: bool = False, follow_file_links: bool = False
) -> DataFiles:
    """The regular files under `root`, hidden ones left out (and `_`-prefixed ones, with
    `skip_underscore`). Links to directories are left out; links to files too unless
    `follow_file_links`. What was left out as a link is in `links`."""
    skipped = (".", "_") if skip_underscore else (".",)
    files: list[Path] = []
    links: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        for d in list(dirnames):
            if d.startswith(skipped) or (here / d).is_symlink():
                if not d.startswith(skipped):
                    links.append(here / d)
                dirnames.remove(d)
        for f in filenames:
            path = here / f
            if f.startswith(skipped):
                continue
            if path.is_symlink() and not follow_file_links:
                links.append(path)
            elif path.is_file():
                files.append(path)
    return DataFiles(tuple(sorted(files)), tuple(sorted(links)))


def part_files(path: Path) -> list[Path]:
    """The data files of a file or directory (hidden and `_`-prefixed entries left out)."""
    if existing(path).is_file():
        return [path]
    files = list(data_files(path, skip_underscore=True, follow_file_links=True).files)
    if not files:
        raise UsageError("directory holds no data files", path=path)
    return files
