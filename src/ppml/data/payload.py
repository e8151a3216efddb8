"""Sealing serving payloads (request inputs, result outputs, result errors) for the Redis queue.

A sealed payload is::

    version (1 byte, 1) | mode (1 byte: 1 = AES-256-GCM, 0 = plaintext baseline)
    | nonce (12 random bytes, AES-GCM mode only) | AES-GCM(body) (ciphertext and 16-byte tag)

The associated data binds the two header bytes, the deployment, the request id, the direction
("request" or "result") and the model name (requests carry theirs; results bind the empty
name), each length-prefixed, so that a payload moved to another request, deployment, direction or
model, or altered in any byte, fails to open with the opaque `IntegrityError`.

The body is ``kind (1 byte: 0 = array, 1 = error text, 2 = encoded image)`` followed, for an
array, by ``dtype length (u16) | dtype str (e.g. "<f4") | ndim (u8) | ndim x u64 dims | raw
C-order bytes``, for an error, by its UTF-8 text and, for an encoded image (a request input
only: the client's PNG/JPEG/... file, decoded by the worker), by its bytes as they are. Only
plain numeric, boolean, bytes and str dtypes are accepted (never object or structured dtypes):
nothing is ever unpickled, and the byte count is checked against the shape before any array is
made.

`PayloadCodec.plaintext` gives the same framing with no encryption and no binding at all: it is
the benchmark's plaintext baseline only, and an AES-GCM codec refuses its payloads.
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, NoReturn

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ppml import names
from ppml.errors import IntegrityError, UsageError

__all__ = [
    "KEY_BYTES",
    "Direction",
    "EncodedImage",
    "PayloadCodec",
    "validate_deployment",
    "validate_model",
    "validate_request_id",
]

Direction = Literal["request", "result"]
KEY_BYTES: Final = 32
_VERSION: Final = 1
_MODE_PLAIN: Final = 0
_MODE_AESGCM: Final = 1
_NONCE: Final = 12
_TAG: Final = 16
_AAD_LABEL: Final = b"ppml/serving/payload/v1\x00"
_KIND_ARRAY: Final = 0
_KIND_ERROR: Final = 1
_KIND_IMAGE: Final = 2
_MAX_NDIM: Final = 32
_MAX_ERROR: Final = 4096
_DIRECTIONS: Final = ("request", "result")

_DTYPE = re.compile(r"[<>|=][biufcSU][0-9]{1,4}")


def validate_deployment(name: str) -> str:
    """Deployment names: 1-64 lower-case letters, digits, '.', '_', '-', starting alphanumeric
    (they appear in Redis key names, so no ':', spaces or glob characters)."""
    return names.DEPLOYMENT.check(name)


def validate_request_id(request_id: str) -> str:
    """Request ids in the queue: 1-160 ASCII letters, digits, '.', '_', '-', starting
    alphanumeric (a client's id of at most 128, behind its client's tag; a UUID fits)."""
    return names.QUEUE_ID.check(request_id)


def validate_model(model: str) -> str:
    """Model names: 1-128 ASCII letters, digits and '.', '_', ':', '@', '+', '-'."""
    return names.MODEL.check(model)


def _check_direction(direction: str) -> Direction:
    if direction not in _DIRECTIONS:
        raise UsageError(f"direction must be 'request' or 'result', not {direction!r}")
    return direction  # type: ignore[return-value]


def _field(value: str) -> bytes:
    raw = value.encode("utf-8")
    return struct.pack(">H", len(raw)) + raw


# -- the body: one array, an error text or an encoded image ----------------------------------------


@dataclass(frozen=True, slots=True)
class EncodedImage:
    """A request input that is an image file's bytes (PNG, JPEG, ...), not yet decoded: the
    worker decodes and preprocesses it with its deployment's settings."""

    data: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.data, bytes) or not self.data:
            raise UsageError("an encoded image is non-empty bytes")

    def __repr__(self) -> str:  # never the content
        return f"EncodedImage({len(self.data)} bytes)"


def _encode_input(value: np.ndarray | EncodedImage) -> bytes:
    if isinstance(value, EncodedImage):
        return struct.pack(">B", _KIND_IMAGE) + value.data
    return _encode_array(value)


def _encode_array(array: np.ndarray) -> bytes:
    if not isinstance(array, np.ndarray):
        raise UsageError(f"a payload must be a numpy array, not {type(array).__name__}")
    dtype = array.dtype
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise UsageError(f"arrays of dtype {dtype} cannot be sent: use a numeric dtype")
    if not _DTYPE.fullmatch(dtype.str):
        raise UsageError(f"arrays of dtype {dtype} cannot be sent: use a numeric dtype")
    if array.ndim > _MAX_NDIM:
        raise UsageError(f"arrays of more than {_MAX_NDIM} dimensions cannot be sent")
    name = dtype.str.encode("ascii")
    head = struct.pack(">BH", _KIND_ARRAY, len(name)) + name + struct.pack(">B", array.ndim)
    head += struct.pack(f">{array.ndim}Q", *array.shape)
    return head + np.ascontiguousarray(array).tobytes()


def _encode_error(message: str) -> bytes:
    if not isinstance(message, str) or not message:
        raise UsageError("an error result needs a non-empty message")
    raw = message.encode("utf-8")
    if len(raw) > _MAX_ERROR:
        raise UsageError(f"an error message may hold at most {_MAX_ERROR} bytes")
    return struct.pack(">B", _KIND_ERROR) + raw


def _decode_body(body: bytes) -> np.ndarray | str | EncodedImage:
    """Parse a body; any malformation is an `IntegrityError` (it passed authentication, or it
    is the unauthenticated plaintext baseline)."""
    try:
        kind = body[0]
        if kind == _KIND_IMAGE:
            if len(body) < 2:
                raise ValueError("empty image")
            return EncodedImage(body[1:])
        if kind == _KIND_ERROR:
            text = body[1:].decode("utf-8")
            if not text:
                raise ValueError("empty error")
            return text
        if kind != _KIND_ARRAY:
            raise ValueError("unknown kind")
        (name_len,) = struct.unpack_from(">H", body, 1)
        pos = 3
        name = body[pos : pos + name_len].decode("ascii")
        pos += name_len
        if not _DTYPE.fullmatch(name):
            raise ValueError("dtype")
        dtype = np.dtype(name)
        if dtype.hasobject or dtype.fields is not None:
            raise ValueError("dtype")
        (ndim,) = struct.unpack_from(">B", body, pos)
        pos += 1
        if ndim > _MAX_NDIM:
            raise ValueError("ndim")
        shape = struct.unpack_from(f">{ndim}Q", body, pos)
        pos += 8 * ndim
        raw = body[pos:]
        if math.prod(shape) * dtype.itemsize != len(raw):
            raise ValueError("size")
        # A copy: writable and aligned, whatever the offset of the data in the body.
        return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
    except (IndexError, ValueError, TypeError, struct.error, UnicodeDecodeError):
        raise IntegrityError() from None


class PayloadCodec:
    """Seals and opens the payloads of one deployment (see the module docstring).

    `key` is the deployment's 32-byte AES-256 key; `random` (default `os.urandom`) makes the
    96-bit nonces and can be pinned by tests. The key is never shown.
    """

    __slots__ = ("_aead", "_mode", "_random", "deployment")

    def __init__(
        self,
        key: bytes,
        deployment: str,
        *,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if not isinstance(key, bytes | bytearray) or len(key) != KEY_BYTES:
            raise UsageError(f"a deployment key must be {KEY_BYTES} bytes")
        self.deployment = validate_deployment(deployment)
        self._aead: AESGCM | None = AESGCM(bytes(key))
        self._mode = _MODE_AESGCM
        self._random = random

    @classmethod
    def plaintext(cls, deployment: str) -> PayloadCodec:
        """A codec that does NOT encrypt or authenticate: same framing, payloads in the clear.

        For the benchmark's plaintext baseline only; never for a deployment holding real data.
        Encrypting codecs refuse its payloads, and it refuses theirs.
        """
        codec = cls.__new__(cls)
        codec.deployment = validate_deployment(deployment)
        codec._aead = None
        codec._mode = _MODE_PLAIN
        codec._random = os.urandom
        return codec

    @property
    def encrypted(self) -> bool:
        """Whether payloads are sealed (False only for the plaintext baseline)."""
        return self._aead is not None

    def __repr__(self) -> str:
        kind = "AES-256-GCM" if self.encrypted else "plaintext"
        return f"PayloadCodec(deployment={self.deployment!r}, {kind})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("a PayloadCodec holds a key and cannot be pickled")

    # -- public API ----------------------------------------------------------------------------

    def seal(
        self, request_id: str, direction: Direction, array: np.ndarray, *, model: str = ""
    ) -> bytes:
        """Seal `array` for `request_id` travelling in `direction`; `model` is bound too
        (requests pass their model name, results leave it empty)."""
        return self._seal(request_id, direction, model, _encode_array(array))

    def seal_input(self, request_id: str, value: np.ndarray | EncodedImage, *, model: str) -> bytes:
        """Seal a request's input: an array, or an image file's bytes (`EncodedImage`)."""
        return self._seal(request_id, "request", model, _encode_input(value))

    def open(
        self, request_id: str, direction: Direction, blob: bytes, *, model: str = ""
    ) -> np.ndarray:
        """The array sealed by `seal` with the same arguments; `IntegrityError` otherwise
        (also when the payload holds an error text or an image rather than an array)."""
        value = self._open(request_id, direction, model, blob)
        if not isinstance(value, np.ndarray):
            raise IntegrityError()
        return value

    def open_input(self, request_id: str, blob: bytes, *, model: str) -> np.ndarray | EncodedImage:
        """A request's input sealed by `seal_input` (or `seal`); `IntegrityError` otherwise."""
        value = self._open(request_id, "request", model, blob)
        if isinstance(value, str):
            raise IntegrityError()
        return value

    def seal_error(self, request_id: str, message: str) -> bytes:
        """Seal an error text as the result of `request_id` (shown to the client: keep it free
        of anything secret)."""
        return self._seal(request_id, "result", "", _encode_error(message))

    def seal_result(self, request_id: str, array: np.ndarray | None, error: str | None) -> bytes:
        """Seal a result: exactly one of `array` and `error`."""
        if (array is None) == (error is None):
            raise UsageError("a result holds either an array or an error message")
        if error is not None:
            return self.seal_error(request_id, error)
        assert array is not None
        return self.seal(request_id, "result", array)

    def open_result(self, request_id: str, blob: bytes) -> tuple[np.ndarray | None, str | None]:
        """A sealed result as ``(array, None)`` or ``(None, error)``; `IntegrityError` if it
        does not open."""
        value = self._open(request_id, "result", "", blob)
        if isinstance(value, str):
            return None, value
        if isinstance(value, EncodedImage):  # images travel as requests only
            raise IntegrityError()
        return value, None

    # -- framing -------------------------------------------------------------------------------

    def _header(self) -> bytes:
        return struct.pack(">BB", _VERSION, self._mode)

    def _aad(self, header: bytes, request_id: str, direction: str, model: str) -> bytes:
        return (
            _AAD_LABEL
            + header
            + _field(self.deployment)
            + _field(request_id)
            + _field(direction)
            + _field(model)
        )

    def _seal(self, request_id: str, direction: str, model: str, body: bytes) -> bytes:
        validate_request_id(request_id)
        _check_direction(direction)
        if model:
            validate_model(model)
        header = self._header()
        if self._aead is None:
            return header + body
        nonce = self._random(_NONCE)
        if len(nonce) != _NONCE:
            raise ValueError("the random source returned a nonce of the wrong length")
        aad = self._aad(header, request_id, direction, model)
        return header + nonce + self._aead.encrypt(nonce, body, aad)

    def _open(
        self, request_id: str, direction: str, model: str, blob: bytes
    ) -> np.ndarray | str | EncodedImage:
        validate_request_id(request_id)
        _check_direction(direction)
        if model:
            validate_model(model)
        if not isinstance(blob, bytes | bytearray | memoryview):
            raise IntegrityError()
        blob = bytes(blob)
        header = self._header()
        if blob[:2] != header:
            raise IntegrityError()
        if self._aead is None:
            return _decode_body(blob[2:])
        if len(blob) < 2 + _NONCE + _TAG:
            raise IntegrityError()
        nonce = blob[2 : 2 + _NONCE]
        aad = self._aad(header, request_id, direction, model)
        try:
            body = self._aead.decrypt(nonce, blob[2 + _NONCE :], aad)
        except InvalidTag:
            raise IntegrityError() from None
        return _decode_body(body)
