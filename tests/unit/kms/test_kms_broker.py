"""The key broker: releases open only with the workload's key and equal what the KMS holds;
every refusal is audited, releases nothing, and looks the same to the caller."""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ppml.attestation.claims import TcbStatus, TeeType, TokenClaims
from ppml.crypto.envelope import WrappedKey
from ppml.crypto.hpke import generate_keypair
from ppml.errors import AccessDenied, AttestationFailed, IntegrityError, UsageError
from ppml.kms import KeyBroker, KeyService, ReleasedKey, Rule, open_released
from ppml.kms.policy import PRIMARY_MEASUREMENT, Reason

MASTER = bytes(range(7, 39))
M = "5a" * 32
OTHER = "a5" * 32
NOW = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.UTC)


@dataclass
class Workload:
    """An attested workload: its key pair and the claims its token carries."""

    private: X25519PrivateKey
    claims: TokenClaims


def workload(
    tee: TeeType = TeeType.SGX,
    measurement: str = M,
    *,
    token_id: str = "tok-1",
    debug: bool = False,
    tcb: TcbStatus = TcbStatus.UP_TO_DATE,
    expires_at: dt.datetime = NOW + dt.timedelta(minutes=5),
    public_key: bytes | None = None,
) -> Workload:
    private, public = generate_keypair()
    return Workload(
        private,
        TokenClaims(
            tee=tee,
            measurements={PRIMARY_MEASUREMENT[tee]: measurement},
            debug=debug,
            tcb_status=tcb,
            public_key=public if public_key is None else public_key,
            policies_matched=(),
            issued_at=NOW - dt.timedelta(minutes=1),
            expires_at=expires_at,
            token_id=token_id,
        ),
    )


@dataclass
class StubVerifier:
    """Stands in for the attestation layer's TokenVerifier: token text -> claims or refusal."""

    tokens: dict[str, TokenClaims | Exception] = field(default_factory=dict)
    calls: int = 0

    def issue(self, w: Workload) -> str:
        token = f"token-for-{w.claims.token_id}"
        self.tokens[token] = w.claims
        return token

    def __call__(self, token: str) -> TokenClaims:
        self.calls += 1
        outcome = self.tokens.get(token, AttestationFailed("bad signature"))
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "kms.db"


@pytest.fixture
def kms(db: Path) -> Iterator[KeyService]:
    with KeyService(db, MASTER, actor="broker") as service:
        for name in ("sales", "pii", "dev-only"):
            service.create_key(name)
        service.policies(allow_sim=False).allow("sales", Rule(TeeType.SGX, M))
        service.policies(allow_sim=True).allow("dev-only", Rule(TeeType.SIM, M))
        yield service


@pytest.fixture
def verifier() -> StubVerifier:
    return StubVerifier()


@pytest.fixture
def broker(kms: KeyService, verifier: StubVerifier) -> KeyBroker:
    return KeyBroker(kms, verifier, allow_sim=False, clock=lambda: NOW)


def _last(kms: KeyService) -> dict[str, Any]:
    return kms.audit.entries(limit=1)[0].to_dict()


# -- releases ---------------------------------------------------------------------------------


def test_a_data_key_opens_with_the_workload_key_and_equals_the_kms_unwrap(
    kms: KeyService, broker: KeyBroker, verifier: StubVerifier
) -> None:
    w = workload()
    released = broker.datakey("sales", verifier.issue(w))
    assert (released.wrapped.key_name, released.wrapped.version) == ("sales", 1)
    dek = open_released(released, w.private, purpose="datakey")
    assert dek.wrapped == released.wrapped
    assert dek.plaintext == kms.unwrap(released.wrapped)
    assert dek.plaintext not in released.sealed_key
    record = kms.audit.entries()[-2].to_dict()  # the kms.unwrap above came after it
    assert (record["op"], record["key_name"], record["version"], record["outcome"]) == (
        "release_datakey",
        "sales",
        1,
        "ok",
    )
    assert record["detail"] == {
        "purpose": "datakey",
        "tee": "sgx",
        "measurement": M,
        "debug": False,
        "tcb_status": "UpToDate",
        "token_id": "tok-1",
        "reason": "allowed",
    }


def test_a_data_key_uses_the_current_version(
    kms: KeyService, broker: KeyBroker, verifier: StubVerifier
) -> None:
    kms.rotate("sales")
    w = workload()
    released = broker.datakey("sales", verifier.issue(w))
    assert released.wrapped.version == 2
    assert open_released(released, w.private).plaintext == kms.unwrap(released.wrapped)


def test_an_existing_files_key_is_unwrapped_across_rotations(
    kms: KeyService, broker: KeyBroker, verifier: StubVerifier
) -> None:
    file_key = kms.generate_data_key("sales")
    kms.rotate("sales")
    w = workload()
    released = broker.unwrap(file_key.wrapped, verifier.issue(w))
    assert released.wrapped == file_key.wrapped
    opened = open_released(released, w.private, purpose="unwrap", wrapped=file_key.wrapped)
    assert opened.plaintext == file_key.plaintext
    assert (_last(kms)["op"], _last(kms)["version"], _last(kms)["outcome"]) == (
        "release_unwrap",
        1,
        "ok",
    )


def test_the_token_and_key_material_never_reach_the_audit_log(
    db: Path, kms: KeyService, broker: KeyBroker, verifier: StubVerifier
) -> None:
    w = workload()
    token = verifier.issue(w)
    released = broker.datakey("sales", token)
    dek = open_released(released, w.private)
    with pytest.raises(AttestationFailed):
        broker.datakey("sales", "not-a-token-secret-value")
    raw = sqlite3.connect(db)
    dump = "\n".join(raw.iterdump())
    raw.close()
    for secret in (token, "not-a-token-secret-value"):
        assert secret not in dump
    for blob in (dek.plaintext, released.sealed_key):
        assert blob.hex().upper() not in dump.upper()


def test_each_key_is_released_by_its_own_policy(
    kms: KeyService, broker: KeyBroker, verifier: StubVerifier
) -> None:
    """Per-column Parquet keys: a workload allowed the 'sales' columns is refused the 'pii'
    column, with the same token."""
    w = workload()
    token = verifier.issue(w)
    assert open_released(broker.datakey("sales", token), w.private)
    pii_file_key = kms.generate_data_key("pii")
    with pytest.raises(AccessDenied):
        broker.datakey("pii", token)
    with pytest.raises(AccessDenied):
        broker.unwrap(pii_file_key.wrapped, token)
    assert _last(kms)["detail"]["reason"] == Reason.NO_POLICY
    kms.policies(allow_sim=False).allow("pii", Rule(TeeType.SGX, M))
    released = broker.unwrap(pii_file_key.wrapped, token)
    assert open_released(released, w.private).plaintext == pii_file_key.plaintext


def test_a_revocation_takes_effect_at_the_next_request(
    kms: KeyService, broker: KeyBroker, verifier: StubVerifier
) -> None:
    token = verifier.issue(workload())
    broker.datakey("sales", token)
    kms.policies(allow_sim=False).revoke("sales", M)
    with pytest.raises(AccessDenied):
        broker.datakey("sales", token)
    assert _last(kms)["detail"]["reason"] == Reason.NO_POLICY


def test_the_sim_tee_is_released_to_only_by_a_dev_broker(
    kms: KeyService, verifier: StubVerifier
) -> None:
    w = workload(TeeType.SIM)
    token = verifier.issue(w)
    production = KeyBroker(kms, verifier, allow_sim=False, clock=lambda: NOW)
    with pytest.raises(AccessDenied):
        production.datakey("dev-only", token)
    assert _last(kms)["detail"]["reason"] == Reason.SIM_NOT_ALLOWED
    dev = KeyBroker(kms, verifier, allow_sim=True, clock=lambda: NOW)
    assert open_released(dev.datakey("dev-only", token), w.private)


def test_the_broker_is_the_attestation_services_appraisal(broker: KeyBroker) -> None:
    assert broker.matching_keys(workload().claims) == ["sales"]
    assert broker.matching_keys(workload(TeeType.SIM).claims) == []
    assert broker.matching_keys(workload(measurement=OTHER).claims) == []


def test_policies_can_be_set_and_read_as_dicts(broker: KeyBroker) -> None:
    rules = [{"tee": "tdx", "measurement": OTHER.upper(), "debug_ok": False, "min_tcb": "UpToDate"}]
    expected = {"key": "pii", "rules": [{**rules[0], "measurement": OTHER}]}
    assert broker.set_policy("pii", rules) == expected
    assert broker.get_policy("pii") == expected
    with pytest.raises(UsageError, match="sim rules"):
        broker.set_policy("pii", [{**rules[0], "tee": "sim"}])


# -- refusals ---------------------------------------------------------------------------------

ACCESS = (AccessDenied, "access denied")
ATTEST = (AttestationFailed, "attestation failed")


@dataclass(frozen=True)
class Refusal:
    """One refusal: how to provoke it, what the caller sees, what the audit says."""

    request: Callable[[KeyService, KeyBroker, StubVerifier], object]
    error: tuple[type[Exception], str]
    op: str
    version: int | None
    reason: str


def _datakey(key: str, w: Callable[[], Workload] = workload) -> Callable[..., object]:
    return lambda kms, broker, verifier: broker.datakey(key, verifier.issue(w()))


def _unwrap_version(version: int) -> Callable[..., object]:
    def request(kms: KeyService, broker: KeyBroker, verifier: StubVerifier) -> object:
        blob = kms.generate_data_key("sales").wrapped.blob
        return broker.unwrap(WrappedKey("sales", version, blob), verifier.issue(workload()))

    return request


def _token(
    outcome: TokenClaims | Exception, op: str = "datakey"
) -> Callable[[KeyService, KeyBroker, StubVerifier], object]:
    def request(kms: KeyService, broker: KeyBroker, verifier: StubVerifier) -> object:
        verifier.tokens["tok"] = outcome
        if op == "datakey":
            return broker.datakey("sales", "tok")
        return broker.unwrap(kms.generate_data_key("sales").wrapped, "tok")

    return request


REFUSALS = {
    "bad token": Refusal(
        lambda kms, broker, verifier: broker.datakey("sales", "forged"),
        ATTEST, "release_datakey", None, Reason.TOKEN_REJECTED,
    ),
    "empty token": Refusal(
        lambda kms, broker, verifier: broker.datakey("sales", ""),
        ATTEST, "release_datakey", None, Reason.TOKEN_REJECTED,
    ),
    "oversized token": Refusal(
        lambda kms, broker, verifier: broker.datakey("sales", "x" * 20_000),
        ATTEST, "release_datakey", None, Reason.TOKEN_REJECTED,
    ),
    "expired token, per the verifier": Refusal(
        _token(AttestationFailed("token expired")),
        ATTEST, "release_datakey", None, Reason.TOKEN_REJECTED,
    ),
    "bad token on unwrap": Refusal(
        _token(AttestationFailed("bad signature"), "unwrap"),
        ATTEST, "release_unwrap", 1, Reason.TOKEN_REJECTED,
    ),
    "expired claims, per the broker's clock": Refusal(
        _token(workload(expires_at=NOW).claims),
        ATTEST, "release_datakey", None, Reason.TOKEN_EXPIRED,
    ),
    "public key of the wrong size": Refusal(
        _token(workload(public_key=bytes(31)).claims),
        ATTEST, "release_datakey", None, Reason.BAD_PUBLIC_KEY,
    ),
    "low-order public key": Refusal(
        _token(workload(public_key=bytes(32)).claims),
        ATTEST, "release_datakey", None, Reason.BAD_PUBLIC_KEY,
    ),
    "unknown key": Refusal(
        _datakey("ghost"), ACCESS, "release_datakey", None, Reason.UNKNOWN_KEY
    ),
    "empty policy": Refusal(_datakey("pii"), ACCESS, "release_datakey", None, Reason.NO_POLICY),
    "wrong measurement": Refusal(
        _datakey("sales", lambda: workload(measurement=M[:-1] + "b")),
        ACCESS, "release_datakey", None, Reason.MEASUREMENT_MISMATCH,
    ),
    "wrong tee": Refusal(
        _datakey("sales", lambda: workload(TeeType.TDX)),
        ACCESS, "release_datakey", None, Reason.TEE_MISMATCH,
    ),
    "debug tee": Refusal(
        _datakey("sales", lambda: workload(debug=True)),
        ACCESS, "release_datakey", None, Reason.DEBUG_NOT_ALLOWED,
    ),
    "revoked tcb": Refusal(
        _datakey("sales", lambda: workload(tcb=TcbStatus.REVOKED)),
        ACCESS, "release_datakey", None, Reason.TCB_TOO_LOW,
    ),
    "sim outside dev": Refusal(
        _datakey("dev-only", lambda: workload(TeeType.SIM)),
        ACCESS, "release_datakey", None, Reason.SIM_NOT_ALLOWED,
    ),
    "unknown version": Refusal(
        _unwrap_version(9), ACCESS, "release_unwrap", 9, Reason.UNKNOWN_VERSION
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", REFUSALS.values(), ids=REFUSALS.keys())
def test_refusals_are_audited_and_release_nothing(
    kms: KeyService, broker: KeyBroker, verifier: StubVerifier, case: Refusal
) -> None:
    before = kms.audit.verify().count
    with pytest.raises(case.error[0]) as info:
        case.request(kms, broker, verifier)
    assert type(info.value) is case.error[0]
    assert str(info.value) == case.error[1]
    record = _last(kms)
    assert (record["op"], record["version"], record["outcome"]) == (case.op, case.version, "denied")
    assert record["detail"]["reason"] == case.reason
    verification = kms.audit.verify()
    assert verification.ok
    releases = [e for e in kms.audit.entries() if e.op.startswith("release_")]
    assert [e.outcome for e in releases] == ["denied"]
    assert verification.count - before in (1, 2)  # plus the KMS's own data key for unwraps


def test_an_unknown_key_and_a_policy_denial_look_the_same(
    broker: KeyBroker, verifier: StubVerifier
) -> None:
    token = verifier.issue(workload())
    errors = []
    for key in ("ghost", "pii"):
        with pytest.raises(AccessDenied) as info:
            broker.datakey(key, token)
        errors.append((type(info.value), str(info.value), info.value.diagnostics()))
    assert errors[0] == errors[1]


def test_a_denied_workload_learns_nothing_about_versions(
    kms: KeyService, broker: KeyBroker, verifier: StubVerifier
) -> None:
    blob = kms.generate_data_key("pii").wrapped.blob
    with pytest.raises(AccessDenied):
        broker.unwrap(WrappedKey("pii", 9, blob), verifier.issue(workload()))
    assert _last(kms)["detail"]["reason"] == Reason.NO_POLICY


def test_a_tampered_wrapped_key_is_an_integrity_error(
    kms: KeyService, broker: KeyBroker, verifier: StubVerifier
) -> None:
    wrapped = kms.generate_data_key("sales").wrapped
    forged = replace(wrapped, blob=wrapped.blob[:-1] + bytes([wrapped.blob[-1] ^ 1]))
    with pytest.raises(IntegrityError):
        broker.unwrap(forged, verifier.issue(workload()))
    assert (_last(kms)["outcome"], _last(kms)["detail"]["reason"]) == (
        "error",
        "wrapped data key failed authentication",
    )


def test_a_failing_verifier_is_recorded_and_surfaces(kms: KeyService) -> None:
    def broken(token: str) -> TokenClaims:
        raise RuntimeError("verifier bug")

    broker = KeyBroker(kms, broken, allow_sim=False, clock=lambda: NOW)
    with pytest.raises(RuntimeError):
        broker.datakey("sales", "tok")
    assert (_last(kms)["outcome"], _last(kms)["detail"]) == (
        "error",
        {"reason": Reason.VERIFIER_ERROR},
    )


def test_the_verifier_is_not_called_for_an_invalid_key_name(
    broker: KeyBroker, verifier: StubVerifier
) -> None:
    with pytest.raises(UsageError):
        broker.datakey("../etc", verifier.issue(workload()))
    assert verifier.calls == 0


# -- the wire form and the workload's side ----------------------------------------------------


@pytest.fixture
def released(broker: KeyBroker, verifier: StubVerifier) -> tuple[ReleasedKey, X25519PrivateKey]:
    w = workload()
    return broker.datakey("sales", verifier.issue(w)), w.private


def test_released_keys_round_trip_through_dicts(
    released: tuple[ReleasedKey, X25519PrivateKey],
) -> None:
    key, private = released
    wire = key.to_dict()
    assert set(wire) == {"wrapped_key", "sealed_key", "purpose"}
    again = ReleasedKey.from_dict(wire)
    assert again == key
    assert open_released(again, private) == open_released(key, private)


MALFORMED = {
    "not a dict": lambda d: ["x"],
    "missing field": lambda d: {k: v for k, v in d.items() if k != "purpose"},
    "extra field": lambda d: {**d, "plaintext": "x"},
    "bad base64": lambda d: {**d, "sealed_key": "!!!"},
    "empty sealed key": lambda d: {**d, "sealed_key": ""},
    "bad wrapped key": lambda d: {**d, "wrapped_key": "ppml1:sales:x:AAAA"},
    "bad purpose": lambda d: {**d, "purpose": "export"},
    "not text": lambda d: {**d, "sealed_key": 5},
}


@pytest.mark.parametrize("mangle", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_wire_forms_are_integrity_errors(
    released: tuple[ReleasedKey, X25519PrivateKey], mangle: Callable[[dict[str, Any]], Any]
) -> None:
    with pytest.raises(IntegrityError):
        ReleasedKey.from_dict(mangle(released[0].to_dict()))


def test_a_released_key_opens_only_as_what_it_was_released_for(
    kms: KeyService, released: tuple[ReleasedKey, X25519PrivateKey]
) -> None:
    key, private = released
    other_wrapped = kms.generate_data_key("sales").wrapped
    for forged in (
        replace(key, purpose="unwrap"),
        replace(key, wrapped=other_wrapped),
        replace(key, sealed_key=key.sealed_key[:-1] + bytes([key.sealed_key[-1] ^ 1])),
    ):
        with pytest.raises(IntegrityError):
            open_released(forged, private)
    with pytest.raises(IntegrityError):
        open_released(key, private, purpose="unwrap")
    with pytest.raises(IntegrityError):
        open_released(key, private, wrapped=other_wrapped)
    with pytest.raises(IntegrityError):
        open_released(key, generate_keypair()[0])


# -- concurrency ------------------------------------------------------------------------------


def test_concurrent_releases_and_policy_changes_keep_the_audit_chain(
    kms: KeyService, verifier: StubVerifier
) -> None:
    broker = KeyBroker(kms, verifier, allow_sim=False, clock=lambda: NOW)
    w = workload()
    token = verifier.issue(w)
    file_key = kms.generate_data_key("sales")
    start = threading.Barrier(5)
    outcomes: list[str] = []
    lock = threading.Lock()

    def release(i: int) -> None:
        start.wait()
        for j in range(15):
            try:
                if (i + j) % 2:
                    key = broker.datakey("sales", token)
                else:
                    key = broker.unwrap(file_key.wrapped, token)
                    assert open_released(key, w.private).plaintext == file_key.plaintext
                open_released(key, w.private)
                result = "ok"
            except AccessDenied:
                result = "denied"
            with lock:
                outcomes.append(result)

    def toggle() -> None:
        start.wait()
        store = kms.policies(allow_sim=False)
        for _ in range(10):
            store.revoke("sales", M)
            store.allow("sales", Rule(TeeType.SGX, M))

    with ThreadPoolExecutor(max_workers=5) as pool:
        futures = [pool.submit(release, i) for i in range(4)] + [pool.submit(toggle)]
        for future in futures:
            future.result()

    assert len(outcomes) == 60
    verification = kms.audit.verify()
    assert verification.ok, verification.reason
    releases = [e for e in kms.audit.entries() if e.op.startswith("release_")]
    assert sorted(e.outcome for e in releases) == sorted(outcomes)
    assert len([e for e in kms.audit.entries() if e.op.startswith("policy_")]) == 22


def test_only_calls_no_token_authenticates_are_audited_sparingly(
    kms: KeyService, broker: KeyBroker, verifier: StubVerifier
) -> None:
    """From one client address: bad tokens are recorded once per window (the rest counted);
    a token whose signature verified (here expired) is an authenticated caller, recorded every
    time; an in-process call (no address) is recorded every time too."""
    expired = verifier.issue(workload(expires_at=NOW, token_id="old"))
    before = kms.audit.entries(limit=1)[0].seq
    for token in ("forged", "forged", "forged", expired, expired):
        with pytest.raises(AttestationFailed):
            broker.authenticate("release_datakey", "sales", token, client="203.0.113.9")
    for _ in range(2):
        with pytest.raises(AttestationFailed):
            broker.datakey("sales", "forged")
    new = [e for e in kms.audit.entries() if e.seq > before]
    assert [(e.detail["reason"], e.detail.get("client")) for e in new] == [
        (Reason.TOKEN_REJECTED, "203.0.113.9"),
        (Reason.TOKEN_EXPIRED, "203.0.113.9"),
        (Reason.TOKEN_EXPIRED, "203.0.113.9"),
        (Reason.TOKEN_REJECTED, None),
        (Reason.TOKEN_REJECTED, None),
    ]
    assert new[1].detail["token_id"] == "old"
    broker.flush()
    assert kms.audit.entries(limit=1)[0].detail["suppressed"] == 2
