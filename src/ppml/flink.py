"""PyFlink over encrypted data: ``from ppml.flink import read_encrypted_files, ...``.

For jobs run by ``ppml flink run`` (in Flink's own Python environment, see ``ppml flink setup``):
encrypted files and sealed Redis streams as sources and sinks, with data keys served to the
operators by the job's key relay (`ppml.engines.flink.relay`). `RedisStream`, `append_records`
and `read_records` need no PyFlink (to feed a job's stream, or read what it wrote, from elsewhere).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ppml.engines.flink.records import RedisStream, append_records, read_records
    from ppml.engines.flink.streams import (
        job_keys,
        read_encrypted_files,
        read_encrypted_parquet,
        read_redis_stream,
        write_encrypted_files,
        write_redis_stream,
    )

__all__ = [
    "RedisStream",
    "append_records",
    "job_keys",
    "read_encrypted_files",
    "read_encrypted_parquet",
    "read_records",
    "read_redis_stream",
    "write_encrypted_files",
    "write_redis_stream",
]

_HOMES = {
    "RedisStream": "ppml.engines.flink.records",
    "append_records": "ppml.engines.flink.records",
    "read_records": "ppml.engines.flink.records",
    "job_keys": "ppml.engines.flink.streams",
    "read_encrypted_files": "ppml.engines.flink.streams",
    "read_encrypted_parquet": "ppml.engines.flink.streams",
    "read_redis_stream": "ppml.engines.flink.streams",
    "write_encrypted_files": "ppml.engines.flink.streams",
    "write_redis_stream": "ppml.engines.flink.streams",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'ppml.flink' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
