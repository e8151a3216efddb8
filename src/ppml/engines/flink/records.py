"""Sealed text records in a Redis stream: what Flink's Redis source reads and its sink writes.

An entry holds two fields: ``id`` (a record id) and ``payload``, the record's UTF-8 text sealed
with the serving queue's codec (`ppml.data.payload`: AES-256-GCM under the deployment's payload
key, bound to the deployment, the record id and the direction). This module needs no PyFlink:
producers and consumers outside Flink use `append_records` and `read_records`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ppml.crypto.envelope import DataKeyProvider
from ppml.data.payload import KEY_BYTES, PayloadCodec
from ppml.data.secret_file import read_secret_file
from ppml.errors import IntegrityError, UsageError

__all__ = ["RedisStream", "append_records", "open_record", "read_records", "seal_record"]


@dataclass(frozen=True, slots=True)
class RedisStream:
    """A Redis stream of sealed records: where it is, and the files holding its secrets (the
    payload key, and the Redis password when there is one: ppml-encrypted or 0600)."""

    stream: str
    deployment: str
    payload_key_file: Path
    host: str = "127.0.0.1"
    port: int = 6379
    ca: Path | None = None  # TLS, checked against this CA
    password_file: Path | None = None

    def connect(self, keys: DataKeyProvider) -> tuple[Any, PayloadCodec]:
        import redis

        key = read_secret_file(self.payload_key_file, keys)
        if len(key) != KEY_BYTES:
            raise UsageError(
                f"the payload key must be {KEY_BYTES} bytes", path=self.payload_key_file
            )
        options: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "socket_timeout": 30.0,
            "socket_connect_timeout": 10.0,
        }
        if self.password_file is not None:
            options["password"] = read_secret_file(self.password_file, keys).decode().strip()
        if self.ca is not None:
            options.update(
                ssl=True,
                ssl_ca_certs=str(self.ca),
                ssl_cert_reqs="required",
                ssl_check_hostname=True,
            )
        return redis.Redis(**options), PayloadCodec(key, self.deployment)


def seal_record(codec: PayloadCodec, record_id: str, text: str) -> bytes:
    """A text record sealed for a stream (request direction, bound to `record_id`)."""
    return codec.seal(record_id, "request", np.array(text))


def open_record(codec: PayloadCodec, record_id: str, blob: bytes) -> str:
    value = codec.open(record_id, "request", blob)
    if value.dtype.kind != "U" or value.ndim != 0:
        raise IntegrityError()
    return str(value)


def append_records(
    target: RedisStream, keys: DataKeyProvider, records: Iterable[str], *, batch: int = 500
) -> int:
    """Seal and append `records` to `target`'s stream; how many were appended."""
    client, codec = target.connect(keys)
    count = 0
    try:
        pipe = client.pipeline(transaction=False)
        for text in records:
            record_id = uuid.uuid4().hex
            sealed = seal_record(codec, record_id, text)
            pipe.xadd(target.stream, {"id": record_id, "payload": sealed})
            count += 1
            if count % batch == 0:
                pipe.execute()
        pipe.execute()
    finally:
        client.close()
    return count


def read_records(source: RedisStream, keys: DataKeyProvider) -> Iterator[str]:
    """Every record of `source`'s stream, opened (an entry that does not open fails)."""
    client, codec = source.connect(keys)
    try:
        last = "0"
        while True:
            read = client.xread({source.stream: last}, count=1000)
            if not read:
                return
            for _name, entries in read:
                for entry_id, fields in entries:
                    yield open_record(codec, fields[b"id"].decode(), fields[b"payload"])
                    last = entry_id.decode()
    finally:
        client.close()
