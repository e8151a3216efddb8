"""PyFlink over encrypted data: ``from ppml.flink import read_encrypted_files, ...``.

For jobs run by ``ppml flink run`` (in Flink's own Python environment, see ``ppml flink setup``):
encrypted files and sealed Redis streams as sources and sinks, with data keys served to the
operators by the job's key relay (`ppml.engines.flink.relay`).
"""

from __future__ import annotations

from ppml.engines.flink.streams import (
    RedisStream,
    job_keys,
    read_encrypted_files,
    read_redis_stream,
    write_encrypted_files,
    write_redis_stream,
)

__all__ = [
    "RedisStream",
    "job_keys",
    "read_encrypted_files",
    "read_redis_stream",
    "write_encrypted_files",
    "write_redis_stream",
]
