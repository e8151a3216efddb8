"""The PME adapter: pyarrow's Parquet Modular Encryption, with keys from a ppml `DataKeyProvider`.

pyarrow generates the Parquet data keys itself and asks a KMS client to wrap its key-encryption
key under a "master key"; here the master key identifier is a ppml named key, and each wrap asks
the provider for a fresh ppml data key (``generate_data_key``) that seals pyarrow's key, each
unwrap asks the provider to ``unwrap`` it -- so the `DataKeyProvider` interface stays as it is,
and every key use still goes through the KMS, which audits it and can gate it per named key.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import logging
import secrets
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet.encryption as pe

from ppml.crypto.envelope import DataKeyProvider, WrappedKey, seal, unseal, validate_key_name
from ppml.errors import ConfigurationError, IntegrityError, PPMLError

if TYPE_CHECKING:
    import pyarrow.dataset as ds

__all__ = [
    "ALGORITHM",
    "KeySession",
    "PPMLKmsClient",
    "encryption_configuration",
    "key_unwrapper",
    "locate",
    "parse_wrapped",
]

ALGORITHM = "AES_GCM_V1"
"""Every module (pages, page headers, column and file metadata) is AES-GCM authenticated."""

_log = logging.getLogger(__name__)

# The key caches live in a CryptoFactory created for one operation and cleared when it ends, so
# this lifetime bounds only how long a single long read or write may reuse an unwrapped key.
_CACHE_LIFETIME = dt.timedelta(minutes=10)
_DATA_KEY_BITS = 256
_KMS_INSTANCE_ID = "ppml"

# Binds pyarrow's key-encryption key to the ppml wrapped data key that seals it.
_KEK_AAD_PREFIX = b"ppml/parquet-kek/v1\x00"
_WRAP_SEPARATOR = ";"


def key_unwrapper(provider: DataKeyProvider) -> PPMLKmsClient:
    """The provider as Parquet's key tools see it: ``unwrap_key(wrapped text, master key id)``
    unwraps a key-encryption key, once per wrapped key (cached until ``forget()``)."""
    return PPMLKmsClient(provider)


def locate(exc: BaseException, path: Path) -> BaseException:
    if isinstance(exc, IntegrityError):
        return IntegrityError(path=path)
    if isinstance(exc, PPMLError) and exc.path is None:
        exc.path = str(path)
    return exc


class PPMLKmsClient(pe.KmsClient):
    """pyarrow's view of the provider: a "master key" is a ppml named key (current version).

    wrap_key seals pyarrow's key with a fresh ppml data key and returns the wrapped data key with
    the sealed bytes; unwrap_key has the provider unwrap that data key. Errors raised here cross
    pyarrow's C++ layer, which may re-wrap them, so the first one is kept to be re-raised as is.

    Unwrapped keys are kept for the life of the client (one operation), keyed by the exact
    wrapped text, so the provider sees one unwrap per wrapped key -- per named key and file --
    however many row groups, column chunks or scan threads ask for it. pyarrow may call from
    several threads at once: a key being unwrapped is waited for, not unwrapped twice.
    """

    def __init__(self, provider: DataKeyProvider) -> None:
        super().__init__()
        self._provider = provider
        self.failure: BaseException | None = None
        self._lock = threading.Lock()
        self._unwrapped: dict[tuple[str, str], bytes] = {}
        self._in_flight: dict[tuple[str, str], threading.Lock] = {}

    def wrap_key(self, key_bytes: bytes, master_key_identifier: str) -> str:
        try:
            data_key = self._provider.generate_data_key(validate_key_name(master_key_identifier))
            wrapped_text = data_key.wrapped.to_text()
            sealed = seal(data_key.plaintext, key_bytes, _KEK_AAD_PREFIX + wrapped_text.encode())
            return wrapped_text + _WRAP_SEPARATOR + base64.urlsafe_b64encode(sealed).decode()
        except BaseException as exc:
            self._record(exc)
            raise

    # The stub says str, but a str would be UTF-8 encoded by pyarrow: raw key bytes are right.
    def unwrap_key(  # type: ignore[override]
        self, wrapped_key: str, master_key_identifier: str
    ) -> bytes:
        entry = (wrapped_key, master_key_identifier)
        with self._lock:
            known = self._unwrapped.get(entry)
            if known is not None:
                return known
            gate = self._in_flight.setdefault(entry, threading.Lock())
        with gate:
            with self._lock:
                known = self._unwrapped.get(entry)
            if known is not None:
                return known
            key = self._unwrap(wrapped_key, master_key_identifier)
            with self._lock:
                self._unwrapped[entry] = key
                self._in_flight.pop(entry, None)
            return key

    def _unwrap(self, wrapped_key: str, master_key_identifier: str) -> bytes:
        try:
            wrapped, sealed = parse_wrapped(wrapped_key, master_key_identifier)
            data_key = self._provider.unwrap(wrapped)
            aad = _KEK_AAD_PREFIX + wrapped_key.rsplit(_WRAP_SEPARATOR, 1)[0].encode()
            return unseal(data_key, sealed, aad)
        except BaseException as exc:
            self._record(exc)
            raise

    def unwrapped(self) -> list[tuple[tuple[str, str], bytes]]:
        """Every key unwrapped so far, as ((wrapped text, master key id), key)."""
        with self._lock:
            return list(self._unwrapped.items())

    def forget(self) -> None:
        """Drop every unwrapped key."""
        with self._lock:
            self._unwrapped.clear()
            self._in_flight.clear()

    def _record(self, exc: BaseException) -> None:
        with self._lock:
            if self.failure is None:
                self.failure = exc


def parse_wrapped(text: str, master_key_identifier: str) -> tuple[WrappedKey, bytes]:
    """Split ``ppml1:NAME:VERSION:B64;B64`` and check it names the expected master key."""
    parts = text.split(_WRAP_SEPARATOR)
    if len(parts) != 2:
        raise IntegrityError()
    wrapped = WrappedKey.from_text(parts[0])
    if wrapped.key_name != master_key_identifier:
        raise IntegrityError()
    try:
        sealed = base64.urlsafe_b64decode(parts[1].encode())
    except (ValueError, binascii.Error):
        raise IntegrityError() from None
    return wrapped, sealed


class KeySession:
    """One read or write: its own CryptoFactory, KMS client and caches, dropped at the end.

    A fresh factory and a random access token per operation mean that no unwrapped key is shared
    between operations, workspaces or providers.
    """

    def __init__(self, provider: DataKeyProvider, path: Path) -> None:
        self._path = path
        self._client = PPMLKmsClient(provider)
        client = self._client
        self._factory = pe.CryptoFactory(lambda _config: client)
        self._connection = pe.KmsConnectionConfig(
            kms_instance_id=_KMS_INSTANCE_ID, key_access_token=secrets.token_hex(16)
        )

    def __enter__(self) -> KeySession:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._factory.remove_cache_entries_for_all_tokens()
        self._client.forget()

    @property
    def failure(self) -> BaseException | None:
        """The provider's first error in this session, if any."""
        return self._client.failure

    def released_key_encryption_keys(self) -> dict[tuple[str, str], bytes]:
        return {(master, wrapped): key for (wrapped, master), key in self._client.unwrapped()}

    def unwrap_key(self, wrapped_key: str, master_key_identifier: str) -> bytes:
        """The session's client's unwrap (cached per wrapped key; the provider's error kept)."""
        return self._client.unwrap_key(wrapped_key, master_key_identifier)

    def dataset_format(self) -> ds.ParquetFileFormat:
        """A pyarrow dataset format that decrypts with this session's keys."""
        import pyarrow.dataset as ds

        config = pe.DecryptionConfiguration(cache_lifetime=_CACHE_LIFETIME)
        # The stub types the third argument as an EncryptionConfiguration; it is the decryption one.
        decryption = ds.ParquetDecryptionConfig(
            self._factory,
            self._connection,
            config,  # type: ignore[arg-type]
        )
        options = ds.ParquetFragmentScanOptions(decryption_config=decryption)
        return ds.ParquetFileFormat(default_fragment_scan_options=options)

    def encryption_properties(self, config: pe.EncryptionConfiguration) -> Any:
        return self._factory.file_encryption_properties(self._connection, config)

    def decryption_properties(self) -> Any:
        config = pe.DecryptionConfiguration(cache_lifetime=_CACHE_LIFETIME)
        return self._factory.file_decryption_properties(self._connection, config)

    @contextlib.contextmanager
    def guard(self, *, decrypting: bool) -> Iterator[None]:
        """Re-raise the provider's own error; when decrypting, any other failure is tampering."""
        try:
            yield
        except PPMLError as exc:
            raise self._located(self._client.failure or exc) from None
        except (OSError, pa.ArrowException) as exc:
            if self._client.failure is not None:
                raise self._located(self._client.failure) from None
            if not decrypting:
                raise
            _log.debug("parquet decryption failed for %s: %s", self._path, exc)
            raise IntegrityError(path=self._path) from None

    def _located(self, exc: BaseException) -> BaseException:
        return locate(exc, self._path)


_MIN_WRITE_PYARROW = 18


def encryption_configuration(
    key_name: str, groups: Mapping[str, list[str]]
) -> pe.EncryptionConfiguration:
    if int(pa.__version__.split(".")[0]) < _MIN_WRITE_PYARROW:
        # Older pyarrow (Flink's environment has 16) writes columns not named with a key in
        # the clear and has no uniform encryption: refuse rather than write that.
        raise ConfigurationError(
            f"writing encrypted Parquet needs pyarrow {_MIN_WRITE_PYARROW} or later (this "
            f"environment has {pa.__version__}); reading works with it"
        )
    # One named key for everything: uniform encryption, one data key for the footer and every
    # column (column metadata then sits inside the encrypted footer instead of being encrypted
    # again per column chunk: smaller footers, one key to unwrap per file).
    uniform = set(groups) == {key_name}
    keys: dict[str, str | list[str]] = {} if uniform else dict(groups)
    return pe.EncryptionConfiguration(
        footer_key=key_name,
        column_keys=keys,
        uniform_encryption=uniform,  # type: ignore[call-arg]  # missing from the stubs
        encryption_algorithm=ALGORITHM,
        plaintext_footer=False,
        # pyarrow wraps its data keys with its own key-encryption key per named key, so the
        # provider is called once per named key and file, not once per column.
        double_wrapping=True,
        cache_lifetime=_CACHE_LIFETIME,
        internal_key_material=True,
        data_key_length_bits=_DATA_KEY_BITS,
    )
