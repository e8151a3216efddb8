"""The data API for workloads: `ppml.read_table`, `ppml.write_table` and the pandas variants
(`ppml.sql` is the SQL engine's, `ppml.engines.sql.sql`, over this module's `key_provider`).

Under `ppml run` the keys come from the key broker after attestation (transparently, the first
time one is needed); outside a TEE they come from the workspace directly, for a user who holds
its passphrase ($PPML_HOME or ./.ppml, $PPML_PASSPHRASE or a prompt).
"""

from __future__ import annotations

import atexit
import getpass
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ppml.crypto.envelope import DataKeyProvider
from ppml.errors import ConfigurationError

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

    from ppml.kms import KeyService

__all__ = [
    "key_provider",
    "read_pandas",
    "read_table",
    "write_pandas",
    "write_table",
]

_lock = threading.Lock()
_provider: DataKeyProvider | None = None


def key_provider() -> DataKeyProvider:
    """This process's key provider: attested under `ppml run`, else the workspace's KMS."""
    global _provider
    with _lock:
        if _provider is None:
            _provider = _make_provider()
        return _provider


def _make_provider() -> DataKeyProvider:
    from ppml.tee.runtime import process_key_provider

    provider = process_key_provider(_workspace_keys)
    atexit.register(provider.close)
    return provider


def _workspace_keys() -> KeyService:
    from ppml.workspace import Workspace, default_workspace_dir

    path = default_workspace_dir()
    if os.environ.get("PPML_KEYS_WITHHELD") == "spark-submit":
        raise ConfigurationError(
            "no keys: `ppml spark-submit` releases keys to an attested driver only: run it with "
            "--tee sim (and allow its measurement in the key's policy)"
        )
    if "PPML_PASSPHRASE" in os.environ:
        passphrase = os.environ["PPML_PASSPHRASE"].encode()
    elif sys.stdin.isatty():
        passphrase = getpass.getpass(f"Passphrase for the ppml workspace {path}: ").encode()
    else:
        raise ConfigurationError(
            "no keys: run under `ppml run`, or set PPML_PASSPHRASE for the workspace"
        )
    return Workspace.open(path, passphrase).key_service()


def read_table(
    path: str | Path,
    *,
    columns: Sequence[str] | None = None,
    format: str | None = None,
) -> pa.Table:
    """Read an encrypted (or plain) file or directory of part files as an Arrow table."""
    from ppml.data import read_table as _read

    return _read(path, key_provider(), columns=columns, format=format)


def write_table(
    table: pa.Table,
    path: str | Path,
    *,
    key: str,
    format: str | None = None,
    column_keys: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """Write `table` encrypted under a fresh data key of the named key `key`."""
    from ppml.data import write_table as _write

    _write(table, path, key_provider(), key_name=key, format=format, column_keys=column_keys)


def read_pandas(path: str | Path, **kwargs: Any) -> pd.DataFrame:
    """`read_table(...)` as a pandas DataFrame."""
    return read_table(path, **kwargs).to_pandas()


def write_pandas(df: pd.DataFrame, path: str | Path, *, key: str, **kwargs: Any) -> None:
    """Write a pandas DataFrame (index dropped) like `write_table`."""
    import pyarrow as pa

    write_table(pa.Table.from_pandas(df, preserve_index=False), path, key=key, **kwargs)
