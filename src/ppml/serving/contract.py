"""What a serving deployment's processes agree on: the `up` process, the front end and the workers.

- The environment variables whose *names* the children read (their values change per start, so
  they stay out of the measured command line): `REDIS_PORT_ENV`, `LISTEN_FD_ENV`,
  `READY_FD_ENV`.
- Readiness: a worker writes `READY_LINE` to the pipe inherited as ``$PPML_SERVING_READY_FD``
  once it serves (`signal_ready`); the front end is ready when its ``/healthz`` answers.
- The key bundle a development child (no TEE) reads on stdin: ``{"keys": [{"wrapped": <wrapped
  key text>, "key": <base64>}, ...]}`` (`key_bundle`, `read_key_bundle`).
- How to reach the queue: `QueueConfig`, its secrets read from files (`read_secret_file`), and
  `open_queue` / `open_async_client`.
- The model as the front end serves it: `ModelInfo`, passed as one ``--model-info`` JSON (with
  the deployment's image settings, `ppml.serving.image.ImageSpec`, when it takes images).
- The one grammar of shapes: sizes separated by commas, ``*`` for a dynamic one
  (`parse_shape`, `format_shape`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

import numpy as np

from ppml import names
from ppml.crypto.envelope import DataKey, DataKeyProvider, WrappedKey
from ppml.data.secret_file import read_secret_file
from ppml.errors import ConfigurationError, KeyAccessError, UsageError
from ppml.serving.image import ImageSpec

if TYPE_CHECKING:
    import redis.asyncio

    from ppml.serving.queue import ServingQueue

__all__ = [
    "LISTEN_FD_ENV",
    "NUMERIC_KINDS",
    "READY_FD_ENV",
    "READY_LINE",
    "REDIS_PORT_ENV",
    "ModelInfo",
    "QueueConfig",
    "StaticKeyProvider",
    "add_queue_arguments",
    "child_key_provider",
    "format_shape",
    "key_bundle",
    "open_async_client",
    "open_queue",
    "parse_shape",
    "queue_config",
    "read_key_bundle",
    "read_secret_file",
    "redis_options",
    "signal_ready",
]

REDIS_PORT_ENV: Final = "PPML_SERVING_REDIS_PORT"
LISTEN_FD_ENV: Final = "PPML_SERVING_LISTEN_FD"
READY_FD_ENV: Final = "PPML_SERVING_READY_FD"
READY_LINE: Final = b"ready\n"
NUMERIC_KINDS: Final = "biuf"  # bool, signed, unsigned, float: what a JSON number list may become
_DYNAMIC: Final = ("*", "?", "-1", "None")
_MAX_BUNDLE: Final = 64 * 1024


# -- shapes ---------------------------------------------------------------------------------------


def parse_shape(value: str | Sequence[Any]) -> tuple[int | None, ...]:
    """``"3,*,*"`` or ``[3, "*", null]`` as ``(3, None, None)``; ``*`` (also ``?``, ``-1``,
    ``None``) is a dynamic size; ``""`` and ``"-"`` are the empty shape."""
    if isinstance(value, str):
        if value.strip() in ("", "-"):
            return ()
        items: Sequence[Any] = value.split(",")
    else:
        items = value
    try:
        return tuple(None if d is None or str(d).strip() in _DYNAMIC else int(d) for d in items)
    except (TypeError, ValueError):
        raise UsageError(
            "a shape is comma-separated sizes, '*' for a dynamic one: 3,224,224"
        ) from None


def format_shape(shape: Sequence[int | None], sep: str = ",") -> str:
    """The sizes of `shape` joined by `sep`, ``*`` for a dynamic one (`parse_shape` reads it)."""
    return sep.join("*" if d is None else str(d) for d in shape)


# -- the model as served --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A served model as clients see it: one input of a fixed shape and dtype (None in the shape
    means any size on that axis), and the names of its outputs. The workers describe their model
    with the same facts. `image`: how the deployment turns an image file into that input (None:
    it takes no images)."""

    name: str
    input_shape: tuple[int | None, ...]
    dtype: str = "float32"
    output_names: tuple[str, ...] = ("output",)
    image: ImageSpec | None = None

    def __post_init__(self) -> None:
        names.MODEL.check(self.name)
        object.__setattr__(self, "input_shape", tuple(self.input_shape))
        object.__setattr__(self, "output_names", tuple(self.output_names))
        if any(d is not None and (not isinstance(d, int) or d < 1) for d in self.input_shape):
            raise UsageError("input_shape holds positive integers or None")
        try:
            dtype = np.dtype(self.dtype)
        except TypeError:
            raise UsageError(f"unknown dtype {self.dtype!r}") from None
        if dtype.kind not in NUMERIC_KINDS:
            raise UsageError("a model input must be numeric (bool, int, uint or float)")
        object.__setattr__(self, "dtype", dtype.name)
        if not self.output_names:
            raise UsageError("a model has at least one output")
        if self.image is not None:
            self.image.check_model(self.input_shape, self.dtype)

    @classmethod
    def from_model(cls, model: Any) -> ModelInfo:
        """The facts of a loaded `ppml.serving.model.Model` (its input shape without the batch
        dimension)."""
        return cls(
            name=model.name,
            input_shape=tuple(model.input_shape[1:]),
            dtype=np.dtype(model.input_dtype).name,
            output_names=tuple(model.output_names),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "dtype": self.dtype,
            "output_names": list(self.output_names),
        }
        if self.image is not None:  # absent otherwise: a numeric model's text is unchanged
            out["image"] = self.image.to_dict()
        return out

    def to_json(self) -> str:
        """The ``--model-info`` argument: compact and canonical (the front end's command line is
        measured, so the same model gives the same text)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ModelInfo:
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or set(data) - {*cls.__dataclass_fields__}:
                raise ValueError
            return cls(
                name=str(data["name"]),
                input_shape=parse_shape(data["input_shape"]),
                dtype=str(data.get("dtype", "float32")),
                output_names=tuple(str(n) for n in data.get("output_names", ("output",))),
                image=ImageSpec.from_dict(data["image"]) if data.get("image") else None,
            )
        except (ValueError, KeyError, TypeError):
            raise UsageError(
                'a model info is JSON: {"name", "input_shape", "dtype", "output_names", "image"?}'
            ) from None


# -- the key bundle of a development child --------------------------------------------------------


class StaticKeyProvider:
    """A `DataKeyProvider` that knows a fixed set of unwrapped data keys (and makes none)."""

    def __init__(self, keys: Mapping[WrappedKey, bytes]) -> None:
        self._keys = dict(keys)

    def __repr__(self) -> str:
        return f"StaticKeyProvider({len(self._keys)} keys)"

    def generate_data_key(self, key_name: str) -> DataKey:
        raise KeyAccessError("this process was given keys to read with, not to write with")

    def unwrap(self, wrapped: WrappedKey) -> bytes:
        try:
            return self._keys[wrapped]
        except KeyError:
            raise KeyAccessError("this process was not given that data key") from None


def key_bundle(keys: Mapping[WrappedKey, bytes]) -> bytes:
    """What `ppml serving up` writes on a development child's stdin (`read_key_bundle`)."""
    items = [{"wrapped": w.to_text(), "key": base64.b64encode(k).decode()} for w, k in keys.items()]
    return json.dumps({"keys": items}).encode()


def read_key_bundle(stream: IO[bytes]) -> StaticKeyProvider:
    """The provider for the key bundle `ppml serving up` writes on a child's stdin."""
    data = stream.read(_MAX_BUNDLE + 1)
    try:
        if len(data) > _MAX_BUNDLE:
            raise ValueError
        items = json.loads(data)["keys"]
        keys = {
            WrappedKey.from_text(str(i["wrapped"])): base64.b64decode(str(i["key"]), validate=True)
            for i in items
        }
    except (ValueError, KeyError, TypeError):
        raise ConfigurationError("no valid key bundle on stdin (--keys-from-stdin)") from None
    return StaticKeyProvider(keys)


def child_key_provider(keys_from_stdin: bool) -> DataKeyProvider:
    """A child's key provider: the bundle on stdin (development), else the attested one."""
    import sys

    if keys_from_stdin:
        return read_key_bundle(sys.stdin.buffer)
    from ppml.api import key_provider

    return key_provider()


def signal_ready() -> None:
    """Tell `ppml serving up` that this process serves (when it was given a ready pipe)."""
    fd_text = os.environ.get(READY_FD_ENV)
    if not fd_text:
        return
    with contextlib.suppress(ValueError, OSError):
        fd = int(fd_text)
        try:
            os.write(fd, READY_LINE)
        finally:
            os.close(fd)


# -- the queue ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """How to reach the deployment's queue. The secrets are files, never argv or environment:
    each is either ppml-encrypted (opened through the key provider, so released by the KMS
    after attestation) or a plain file that only its owner may read."""

    deployment: str
    redis_host: str = "127.0.0.1"
    redis_port: int = 6379
    redis_ca: Path | None = None  # TLS with this CA (host name checked); None: no TLS
    redis_password_file: Path | None = None
    payload_key_file: Path | None = None  # the deployment's 32-byte payload key
    max_deliveries: int | None = 5


def open_queue(config: QueueConfig, provider: DataKeyProvider) -> ServingQueue:
    """The real queue: a Redis client (TLS when `redis_ca`) and the deployment's codec."""
    import redis

    from ppml.data.payload import KEY_BYTES, PayloadCodec
    from ppml.serving.queue import ServingQueue

    if config.payload_key_file is None:
        raise UsageError("the worker needs the deployment's payload key (--payload-key-file)")
    key = read_secret_file(config.payload_key_file, provider)
    if len(key) != KEY_BYTES:
        raise UsageError(f"the payload key must be {KEY_BYTES} bytes", path=config.payload_key_file)
    client = redis.Redis(**redis_options(config, provider))
    return ServingQueue(
        client,
        deployment=config.deployment,
        codec=PayloadCodec(key, config.deployment),
        max_deliveries=config.max_deliveries,
    )


def open_async_client(
    config: QueueConfig, provider: DataKeyProvider, *, max_connections: int = 128
) -> redis.asyncio.Redis:
    """An asyncio Redis client connected as `open_queue`'s (for `ServingQueue.asynchronous`),
    with at most `max_connections` connections: beyond that, a burst of calls waits for a free
    one instead of opening (and TLS-handshaking) still more."""
    import redis.asyncio

    options = redis_options(config, provider)
    connection_class: Any = redis.asyncio.Connection
    if options.pop("ssl", False):
        connection_class = redis.asyncio.SSLConnection
    pool = redis.asyncio.BlockingConnectionPool(
        max_connections=max_connections,
        timeout=options["socket_timeout"],
        connection_class=connection_class,
        **options,
    )
    return redis.asyncio.Redis(connection_pool=pool)


def redis_options(config: QueueConfig, provider: DataKeyProvider) -> dict[str, Any]:
    """The keyword arguments of a Redis client for `config`: host, port, the password (read
    from its file through `provider`), TLS checked against `redis_ca` (host name included)."""
    password: str | None = None
    if config.redis_password_file is not None:
        password = read_secret_file(config.redis_password_file, provider).decode().strip()
    options: dict[str, Any] = {
        "host": config.redis_host,
        "port": config.redis_port,
        "password": password,
        "socket_timeout": 30.0,
        "socket_connect_timeout": 10.0,
        "health_check_interval": 30,
    }
    if config.redis_ca is not None:
        options.update(
            ssl=True,
            ssl_ca_certs=str(config.redis_ca),
            ssl_cert_reqs="required",
            ssl_check_hostname=True,
        )
    return options


def add_queue_arguments(parser: Any) -> None:
    """The queue options both children take (`queue_config` reads them back)."""
    parser.add_argument("--deployment", required=True, help="the deployment (queue) name")
    parser.add_argument("--redis-host", default="127.0.0.1")
    parser.add_argument(
        "--redis-port",
        type=int,
        default=int(os.environ.get(REDIS_PORT_ENV) or 6379),
        help=f"default: ${REDIS_PORT_ENV}, else 6379 (a variable, so that a port chosen at "
        "start-up does not change an attested process's measurement)",
    )
    parser.add_argument("--redis-password-file", type=Path)
    parser.add_argument("--payload-key-file", type=Path, required=True)


def queue_config(args: Any, *, max_deliveries: int | None = 5) -> QueueConfig:
    """The `QueueConfig` of parsed `add_queue_arguments` options (and ``--redis-ca``)."""
    return QueueConfig(
        deployment=args.deployment,
        redis_host=args.redis_host,
        redis_port=args.redis_port,
        redis_ca=args.redis_ca,
        redis_password_file=args.redis_password_file,
        payload_key_file=args.payload_key_file,
        max_deliveries=max_deliveries,
    )
