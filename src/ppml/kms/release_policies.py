"""The release policies of one key store: adding, replacing, revoking and reading each key's
rules, and evaluating attested facts against them. The rules themselves are values
(`ppml.kms.policy`); every change is an audited operation of the key ledger."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from ppml.attestation.claims import TeeType
from ppml.crypto.envelope import validate_key_name
from ppml.errors import UsageError
from ppml.kms import sqlite as _sqlite
from ppml.kms import state as _state
from ppml.kms.audit import Refusal
from ppml.kms.ledger import KeyLedger, unknown_key
from ppml.kms.policy import AttestedFacts, Decision, Policy, Reason, Rule, parse_measurement

__all__ = ["ReleasePolicies"]


def _sim_refused(detail: Mapping[str, Any]) -> Refusal:
    return Refusal(
        UsageError(
            "sim rules are refused outside a dev workspace: the sim TEE protects nothing, so "
            "production policies never release keys to it"
        ),
        "denied",
        Reason.SIM_NOT_ALLOWED,
        detail,
    )


class ReleasePolicies:
    """The release policies of one key store, for a workspace that does (`allow_sim=True`,
    dev) or does not accept the sim TEE. Obtain one with `KeyService.policies`."""

    def __init__(self, ledger: KeyLedger, *, allow_sim: bool) -> None:
        self._ledger = ledger
        self.allow_sim = allow_sim

    def __repr__(self) -> str:
        return f"ReleasePolicies({str(self._ledger.path)!r}, allow_sim={self.allow_sim})"

    def allow(self, key_name: str, rule: Rule) -> Policy:
        """Add `rule` to the key's policy (replacing a rule for the same TEE and measurement).
        `KeyNotFound` for an unknown key; `UsageError` for a sim rule outside dev. Audited as
        ``policy_allow``."""
        validate_key_name(key_name)
        if not isinstance(rule, Rule):
            raise UsageError("ReleasePolicies.allow needs a Rule")

        def body(conn: sqlite3.Connection, now: str) -> tuple[Policy, None, Mapping[str, Any]]:
            if rule.tee is TeeType.SIM and not self.allow_sim:
                raise _sim_refused(rule.to_dict())
            self._require_key(conn, key_name, rule.to_dict())
            replaced = self._ledger.rules.put(conn, key_name, rule, now)
            return self._policy_now(conn, key_name), None, {**rule.to_dict(), "replaced": replaced}

        return self._ledger.run("policy_allow", key_name, None, body)

    def replace(self, key_name: str, rules: Sequence[Rule]) -> Policy:
        """Replace the key's whole policy with `rules` (an empty sequence denies everything).
        Audited as ``policy_set``."""
        validate_key_name(key_name)
        rules = tuple(rules)
        if not all(isinstance(r, Rule) for r in rules):
            raise UsageError("ReleasePolicies.replace needs Rules")

        def body(conn: sqlite3.Connection, now: str) -> tuple[Policy, None, Mapping[str, Any]]:
            detail = {"rules": [r.to_dict() for r in rules]}
            if any(r.tee is TeeType.SIM for r in rules) and not self.allow_sim:
                raise _sim_refused(detail)
            self._require_key(conn, key_name, detail)
            removed = _sqlite.delete_rules(conn, key_name, None)
            for rule in rules:
                self._ledger.rules.put(conn, key_name, rule, now)
            return self._policy_now(conn, key_name), None, {**detail, "removed": removed}

        return self._ledger.run("policy_set", key_name, None, body)

    def revoke(self, key_name: str, measurement: str) -> Policy:
        """Remove the key's rules for `measurement` (any TEE type); `UsageError` when it has
        none. Audited as ``policy_revoke``."""
        validate_key_name(key_name)
        measurement = parse_measurement(measurement)

        def body(conn: sqlite3.Connection, now: str) -> tuple[Policy, None, Mapping[str, Any]]:
            detail = {"measurement": measurement}
            self._require_key(conn, key_name, detail)
            removed = _sqlite.delete_rules(conn, key_name, measurement)
            if removed == 0:
                raise Refusal(
                    UsageError(
                        f"key {key_name!r} has no release rule for measurement {measurement} "
                        "(see `ppml policy show`)"
                    ),
                    "denied",
                    Reason.UNKNOWN_RULE,
                    detail,
                )
            return self._policy_now(conn, key_name), None, {**detail, "removed": removed}

        return self._ledger.run("policy_revoke", key_name, None, body)

    def show(self, key_name: str) -> Policy:
        """The key's policy (`IntegrityError` if a stored rule was altered)."""
        validate_key_name(key_name)
        with self._ledger.read() as conn:
            policy = self._ledger.rules.policy(self._ledger.existing_key(conn, key_name))
        if not policy.intact:
            raise self._ledger.state.failure(f"key {key_name!r}: its release rules differ")
        return policy

    def evaluate(self, key_name: str, facts: AttestedFacts) -> Decision:
        """The decision for one key; an unknown key denies like an empty policy (not audited:
        nothing is released)."""
        validate_key_name(key_name)
        with self._ledger.read() as conn:
            key = self._ledger.key(conn, key_name)
            if not key.exists:
                return Decision(False, Reason.UNKNOWN_KEY)
            return self._ledger.rules.policy(key).evaluate(facts, allow_sim=self.allow_sim)

    def matching_keys(self, facts: AttestedFacts) -> list[str]:
        """The names of the keys whose policies `facts` satisfy, sorted (the appraisal function
        of the attestation service)."""
        with self._ledger.read() as conn:
            summary = self._ledger.state.summary(conn)
            rules = _state.rules_by_key(conn)  # one statement
        policies = []
        for name, rows in rules.items():
            # Only the rules decide a match: a key with no rules matches nothing, so a key
            # whose rules were deleted is denied; rules that differ from the record deny.
            expected = summary.get(name)
            if expected is None:
                raise self._ledger.state.failure(f"key {name!r} is not in the authenticated state")
            intact = _state.rules_digest(rows) == expected.rules
            policies.append(self._ledger.rules.policy_of(name, rows, intact))
        allow_sim = self.allow_sim
        return [p.key_name for p in policies if p.evaluate(facts, allow_sim=allow_sim).allowed]

    def _require_key(self, conn: sqlite3.Connection, key_name: str, detail: Any) -> None:
        if not self._ledger.key(conn, key_name).exists:
            raise unknown_key(key_name, Reason.UNKNOWN_KEY, detail)

    def _policy_now(self, conn: sqlite3.Connection, key_name: str) -> Policy:
        """The key's policy as this transaction just wrote it."""
        return self._ledger.rules.policy(self._ledger.state.rows_now(conn, key_name))
