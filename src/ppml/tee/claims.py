"""What running attested workloads may write, and what each one needs unchanged: so that one
workload cannot change another's measured files while it runs.

The sandbox pins a workload's measured files by read-only mounts over their paths, and leaves
its Python environment read-only. Both hold against the workload itself. They do not hold
against a rename made in another mount namespace: another workload whose data directory holds
those paths (or a directory above them) can rename a file over a measured one, which detaches the
mount, or move a whole directory aside and put another in its place. Python modules are checked
again as they load; a shell script, a configuration file or a file of the environment are not.

So each launch records a `Claim` in a per-user registry (a private directory hidden from every
workload) for as long as its workload runs: the directories it may write (its data
directories), the paths it keeps read-only inside them (mount points that cannot be renamed or
removed from within), and the paths it needs unchanged (its measured files, its environment's
roots). A launch is refused while another running workload could change what this one needs, or
this one could change what another needs; the message names the path and the other run.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from ppml._internal.fs import ensure_private_dir, locked, write_private
from ppml._internal.procs import process_identity
from ppml.errors import UsageError

__all__ = ["Claim", "ClaimConflict", "Registry"]

_LOCK = ".lock"


class ClaimConflict(UsageError):
    """Another running workload could change what this one needs, or the other way round."""


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


@dataclass(frozen=True, slots=True)
class Claim:
    """One running workload's paths (real paths, as the host sees them)."""

    owner: str  # process_identity of the process whose life the claim lasts
    writable: tuple[str, ...]
    readonly: tuple[str, ...]  # kept read-only inside `writable` (bound over their own paths)
    protected: tuple[str, ...]  # must not change while it runs
    what: str = ""  # for messages: the command

    def can_change(self, path: str) -> bool:
        """Whether this workload could change `path` (or replace a directory above it).

        A path inside a data directory is safe only under a read-only mount point whose parent
        is the data directory itself: the data directory's root cannot be renamed (it is a
        mount point too), and neither can the read-only mount point, from inside the sandbox.
        A directory between them could be moved aside with everything below it."""
        for root in self.writable:
            if not _under(path, root):
                continue
            if any(_under(path, ro) and os.path.dirname(ro) == root for ro in self.readonly):
                continue
            return True
        return False

    @classmethod
    def from_json(cls, data: bytes) -> Claim:
        doc = json.loads(data)
        return cls(
            owner=str(doc["owner"]),
            writable=tuple(doc["writable"]),
            readonly=tuple(doc["readonly"]),
            protected=tuple(doc["protected"]),
            what=str(doc.get("what", "")),
        )


class Registry:
    """The claims of running workloads, one JSON file each, under a private directory."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        ensure_private_dir(self.path)
        with locked(self.path / _LOCK):
            yield

    def _live(self) -> Iterator[tuple[Path, Claim]]:
        """Every claim whose owner still runs; the others are removed."""
        for f in sorted(self.path.glob("*.json")):
            try:
                claim = Claim.from_json(f.read_bytes())
                pid = int(claim.owner.split(":", 1)[0])
            except (OSError, ValueError, KeyError, TypeError):
                with contextlib.suppress(OSError):
                    f.unlink()
                continue
            if process_identity(pid) != claim.owner:
                with contextlib.suppress(OSError):
                    f.unlink()
                continue
            yield f, claim

    def claim(
        self,
        *,
        writable: Iterable[str],
        readonly: Iterable[str],
        protected: Iterable[str],
        what: str,
        owner_pid: int | None = None,
    ) -> Path:
        """Record a claim, or raise `ClaimConflict` if it conflicts with a running one; the
        record's path (give it to `release`, or `transfer` it to another owner)."""
        owner = process_identity(owner_pid if owner_pid is not None else os.getpid())
        if owner is None:
            raise UsageError("cannot tell this process's identity from /proc")
        mine = Claim(
            owner,
            tuple(dict.fromkeys(writable)),
            tuple(dict.fromkeys(readonly)),
            tuple(dict.fromkeys(protected)),
            what,
        )
        with self._locked():
            for _f, other in self._live():
                _check(mine, other)
            record = self.path / f"{secrets.token_hex(8)}.json"
            write_private(record, json.dumps(asdict(mine)).encode())
        return record

    def transfer(self, record: Path, pid: int) -> None:
        """The claim now lasts as long as process `pid` (a detached workload's sandbox)."""
        owner = process_identity(pid)
        if owner is None:
            return
        with self._locked():
            try:
                doc = json.loads(record.read_bytes())
            except (OSError, ValueError):
                return
            doc["owner"] = owner
            write_private(record, json.dumps(doc).encode())

    def release(self, record: Path) -> None:
        with contextlib.suppress(OSError):
            record.unlink()


def _check(mine: Claim, other: Claim) -> None:
    pid = other.owner.split(":", 1)[0]
    for path in mine.protected:
        if other.can_change(path):
            raise ClaimConflict(
                f"{path} is needed unchanged by this workload, and another running attested "
                f"workload (process {pid}: {other.what}) can write there: wait for it to end, "
                "or give one of them another --data directory"
            )
    for path in other.protected:
        if mine.can_change(path):
            raise ClaimConflict(
                f"this workload's --data directory holds {path}, which another running attested "
                f"workload (process {pid}: {other.what}) needs unchanged: wait for it to end, "
                "or give this one another --data directory"
            )
