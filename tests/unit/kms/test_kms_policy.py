"""Release policies: evaluation as a table (rules x claims -> decision), validation of rules, and
the policy store (persistence, audit, the sim guard, tamper detection)."""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from ppml.attestation.claims import EvidenceClaims, TcbStatus, TeeType, TokenClaims
from ppml.errors import IntegrityError, KeyNotFound, UsageError
from ppml.kms import KeyService, PolicyStore
from ppml.kms.policy import (
    PRIMARY_MEASUREMENT,
    Decision,
    Policy,
    Reason,
    Rule,
    parse_measurement,
    parse_tcb_status,
    parse_tee,
)

MASTER = bytes(range(100, 132))
M = "ab" * 32
M_OFF = M[:-1] + "a"  # the same width, one bit off (0xab -> 0xaa)
M48 = "cd" * 48
OTHER = "ef" * 32
T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def claims(
    tee: TeeType = TeeType.SGX,
    measurement: str | None = M,
    *,
    debug: bool = False,
    tcb: TcbStatus = TcbStatus.UP_TO_DATE,
    extra: Mapping[str, str] | None = None,
) -> TokenClaims:
    measurements = dict(extra or {})
    if measurement is not None:
        measurements[PRIMARY_MEASUREMENT[tee]] = measurement
    return TokenClaims(
        tee=tee,
        measurements=measurements,
        debug=debug,
        tcb_status=tcb,
        public_key=bytes(32),
        policies_matched=(),
        issued_at=T0,
        expires_at=T0 + dt.timedelta(minutes=5),
        token_id="t-1",
    )


SGX = Rule(TeeType.SGX, M)
SGX_DEBUG = Rule(TeeType.SGX, M, debug_ok=True)
SGX_OUT_OF_DATE = Rule(TeeType.SGX, M, min_tcb=TcbStatus.OUT_OF_DATE)
SGX_ANY_TCB = Rule(TeeType.SGX, M, min_tcb=TcbStatus.UNKNOWN)
SGX_CONFIG = Rule(TeeType.SGX, M, min_tcb=TcbStatus.CONFIGURATION_NEEDED)
TDX = Rule(TeeType.TDX, M)
TDX48 = Rule(TeeType.TDX, M48)
SNP48 = Rule(TeeType.SNP, M48)
SIM = Rule(TeeType.SIM, M)

# (rules, claims, allow_sim) -> (allowed, reason)
TABLE: dict[str, tuple[tuple[Rule, ...], TokenClaims, bool, bool, str]] = {
    "exact match": ((SGX,), claims(), False, True, Reason.ALLOWED),
    "upper-case claim hex": ((SGX,), claims(measurement=M.upper()), False, True, Reason.ALLOWED),
    "empty policy": ((), claims(), False, False, Reason.NO_POLICY),
    "wrong tee": ((TDX,), claims(), False, False, Reason.TEE_MISMATCH),
    "measurement one bit off": ((SGX,), claims(measurement=M_OFF), False, False,
                                Reason.MEASUREMENT_MISMATCH),
    "measurement of another width": ((TDX48,), claims(TeeType.TDX, M48[:64]), False, False,
                                     Reason.MEASUREMENT_MISMATCH),
    "measurement not hex": ((SGX,), claims(measurement="zz" * 32), False, False,
                            Reason.MEASUREMENT_MISMATCH),
    "primary measurement missing": ((SGX,), claims(measurement=None, extra={"mr_signer": M}),
                                    False, False, Reason.MEASUREMENT_MISSING),
    "only the signer matches": ((SGX,), claims(measurement=OTHER, extra={"mr_signer": M}),
                                False, False, Reason.MEASUREMENT_MISMATCH),
    "debug not allowed": ((SGX,), claims(debug=True), False, False, Reason.DEBUG_NOT_ALLOWED),
    "debug allowed": ((SGX_DEBUG,), claims(debug=True), False, True, Reason.ALLOWED),
    "debug rule, production tee": ((SGX_DEBUG,), claims(), False, True, Reason.ALLOWED),
    "tcb too low": ((SGX,), claims(tcb=TcbStatus.OUT_OF_DATE), False, False, Reason.TCB_TOO_LOW),
    "tcb just enough": ((SGX_OUT_OF_DATE,), claims(tcb=TcbStatus.OUT_OF_DATE), False, True,
                        Reason.ALLOWED),
    "tcb better than needed": ((SGX_CONFIG,), claims(tcb=TcbStatus.SW_HARDENING_NEEDED), False,
                               True, Reason.ALLOWED),
    "tcb worse than config": ((SGX_CONFIG,), claims(tcb=TcbStatus.OUT_OF_DATE), False, False,
                              Reason.TCB_TOO_LOW),
    "tcb revoked": ((SGX_OUT_OF_DATE,), claims(tcb=TcbStatus.REVOKED), False, False,
                    Reason.TCB_TOO_LOW),
    "tcb revoked, any tcb": ((SGX_ANY_TCB,), claims(tcb=TcbStatus.REVOKED), False, False,
                             Reason.TCB_TOO_LOW),
    "tcb unknown": ((SGX_OUT_OF_DATE,), claims(tcb=TcbStatus.UNKNOWN), False, False,
                    Reason.TCB_TOO_LOW),
    "tcb unknown, any tcb": ((SGX_ANY_TCB,), claims(tcb=TcbStatus.UNKNOWN), False, True,
                             Reason.ALLOWED),
    "tdx uses mr_td": ((TDX,), claims(TeeType.TDX), False, True, Reason.ALLOWED),
    "snp uses measurement": ((SNP48,), claims(TeeType.SNP, M48), False, True, Reason.ALLOWED),
    "sim outside dev": ((SIM,), claims(TeeType.SIM), False, False, Reason.SIM_NOT_ALLOWED),
    "sim in dev": ((SIM,), claims(TeeType.SIM), True, True, Reason.ALLOWED),
    "sim in dev, empty policy": ((), claims(TeeType.SIM), True, False, Reason.NO_POLICY),
    "sim claims, sgx rule": ((SGX,), claims(TeeType.SIM), True, False, Reason.TEE_MISMATCH),
    "second rule matches": ((TDX, SGX), claims(), False, True, Reason.ALLOWED),
    "nearest miss is reported": ((TDX, SGX), claims(tcb=TcbStatus.OUT_OF_DATE), False, False,
                                 Reason.TCB_TOO_LOW),
    "nearest miss, debug": ((SGX, TDX), claims(debug=True), False, False,
                            Reason.DEBUG_NOT_ALLOWED),
}  # fmt: skip


@pytest.mark.parametrize(
    ("rules", "facts", "allow_sim", "allowed", "reason"), TABLE.values(), ids=TABLE.keys()
)
def test_policy_evaluation(
    rules: tuple[Rule, ...], facts: TokenClaims, allow_sim: bool, allowed: bool, reason: str
) -> None:
    decision = Policy("k", rules).evaluate(facts, allow_sim=allow_sim)
    assert (decision.allowed, decision.reason) == (allowed, reason)
    assert (decision.rule is not None) == allowed


def test_a_tampered_policy_denies_even_a_matching_workload() -> None:
    policy = Policy("k", (SGX,), intact=False)
    assert policy.evaluate(claims(), allow_sim=True) == Decision(False, Reason.POLICY_TAMPERED)


def test_an_unknown_tee_type_denies() -> None:
    odd = claims()
    object.__setattr__(odd, "tee", "tpm")
    assert Policy("k", (SGX,)).evaluate(odd, allow_sim=True).reason == Reason.UNKNOWN_TEE


def test_evidence_claims_evaluate_like_token_claims() -> None:
    evidence = EvidenceClaims(TeeType.SGX, {"mr_enclave": M}, False, TcbStatus.UP_TO_DATE, b"")
    assert Policy("k", (SGX,)).evaluate(evidence, allow_sim=False).allowed


def test_every_tee_type_has_a_primary_measurement() -> None:
    assert set(PRIMARY_MEASUREMENT) == set(TeeType)


# -- rules and their parsing ----------------------------------------------------------------


def test_measurements_are_normalised_to_lower_case() -> None:
    assert Rule(TeeType.SGX, M.upper()).measurement == M
    assert parse_measurement(f"  {M48.upper()}\n") == M48


@pytest.mark.parametrize(
    "bad", ["", "ab" * 31, "ab" * 33, "ab" * 64, M[:-1], "g" * 64, "0x" + M[2:], "ab " * 32]
)
def test_bad_measurements_are_refused_with_a_clear_message(bad: str) -> None:
    with pytest.raises(UsageError, match="64 or 96 hex digits"):
        Rule(TeeType.SGX, bad)


def test_tee_and_tcb_names_are_parsed() -> None:
    assert parse_tee("SGX") is TeeType.SGX
    assert parse_tcb_status("outofdate") is TcbStatus.OUT_OF_DATE
    assert parse_tcb_status(TcbStatus.REVOKED) is TcbStatus.REVOKED
    with pytest.raises(UsageError, match="use one of sim, sgx, tdx, snp"):
        parse_tee("tpm")
    with pytest.raises(UsageError, match="UpToDate"):
        parse_tcb_status("fine")


def test_rules_round_trip_through_dicts() -> None:
    rule = Rule(TeeType.TDX, M48, debug_ok=True, min_tcb=TcbStatus.SW_HARDENING_NEEDED)
    assert rule.to_dict() == {
        "tee": "tdx",
        "measurement": M48,
        "debug_ok": True,
        "min_tcb": "SWHardeningNeeded",
    }
    assert Rule.from_dict(rule.to_dict()) == rule
    with pytest.raises(UsageError):
        Rule.from_dict({**rule.to_dict(), "extra": 1})
    with pytest.raises(UsageError):
        Rule.from_dict({**rule.to_dict(), "debug_ok": "yes"})


# -- the policy store -------------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "kms.db"


@pytest.fixture
def kms(db: Path) -> Iterator[KeyService]:
    with KeyService(db, MASTER, actor="owner") as service:
        service.create_key("sales")
        service.create_key("pii")
        yield service


@pytest.fixture
def prod(kms: KeyService) -> PolicyStore:
    return kms.policies(allow_sim=False)


def _last(kms: KeyService) -> dict[str, object]:
    return kms.audit.entries(limit=1)[0].to_dict()


def test_a_new_key_has_an_empty_policy(prod: PolicyStore) -> None:
    assert prod.show("sales") == Policy("sales", ())
    assert prod.evaluate("sales", claims()).reason == Reason.NO_POLICY
    assert prod.matching_keys(claims()) == []


def test_allow_show_and_persist(db: Path, kms: KeyService, prod: PolicyStore) -> None:
    assert prod.allow("sales", SGX) == Policy("sales", (SGX,))
    prod.allow("sales", TDX48)
    assert set(prod.show("sales").rules) == {SGX, TDX48}
    kms.close()
    with KeyService(db, MASTER) as reopened:
        assert set(reopened.policies(allow_sim=False).show("sales").rules) == {SGX, TDX48}
        assert reopened.policies(allow_sim=False).show("pii").rules == ()


def test_allow_replaces_the_rule_for_the_same_tee_and_measurement(
    kms: KeyService, prod: PolicyStore
) -> None:
    prod.allow("sales", SGX)
    assert prod.allow("sales", SGX_DEBUG).rules == (SGX_DEBUG,)
    # kms fixture: two keys created (state 1, 2), then the two rules (3, 4)
    assert _last(kms)["detail"] == {**SGX_DEBUG.to_dict(), "replaced": True, "state": 4}


def test_policy_changes_are_audited(kms: KeyService, prod: PolicyStore) -> None:
    prod.allow("sales", SGX)
    prod.revoke("sales", M)
    records = [(e.op, e.key_name, e.version, e.outcome) for e in kms.audit.entries()[-2:]]
    assert records == [
        ("policy_allow", "sales", None, "ok"),
        ("policy_revoke", "sales", None, "ok"),
    ]
    assert _last(kms)["detail"] == {"measurement": M, "removed": 1, "state": 4}
    assert kms.audit.verify().ok


def test_policies_are_per_key(prod: PolicyStore) -> None:
    prod.allow("sales", SGX)
    prod.allow("pii", TDX)
    assert prod.matching_keys(claims()) == ["sales"]
    assert prod.matching_keys(claims(TeeType.TDX)) == ["pii"]
    prod.allow("pii", SGX)
    assert prod.matching_keys(claims()) == ["pii", "sales"]
    assert prod.evaluate("pii", claims(measurement=OTHER)).reason == Reason.MEASUREMENT_MISMATCH


def test_a_revoked_rule_no_longer_matches(prod: PolicyStore) -> None:
    prod.allow("sales", SGX)
    prod.allow("sales", Rule(TeeType.SGX, OTHER))
    assert prod.revoke("sales", M.upper()).rules == (Rule(TeeType.SGX, OTHER),)
    assert prod.matching_keys(claims()) == []
    assert prod.evaluate("sales", claims()).reason == Reason.MEASUREMENT_MISMATCH


def test_revoking_removes_the_measurement_for_every_tee(prod: PolicyStore) -> None:
    prod.allow("sales", SGX)
    prod.allow("sales", TDX)
    assert prod.revoke("sales", M).rules == ()


def test_revoking_an_unknown_measurement_is_a_clear_error(
    kms: KeyService, prod: PolicyStore
) -> None:
    prod.allow("sales", SGX)
    with pytest.raises(UsageError, match=f"no release rule for measurement {OTHER}"):
        prod.revoke("sales", OTHER)
    assert (_last(kms)["outcome"], _last(kms)["detail"]) == (
        "denied",
        {"measurement": OTHER, "reason": Reason.UNKNOWN_RULE},
    )
    assert prod.show("sales").rules == (SGX,)


def test_unknown_keys_are_refused(kms: KeyService, prod: PolicyStore) -> None:
    with pytest.raises(KeyNotFound):
        prod.allow("ghost", SGX)
    assert (_last(kms)["op"], _last(kms)["outcome"]) == ("policy_allow", "denied")
    with pytest.raises(KeyNotFound):
        prod.revoke("ghost", M)
    with pytest.raises(KeyNotFound):
        prod.show("ghost")
    assert prod.evaluate("ghost", claims()) == Decision(False, Reason.UNKNOWN_KEY)


def test_sim_rules_are_refused_outside_dev(kms: KeyService, prod: PolicyStore) -> None:
    with pytest.raises(UsageError, match="sim rules are refused outside a dev workspace"):
        prod.allow("sales", SIM)
    assert (_last(kms)["outcome"], _last(kms)["detail"]) == (
        "denied",
        {**SIM.to_dict(), "reason": Reason.SIM_NOT_ALLOWED},
    )
    with pytest.raises(UsageError, match="sim rules"):
        prod.replace("sales", [SGX, SIM])
    assert prod.show("sales").rules == ()


def test_sim_rules_work_in_dev_but_production_still_refuses_sim_claims(
    kms: KeyService,
) -> None:
    dev = kms.policies(allow_sim=True)
    dev.allow("sales", SIM)
    assert dev.matching_keys(claims(TeeType.SIM)) == ["sales"]
    prod = kms.policies(allow_sim=False)
    assert prod.matching_keys(claims(TeeType.SIM)) == []
    assert prod.evaluate("sales", claims(TeeType.SIM)).reason == Reason.SIM_NOT_ALLOWED


def test_replace_sets_the_whole_policy(kms: KeyService, prod: PolicyStore) -> None:
    prod.allow("sales", SGX)
    assert set(prod.replace("sales", [TDX, SNP48]).rules) == {TDX, SNP48}
    assert _last(kms)["op"] == "policy_set"
    assert prod.replace("sales", []).rules == ()
    assert prod.evaluate("sales", claims(TeeType.TDX)).reason == Reason.NO_POLICY


def _edit(db: Path, sql: str) -> None:
    raw = sqlite3.connect(db)
    with raw:
        raw.execute(sql)
    raw.close()


RULE_EDITS = {
    "debug_ok": "UPDATE release_rules SET debug_ok = 1",
    "min_tcb": "UPDATE release_rules SET min_tcb = 'Unknown'",
    "measurement": f"UPDATE release_rules SET measurement = '{OTHER}'",
    "tee": "UPDATE release_rules SET tee = 'sim'",
    "moved to another key": "UPDATE release_rules SET key_name = 'pii'",
    "mac": "UPDATE release_rules SET mac = zeroblob(32)",
    "debug_ok as text": "UPDATE release_rules SET debug_ok = 'yes'",
    "inserted": "INSERT INTO release_rules "
    "(key_name, tee, measurement, debug_ok, min_tcb, created_at, mac) "
    f"VALUES ('pii', 'sgx', '{M}', 0, 'UpToDate', '2030-01-01', zeroblob(32))",
    "constraints added": "UPDATE release_rules SET constraints = '{\"isv_prod_id\":1}'",
    "constraints not JSON": "UPDATE release_rules SET constraints = '{'",
}


@pytest.mark.parametrize("edit", RULE_EDITS.values(), ids=RULE_EDITS.keys())
def test_a_rule_edited_in_the_file_denies(db: Path, kms: KeyService, edit: str) -> None:
    kms.policies(allow_sim=False).allow("sales", SGX)
    kms.policies(allow_sim=False).allow("pii", Rule(TeeType.SGX, M48))
    _edit(db, edit)
    dev = kms.policies(allow_sim=True)
    tampered = []
    for key in ("sales", "pii"):
        try:
            dev.show(key)
        except IntegrityError:
            tampered.append(key)
    assert tampered
    matching = dev.matching_keys(claims())
    for key in tampered:
        assert key not in matching
        assert dev.evaluate(key, claims()).reason == Reason.POLICY_TAMPERED


def test_policy_store_is_the_release_policies_of_ppml_kms(prod: PolicyStore) -> None:
    import ppml.kms

    assert ppml.kms.PolicyStore is ppml.kms.ReleasePolicies
    assert isinstance(prod, ppml.kms.ReleasePolicies)
    assert "PolicyStore" in ppml.kms.__all__ and "ReleasePolicies" in ppml.kms.__all__
