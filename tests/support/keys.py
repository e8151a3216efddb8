"""The test stand-in for a KMS: one `DataKeyProvider` over key-encryption keys held in memory.

It wraps data keys as the workspace's KMS does (AES-256-GCM under a KEK per key name and
version, bound to the name and version), so files written with it are real encrypted files. It
counts what it is asked, and a test can make it refuse keys as a release policy would, fail as
an unreachable KMS would, or answer slowly so that concurrent callers overlap. It passes the
same conformance suite as the real providers (tests/unit/test_data_key_provider_conformance.py).
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Iterable

from ppml.crypto.envelope import DATA_KEY_BYTES, DataKey, WrappedKey, dek_aad, seal, unseal
from ppml.errors import AccessDenied, KeyNotFound, KeyVersionNotFound

__all__ = ["MemoryKeyProvider"]


class MemoryKeyProvider:
    """A DataKeyProvider over KEKs held in a dict: ``{name: [kek_v1, kek_v2, ...]}``.

    - `keks`: the named keys and their versions; `rotate` adds a version.
    - ``create_on_demand``: `generate_data_key` and `rotate` make a key of a name they do not
      know instead of refusing it.
    - `calls` counts ``("generate" | "unwrap", key_name)``; `unwraps` counts unwraps per key
      name; `threads` names the threads that unwrapped. Every call counts, refused ones too.
    - `refused`: key names whose unwrap is refused with `AccessDenied` ("policy denies NAME");
      `fail_generate`: every `generate_data_key` fails with `KeyNotFound`; `failure`: every
      unwrap raises it (e.g. ``ConnectionRefusedError``, a KMS out of reach); `delay_s`: each
      unwrap that is not refused waits that long first.
    """

    def __init__(
        self,
        *names: str,
        create_on_demand: bool = False,
        refused: Iterable[str] = (),
        failure: BaseException | None = None,
        delay_s: float = 0.0,
    ) -> None:
        self.keks: dict[str, list[bytes]] = {n: [os.urandom(32)] for n in names}
        self.create_on_demand = create_on_demand
        self.calls: Counter[tuple[str, str]] = Counter()
        self.unwraps: Counter[str] = Counter()
        self.threads: set[str] = set()
        self.refused: set[str] = set(refused)
        self.fail_generate = False
        self.failure = failure
        self.delay_s = delay_s
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MemoryKeyProvider({', '.join(sorted(self.keks))})"

    def sharing_keys(self) -> MemoryKeyProvider:
        """Another client of the same keys: it unwraps what this one wraps (and sees its
        rotations), with counts and refusals of its own."""
        other = MemoryKeyProvider(create_on_demand=self.create_on_demand)
        other.keks = self.keks
        return other

    def rotate(self, name: str) -> None:
        self._versions(name).append(os.urandom(32))

    def generate_data_key(self, key_name: str) -> DataKey:
        with self._lock:
            self.calls["generate", key_name] += 1
        if self.fail_generate:
            raise KeyNotFound(f"no key named {key_name!r}")
        versions = self._versions(key_name)
        dek = os.urandom(DATA_KEY_BYTES)
        blob = seal(versions[-1], dek, dek_aad(key_name, len(versions)))
        return DataKey(dek, WrappedKey(key_name, len(versions), blob))

    def unwrap(self, wrapped: WrappedKey) -> bytes:
        with self._lock:
            self.calls["unwrap", wrapped.key_name] += 1
            self.unwraps[wrapped.key_name] += 1
            self.threads.add(threading.current_thread().name)
        if self.failure is not None:
            raise self.failure
        if wrapped.key_name in self.refused:
            raise AccessDenied(f"policy denies {wrapped.key_name}")
        if self.delay_s:
            threading.Event().wait(self.delay_s)
        versions = self.keks.get(wrapped.key_name)
        if versions is None:
            raise KeyNotFound(f"no key named {wrapped.key_name!r}")
        if wrapped.version > len(versions):
            raise KeyVersionNotFound(f"key {wrapped.key_name!r} has no version {wrapped.version}")
        return unseal(versions[wrapped.version - 1], wrapped.blob, wrapped.aad())

    def rewrap(self, wrapped: WrappedKey) -> WrappedKey:
        """`wrapped`'s data key, wrapped again by the current version of its key."""
        dek = self.unwrap(wrapped)
        versions = self._versions(wrapped.key_name)
        blob = seal(versions[-1], dek, dek_aad(wrapped.key_name, len(versions)))
        return WrappedKey(wrapped.key_name, len(versions), blob)

    def _versions(self, name: str) -> list[bytes]:
        if name not in self.keks:
            if not self.create_on_demand:
                raise KeyNotFound(f"no key named {name!r}")
            self.keks[name] = [os.urandom(32)]
        return self.keks[name]
