"""The master key's part in the KMS: the keys derived from it and what is computed with them.

One HKDF-SHA256 derivation per purpose: wrapping key-encryption keys (AES-GCM, bound to the key
name and version), the check value that tells whether a master key opens a key store, the audit
log's chain, the MACs of stored release rules, and the authenticated state record.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as _pyca_hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ppml._internal.canonical import canonical_json
from ppml.crypto.envelope import seal, unseal
from ppml.errors import ConfigurationError

if TYPE_CHECKING:
    from ppml.kms.policy import Rule

__all__ = ["MASTER_KEY_BYTES", "MasterKey", "derive", "kek_aad"]

MASTER_KEY_BYTES: Final = 32
KEK_WRAP_INFO: Final = b"ppml/kms/kek-wrap/v1"
AUDIT_INFO: Final = b"ppml/kms/audit/v1"
CHECK_INFO: Final = b"ppml/kms/master-check/v1"
POLICY_INFO: Final = b"ppml/kms/release-policy/v1"
STATE_INFO: Final = b"ppml/kms/state/v1"
_CHECK_LABEL = b"ppml/kms/master-check/v1\x00"
_RULE_MAC_LABEL = b"ppml/kms/release-rule/v1\x00"


def derive(master_key: bytes, info: bytes) -> bytes:
    """The 32-byte key for purpose `info` (HKDF-SHA256, no salt)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master_key)


def kek_aad(name: str, version: int) -> bytes:
    """What a wrapped key-encryption key is bound to: its key's name and version."""
    return b"ppml/kek/v1\x00" + name.encode() + b"\x00" + version.to_bytes(4, "big")


def _hmac(key: bytes, *parts: bytes) -> bytes:
    h = _pyca_hmac.HMAC(key, hashes.SHA256())
    for part in parts:
        h.update(part)
    return h.finalize()


class MasterKey:
    """The keys derived from one master key. `audit_key` and `state_key` are handed to the audit
    log and the state record; the others never leave this object."""

    __slots__ = ("_check_key", "_kek_wrap_key", "_policy_key", "audit_key", "state_key")

    def __init__(self, master_key: bytes) -> None:
        if not isinstance(master_key, bytes) or len(master_key) != MASTER_KEY_BYTES:
            raise ConfigurationError(f"the master key must be {MASTER_KEY_BYTES} bytes")
        self._kek_wrap_key = derive(master_key, KEK_WRAP_INFO)
        self._check_key = derive(master_key, CHECK_INFO)
        self._policy_key = derive(master_key, POLICY_INFO)
        self.audit_key = derive(master_key, AUDIT_INFO)
        self.state_key = derive(master_key, STATE_INFO)

    def __repr__(self) -> str:
        return "MasterKey(...)"

    def check_value(self, store_id: bytes) -> bytes:
        """The value a key store keeps to tell whether a master key opens it."""
        return _hmac(self._check_key, _CHECK_LABEL + store_id)

    def rule_mac(self, store_id: bytes, key_name: str, rule: Rule) -> bytes:
        """The MAC a stored rule carries: binds the store, the key name and every field."""
        return _hmac(
            self._policy_key,
            _RULE_MAC_LABEL + store_id,
            canonical_json({"key": key_name, **rule.to_dict()}),
        )

    def seal_kek(self, name: str, version: int, kek: bytes, *, nonce: bytes) -> bytes:
        """A key-encryption key wrapped for storage under key `name` version `version`."""
        return seal(self._kek_wrap_key, kek, kek_aad(name, version), nonce=nonce)

    def open_kek(self, name: str, version: int, blob: bytes) -> bytes:
        """The key-encryption key in `blob`; `IntegrityError` if it fails authentication."""
        return unseal(self._kek_wrap_key, blob, kek_aad(name, version))
