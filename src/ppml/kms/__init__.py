"""The embedded key management service: versioned named keys, data-key wrapping, release
policies, the key broker, and an audit log.

`KeyService` implements `ppml.crypto.envelope.DataKeyProvider`; every key operation it performs
is recorded in a hash-chained `AuditLog` in the same SQLite file. `KeyService.policies` gives
the keys' `ReleasePolicies`; `KeyBroker` releases data keys to attested workloads whose tokens
satisfy a key's `Policy` (the values are in `ppml.kms.policy`).

The names below are imported from their modules on first use: a command that only wraps and
unwraps keys does not import the broker and, with it, the attestation layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ppml._internal.lazy import lazy_exports

if TYPE_CHECKING:
    from ppml.kms.audit import AuditEntry, AuditLog, AuditVerification
    from ppml.kms.broker import KeyBroker, ReleasedKey, TokenVerifier, open_released
    from ppml.kms.policy import (
        PRIMARY_MEASUREMENT,
        AttestedFacts,
        Decision,
        Policy,
        Reason,
        Rule,
        primary_measurement,
    )
    from ppml.kms.release_policies import ReleasePolicies
    from ppml.kms.release_policies import ReleasePolicies as PolicyStore
    from ppml.kms.service import KeyInfo, KeyService, KeyVersionInfo

__all__ = [
    "PRIMARY_MEASUREMENT",
    "AttestedFacts",
    "AuditEntry",
    "AuditLog",
    "AuditVerification",
    "Decision",
    "KeyBroker",
    "KeyInfo",
    "KeyService",
    "KeyVersionInfo",
    "Policy",
    "PolicyStore",
    "Reason",
    "ReleasePolicies",
    "ReleasedKey",
    "Rule",
    "TokenVerifier",
    "open_released",
    "primary_measurement",
]

_lazy = lazy_exports(
    __name__,
    {
        "ppml.kms.audit": ("AuditEntry", "AuditLog", "AuditVerification"),
        "ppml.kms.broker": ("KeyBroker", "ReleasedKey", "TokenVerifier", "open_released"),
        "ppml.kms.policy": (
            "PRIMARY_MEASUREMENT",
            "AttestedFacts",
            "Decision",
            "Policy",
            "Reason",
            "Rule",
            "primary_measurement",
        ),
        "ppml.kms.release_policies": ("ReleasePolicies",),
        "ppml.kms.service": ("KeyInfo", "KeyService", "KeyVersionInfo"),
    },
)


def __getattr__(name: str) -> object:
    # `PolicyStore` is the earlier name of `ReleasePolicies`, kept for the callers that use it.
    return _lazy("ReleasePolicies" if name == "PolicyStore" else name)
