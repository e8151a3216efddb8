"""Release rules as the key database stores them: each row carries a MAC under a key derived
from the master key (`MasterKey.rule_mac`), so that a rule written into the file by anyone but
the KMS is detected and denies (fail closed)."""

from __future__ import annotations

import json
import logging
import sqlite3
from hmac import compare_digest
from pathlib import Path
from typing import Any

from ppml._internal.canonical import canonical_json
from ppml.attestation.claims import TcbStatus, TeeType
from ppml.errors import UsageError
from ppml.kms import sqlite as _sqlite
from ppml.kms.master import MasterKey
from ppml.kms.policy import Policy, Rule
from ppml.kms.state_guard import CheckedKey

__all__ = ["StoredRules"]

_log = logging.getLogger(__name__)


class StoredRules:
    """Writes release rules with their MACs and reads them back into checked policies."""

    def __init__(self, master: MasterKey, store_id: bytes, path: Path) -> None:
        self._master, self._store_id, self._path = master, store_id, path

    def put(self, conn: sqlite3.Connection, key_name: str, rule: Rule, now: str) -> bool:
        """Store `rule` for the key (replacing its rule for the same TEE and measurement); True
        if it replaced one."""
        return _sqlite.upsert_rule(
            conn,
            key_name,
            tee=rule.tee.value,
            measurement=rule.measurement,
            debug_ok=rule.debug_ok,
            min_tcb=rule.min_tcb.value,
            created_at=now,
            mac=self._master.rule_mac(self._store_id, key_name, rule),
            constraints=canonical_json(rule.constraints()).decode("utf-8"),
        )

    def policy(self, key: CheckedKey) -> Policy:
        """The key's release policy (denies everything if a rule was altered)."""
        return self.policy_of(key.name, key.rows.rules, key.rules_intact)

    def policy_of(self, name: str, rule_rows: tuple[tuple[Any, ...], ...], intact: bool) -> Policy:
        """A key's policy from its rule rows (`intact`: they match the authenticated state);
        every rule also checked against its MAC."""
        rules: list[Rule] = []
        if intact:
            for row in rule_rows:
                rule = self._checked(
                    _sqlite.RuleRow(name, row[1], row[2], row[3], row[4], row[6], row[7])
                )
                if rule is None:
                    intact = False
                    break
                rules.append(rule)
        if not intact:
            _log.error("a release rule of key %r in %s was altered", name, self._path)
            return Policy(name, (), False)
        return Policy(name, tuple(rules), True)

    def _checked(self, row: _sqlite.RuleRow) -> Rule | None:
        try:
            if not isinstance(row.debug_ok, int) or row.debug_ok not in (0, 1):
                return None
            if not all(
                isinstance(v, str) for v in (row.tee, row.measurement, row.min_tcb, row.constraints)
            ):
                return None
            constraints = json.loads(str(row.constraints))
            if not isinstance(constraints, dict):
                return None
            rule = Rule.from_dict(
                {
                    "tee": TeeType(str(row.tee)),
                    "measurement": str(row.measurement),
                    "debug_ok": bool(row.debug_ok),
                    "min_tcb": TcbStatus(str(row.min_tcb)),
                    **constraints,
                }
            )
        except (ValueError, UsageError, TypeError, RecursionError):
            return None
        if rule.measurement != row.measurement or not isinstance(row.mac, bytes):
            return None
        expected = self._master.rule_mac(self._store_id, row.key_name, rule)
        if not compare_digest(expected, row.mac):
            return None
        return rule
