"""Release rules with hardware reference values: every field refuses on its own mismatch, digests
compare at full width, stored rules keep (and authenticate) them, tokens carry the facts, and
policy files round-trip."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from ppml.attestation import EvidenceClaims, TcbStatus, TeeType, TokenIssuer, TokenVerifier
from ppml.errors import IntegrityError, UsageError
from ppml.kms import KeyService
from ppml.kms.policy import Policy, Reason, Rule, load_policy_file

M32 = "11" * 32
M48 = "22" * 48
SIGNER = "33" * 32
SEAM = "44" * 48
RTMRS = ["5" + str(i) for i in range(4)]  # "50".."53", each repeated 48 times below
MIGRATION_AGENT, SMT, POLICY_BASE = 1 << 18, 1 << 16, 1 << 17


def facts(tee: TeeType, **kw: Any) -> EvidenceClaims:
    measurements = {
        TeeType.SGX: {"mr_enclave": M32, "mr_signer": SIGNER},
        TeeType.TDX: {"mr_td": M48, "mr_seam": SEAM}
        | {f"rtmr{i}": RTMRS[i] * 48 for i in range(4)},
        TeeType.SNP: {"measurement": M48},
    }[tee]
    extra = {
        TeeType.SGX: {"isv_prod_id": 4, "isv_svn": 6},
        TeeType.TDX: {},
        TeeType.SNP: {
            "guest_policy": POLICY_BASE,
            "reported_tcb": {"bootloader": 4, "tee": 0, "snp": 24, "microcode": 219},
        },
    }[tee]
    measurements.update(kw.pop("measurements", {}))
    extra.update(kw.pop("extra", {}))
    return EvidenceClaims(
        tee=tee,
        measurements=measurements,
        debug=kw.pop("debug", False),
        tcb_status=kw.pop("tcb_status", TcbStatus.UP_TO_DATE),
        report_data=bytes(64),
        extra=extra,
    )


SGX_RULE = Rule(TeeType.SGX, M32, mr_signer=SIGNER, isv_prod_id=4, min_isv_svn=6)
TDX_RULE = Rule(TeeType.TDX, M48, mr_seam=SEAM, **{f"rtmr{i}": RTMRS[i] * 48 for i in range(4)})
SNP_RULE = Rule(
    TeeType.SNP,
    M48,
    migration_agent_ok=False,
    smt_ok=False,
    min_reported_tcb={"bootloader": 4, "tee": 0, "snp": 24, "microcode": 219},
)


def reason(rule: Rule, f: EvidenceClaims) -> str:
    return Policy("k", (rule,)).evaluate(f, allow_sim=False).reason


def test_matching_facts_are_allowed() -> None:
    assert reason(SGX_RULE, facts(TeeType.SGX)) == Reason.ALLOWED
    assert reason(TDX_RULE, facts(TeeType.TDX)) == Reason.ALLOWED
    assert reason(SNP_RULE, facts(TeeType.SNP)) == Reason.ALLOWED
    assert reason(Rule(TeeType.SGX, M32), facts(TeeType.SGX, extra={"isv_svn": 0})) == "allowed"


MISMATCHES: dict[str, tuple[Rule, EvidenceClaims, str]] = {
    "sgx mr_enclave": (SGX_RULE, facts(TeeType.SGX, measurements={"mr_enclave": "12" * 32}),
                       Reason.MEASUREMENT_MISMATCH),
    "sgx mr_signer": (SGX_RULE, facts(TeeType.SGX, measurements={"mr_signer": "34" * 32}),
                      Reason.MEASUREMENT_MISMATCH),
    "sgx mr_signer missing": (SGX_RULE, replace(facts(TeeType.SGX),
                              measurements={"mr_enclave": M32}), Reason.MEASUREMENT_MISMATCH),
    "sgx mr_signer shorter": (SGX_RULE, facts(TeeType.SGX,
                              measurements={"mr_signer": SIGNER[:62]}),
                              Reason.MEASUREMENT_MISMATCH),
    "sgx mr_signer longer": (SGX_RULE, facts(TeeType.SGX,
                             measurements={"mr_signer": SIGNER + "33"}),
                             Reason.MEASUREMENT_MISMATCH),
    "sgx isv_prod_id": (SGX_RULE, facts(TeeType.SGX, extra={"isv_prod_id": 5}),
                        Reason.ATTRIBUTE_MISMATCH),
    "sgx isv_prod_id missing": (SGX_RULE, replace(facts(TeeType.SGX),
                                extra={"isv_svn": 6}), Reason.ATTRIBUTE_MISMATCH),
    "sgx isv_svn": (SGX_RULE, facts(TeeType.SGX, extra={"isv_svn": 5}), Reason.SVN_TOO_LOW),
    "sgx isv_svn not an int": (SGX_RULE, facts(TeeType.SGX, extra={"isv_svn": "9"}),
                               Reason.SVN_TOO_LOW),
    "sgx debug": (SGX_RULE, facts(TeeType.SGX, debug=True), Reason.DEBUG_NOT_ALLOWED),
    "sgx tcb": (SGX_RULE, facts(TeeType.SGX, tcb_status=TcbStatus.UNKNOWN),
                Reason.TCB_TOO_LOW),
    "tdx mr_td": (TDX_RULE, facts(TeeType.TDX, measurements={"mr_td": "23" * 48}),
                  Reason.MEASUREMENT_MISMATCH),
    "tdx mr_seam": (TDX_RULE, facts(TeeType.TDX, measurements={"mr_seam": "45" * 48}),
                    Reason.MEASUREMENT_MISMATCH),
    **{
        f"tdx rtmr{i}": (TDX_RULE, facts(TeeType.TDX, measurements={f"rtmr{i}": "ff" * 48}),
                         Reason.MEASUREMENT_MISMATCH)
        for i in range(4)
    },
    "tdx rtmr0 prefix": (TDX_RULE, facts(TeeType.TDX, measurements={"rtmr0": RTMRS[0] * 32}),
                         Reason.MEASUREMENT_MISMATCH),
    "tdx debug": (TDX_RULE, facts(TeeType.TDX, debug=True), Reason.DEBUG_NOT_ALLOWED),
    "tdx tcb": (TDX_RULE, facts(TeeType.TDX, tcb_status=TcbStatus.OUT_OF_DATE),
                Reason.TCB_TOO_LOW),
    "snp measurement": (SNP_RULE, facts(TeeType.SNP, measurements={"measurement": "99" * 48}),
                        Reason.MEASUREMENT_MISMATCH),
    "snp migration agent": (SNP_RULE, facts(TeeType.SNP, extra={
                            "guest_policy": POLICY_BASE | MIGRATION_AGENT}),
                            Reason.ATTRIBUTE_MISMATCH),
    "snp smt": (SNP_RULE, facts(TeeType.SNP, extra={"guest_policy": POLICY_BASE | SMT}),
                Reason.ATTRIBUTE_MISMATCH),
    "snp guest policy missing": (SNP_RULE, replace(facts(TeeType.SNP), extra={}),
                                 Reason.ATTRIBUTE_MISMATCH),
    "snp debug": (SNP_RULE, facts(TeeType.SNP, debug=True), Reason.DEBUG_NOT_ALLOWED),
    **{
        f"snp reported tcb {name}": (SNP_RULE, facts(TeeType.SNP, extra={"reported_tcb": {
            "bootloader": 4, "tee": 0, "snp": 24, "microcode": 219} | {name: level}}),
            Reason.SVN_TOO_LOW)
        for name, level in (("bootloader", 3), ("snp", 23), ("microcode", 218))
    },
    "snp reported tcb missing": (SNP_RULE, facts(TeeType.SNP, extra={"reported_tcb": {}}),
                                 Reason.SVN_TOO_LOW),
    "snp tcb": (SNP_RULE, facts(TeeType.SNP, tcb_status=TcbStatus.REVOKED),
                Reason.TCB_TOO_LOW),
}  # fmt: skip


@pytest.mark.parametrize("case", MISMATCHES.values(), ids=MISMATCHES.keys())
def test_each_mismatch_is_refused(case: tuple[Rule, EvidenceClaims, str]) -> None:
    rule, f, expected = case
    assert reason(rule, f) == expected


def test_turin_fmc_minimum() -> None:
    rule = Rule(TeeType.SNP, M48, min_reported_tcb={"fmc": 2})
    tcb = {"bootloader": 4, "tee": 0, "snp": 24, "microcode": 219}
    assert reason(rule, facts(TeeType.SNP, extra={"reported_tcb": tcb | {"fmc": 2}})) == "allowed"
    assert reason(rule, facts(TeeType.SNP, extra={"reported_tcb": tcb | {"fmc": 1}})) == (
        Reason.SVN_TOO_LOW
    )
    assert reason(rule, facts(TeeType.SNP)) == Reason.SVN_TOO_LOW  # no fmc: not Turin


@pytest.mark.parametrize(
    "kw",
    [
        {"tee": TeeType.TDX, "mr_signer": SIGNER},
        {"tee": TeeType.SGX, "mr_seam": SEAM},
        {"tee": TeeType.SGX, "mr_signer": SIGNER[:62]},
        {"tee": TeeType.SGX, "mr_signer": "zz" * 32},
        {"tee": TeeType.TDX, "rtmr0": "ab" * 32},
        {"tee": TeeType.TDX, "isv_prod_id": 1},
        {"tee": TeeType.SGX, "isv_prod_id": -1},
        {"tee": TeeType.SGX, "min_isv_svn": 70000},
        {"tee": TeeType.SGX, "min_isv_svn": True},
        {"tee": TeeType.SGX, "smt_ok": False},
        {"tee": TeeType.SNP, "min_reported_tcb": {"pizza": 1}},
        {"tee": TeeType.SNP, "min_reported_tcb": {}},
        {"tee": TeeType.SNP, "min_reported_tcb": {"snp": 256}},
        {"tee": TeeType.SNP, "migration_agent_ok": "no"},
    ],
)
def test_invalid_rules_are_refused(kw: dict[str, Any]) -> None:
    tee = kw.pop("tee")
    with pytest.raises(UsageError):
        Rule(tee, M48 if tee is not TeeType.SGX else M32, **kw)


def test_rule_dict_round_trip_and_old_form() -> None:
    for rule in (SGX_RULE, TDX_RULE, SNP_RULE):
        assert Rule.from_dict(json.loads(json.dumps(rule.to_dict()))) == rule
    assert Rule(TeeType.SGX, M32).to_dict() == {
        "tee": "sgx",
        "measurement": M32,
        "debug_ok": False,
        "min_tcb": "UpToDate",
    }
    with pytest.raises(UsageError, match="unknown rule field"):
        Rule.from_dict({**SGX_RULE.to_dict(), "mr_owner": M48})


def test_stored_rules_keep_their_reference_values(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "kms.db"
    with KeyService(db, bytes(range(32))) as kms:
        kms.create_key("k")
        store = kms.policies(allow_sim=False)
        store.replace("k", [SGX_RULE, TDX_RULE, SNP_RULE])
        assert set(store.show("k").rules) == {SGX_RULE, TDX_RULE, SNP_RULE}
        assert store.evaluate("k", facts(TeeType.SNP)).allowed
        bad = facts(TeeType.SNP, extra={"guest_policy": POLICY_BASE | SMT})
        assert store.evaluate("k", bad).reason == Reason.ATTRIBUTE_MISMATCH
    raw = sqlite3.connect(db)
    with raw:
        raw.execute("UPDATE release_rules SET constraints = '{}' WHERE tee = 'snp'")
    raw.close()
    with (
        KeyService(db, bytes(range(32))) as kms,
        pytest.raises(IntegrityError, match="key 'k': its release rules differ"),
    ):
        kms.policies(allow_sim=False).evaluate("k", facts(TeeType.SNP))


def test_tokens_carry_the_extra_facts() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    issuer = TokenIssuer(key, clock=lambda: t0)
    f = facts(TeeType.SNP)
    f = replace(f, extra=MappingProxyType({**f.extra, "advisory_ids": ["INTEL-SA-1"]}))
    issued = issuer.mint(f, bytes(32), [])
    claims = TokenVerifier(key.public_key(), clock=lambda: t0).verify(issued.token)
    assert claims == issued.claims
    assert claims.extra["reported_tcb"]["snp"] == 24 and claims.extra["advisory_ids"] == (
        "INTEL-SA-1",
    )
    assert reason(SNP_RULE, claims) == Reason.ALLOWED  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        issuer.mint(replace(f, extra={"bad": object()}), bytes(32), [])


def test_policy_files(tmp_path: Path) -> None:
    file = tmp_path / "policy.json"
    file.write_text(json.dumps(Policy("sales", (SGX_RULE, SNP_RULE)).to_dict()))
    loaded = load_policy_file(file)
    assert loaded.key_name == "sales" and loaded.rules == (SGX_RULE, SNP_RULE)
    file.write_text(json.dumps({"rules": [TDX_RULE.to_dict()]}))
    assert load_policy_file(file, key_name="x").rules == (TDX_RULE,)
    for bad in ("[", json.dumps({"rules": {}}), json.dumps({"rules": [], "extra": 1})):
        file.write_text(bad)
        with pytest.raises(UsageError):
            load_policy_file(file)
    with pytest.raises(UsageError):
        load_policy_file(tmp_path / "missing.json")


# -- SGX signer rules: any MRENCLAVE of one signer and product, at a minimum SVN -----------------

SIGNER_RULE = Rule(TeeType.SGX, "*", mr_signer=SIGNER, isv_prod_id=4, min_isv_svn=6)


def test_a_signer_rule_allows_any_enclave_of_its_signer_product_and_svn() -> None:
    assert reason(SIGNER_RULE, facts(TeeType.SGX)) == Reason.ALLOWED
    other_enclave = facts(TeeType.SGX, measurements={"mr_enclave": "77" * 32})
    assert reason(SIGNER_RULE, other_enclave) == Reason.ALLOWED
    later = facts(TeeType.SGX, measurements={"mr_enclave": "78" * 32}, extra={"isv_svn": 9})
    assert reason(SIGNER_RULE, later) == Reason.ALLOWED


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"measurements": {"mr_signer": "34" * 32}}, Reason.MEASUREMENT_MISMATCH),
        ({"measurements": {"mr_signer": "33" * 31}}, Reason.MEASUREMENT_MISMATCH),
        ({"extra": {"isv_prod_id": 5}}, Reason.ATTRIBUTE_MISMATCH),
        ({"extra": {"isv_svn": 5}}, Reason.SVN_TOO_LOW),
        ({"measurements": {"mr_enclave": "11" * 31}}, Reason.MEASUREMENT_MISMATCH),
        ({"debug": True}, Reason.DEBUG_NOT_ALLOWED),
        ({"tcb_status": TcbStatus.OUT_OF_DATE}, Reason.TCB_TOO_LOW),
    ],
)
def test_a_signer_rule_refuses_every_other_enclave(changes: dict[str, Any], expected: str) -> None:
    assert reason(SIGNER_RULE, facts(TeeType.SGX, **changes)) == expected


def test_a_signer_rule_refuses_other_tees_and_a_missing_enclave_measurement() -> None:
    assert reason(SIGNER_RULE, facts(TeeType.TDX)) == Reason.TEE_MISMATCH
    no_enclave = facts(TeeType.SGX)
    no_enclave = replace(
        no_enclave,
        measurements={k: v for k, v in no_enclave.measurements.items() if k != "mr_enclave"},
    )
    assert not Policy("k", (SIGNER_RULE,)).evaluate(no_enclave, allow_sim=False).allowed


@pytest.mark.parametrize(
    "tee, fields",
    [
        (TeeType.SGX, {"mr_signer": SIGNER, "isv_prod_id": 4}),  # no minimum SVN
        (TeeType.SGX, {"mr_signer": SIGNER, "min_isv_svn": 6}),  # no product
        (TeeType.SGX, {"isv_prod_id": 4, "min_isv_svn": 6}),  # no signer
        (TeeType.TDX, {}),
        (TeeType.SNP, {}),
        (TeeType.SIM, {}),
    ],
)
def test_any_measurement_is_only_for_complete_sgx_signer_rules(
    tee: TeeType, fields: dict[str, Any]
) -> None:
    with pytest.raises(UsageError, match="signer rule"):
        Rule(tee, "*", **fields)


def test_a_stored_signer_rule_keeps_its_meaning(tmp_path: Path) -> None:
    db = tmp_path / "keys.db"
    with KeyService(db, bytes(range(32))) as kms:
        kms.create_key("k")
        kms.policies(allow_sim=False).allow("k", SIGNER_RULE)
    with KeyService(db, bytes(range(32))) as kms:
        store = kms.policies(allow_sim=False)
        policy = store.show("k")
        assert policy.intact and policy.rules == (SIGNER_RULE,)
        assert store.evaluate("k", facts(TeeType.SGX)).allowed
        other = facts(TeeType.SGX, measurements={"mr_enclave": "77" * 32}, extra={"isv_svn": 5})
        assert store.evaluate("k", other).reason == Reason.SVN_TOO_LOW
        store.revoke("k", "*")
        assert store.show("k").rules == ()
