"""The embedded key management service: versioned named keys, data-key wrapping, and an audit log.

`KeyService` implements `ppml.crypto.envelope.DataKeyProvider`; every key operation it performs
is recorded in a hash-chained `AuditLog` in the same SQLite file.
"""

from __future__ import annotations

from ppml.kms.audit import AuditEntry, AuditLog, AuditVerification
from ppml.kms.service import KeyInfo, KeyService, KeyVersionInfo

__all__ = [
    "AuditEntry",
    "AuditLog",
    "AuditVerification",
    "KeyInfo",
    "KeyService",
    "KeyVersionInfo",
]
