"""The attestation service end to end with the sim TEE, and its fail-closed refusals."""

from __future__ import annotations

import datetime as _dt
import logging
import os
from collections.abc import Sequence
from types import MappingProxyType

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tests.support.clock import FakeClock

from ppml.attestation import (
    AttestationService,
    ChallengeStore,
    EvidenceClaims,
    SimPlatform,
    SimVerifier,
    TcbStatus,
    TeeType,
    TokenIssuer,
    TokenVerifier,
    Verifier,
    report_data_for,
)
from ppml.errors import AccessDenied, AttestationFailed, ConfigurationError

T0 = _dt.datetime(2030, 6, 1, tzinfo=_dt.UTC)
TOKEN_KEY = ec.derive_private_key(0xC0FFEE, ec.SECP256R1())
PLATFORM = SimPlatform(Ed25519PrivateKey.from_private_bytes(b"\x05" * 32))
MEASUREMENT = "9f" * 32


def appraise_by_measurement(claims: EvidenceClaims) -> Sequence[str]:
    ok = claims.measurements.get("measurement") == MEASUREMENT and not claims.debug
    return ["sales-read"] if ok else []


def sim_service(clock: FakeClock | None = None, **kwargs: object) -> AttestationService:
    options: dict[str, object] = {"allow_sim": True, "appraise": appraise_by_measurement}
    options.update(kwargs)
    return AttestationService.for_keys(
        TOKEN_KEY,
        PLATFORM.public_key,
        clock=clock or FakeClock(T0),
        **options,  # type: ignore[arg-type]
    )


def test_end_to_end_with_sim() -> None:
    clock = FakeClock(T0)
    service = sim_service(clock)
    workload_key = os.urandom(32)
    challenge = service.challenge()
    evidence = PLATFORM.quote(MEASUREMENT, report_data_for(challenge.nonce, workload_key))

    result = service.attest("sim", evidence, challenge.nonce, workload_key)

    assert result.claims.tee is TeeType.SIM
    assert result.claims.measurements == {"measurement": MEASUREMENT}
    assert result.claims.public_key == workload_key
    assert result.claims.policies_matched == ("sales-read",)
    assert result.claims.tcb_status is TcbStatus.UP_TO_DATE
    assert result.expires_at == T0 + _dt.timedelta(minutes=5)
    assert result.token not in repr(result)
    broker_side = TokenVerifier(TOKEN_KEY.public_key(), clock=clock)
    assert broker_side.verify(result.token) == result.claims


def test_debug_evidence_reaches_the_token_and_the_appraiser() -> None:
    service = sim_service()
    key = os.urandom(32)
    challenge = service.challenge()
    evidence = PLATFORM.quote(MEASUREMENT, report_data_for(challenge.nonce, key), debug=True)
    result = service.attest("sim", evidence, challenge.nonce, key)
    assert result.claims.debug is True
    assert result.claims.policies_matched == ()


def test_default_appraiser_matches_no_policies() -> None:
    service = AttestationService.for_keys(
        TOKEN_KEY, PLATFORM.public_key, allow_sim=True, clock=FakeClock(T0)
    )
    key = os.urandom(32)
    challenge = service.challenge()
    evidence = PLATFORM.quote(MEASUREMENT, report_data_for(challenge.nonce, key))
    assert service.attest("sim", evidence, challenge.nonce, key).claims.policies_matched == ()


def test_a_nonce_cannot_be_used_twice() -> None:
    service = sim_service()
    key = os.urandom(32)
    challenge = service.challenge()
    evidence = PLATFORM.quote(MEASUREMENT, report_data_for(challenge.nonce, key))
    service.attest("sim", evidence, challenge.nonce, key)
    with pytest.raises(AttestationFailed, match="already used"):
        service.attest("sim", evidence, challenge.nonce, key)


def test_a_failed_attempt_uses_up_the_nonce() -> None:
    service = sim_service()
    key = os.urandom(32)
    challenge = service.challenge()
    good = PLATFORM.quote(MEASUREMENT, report_data_for(challenge.nonce, key))
    with pytest.raises(AttestationFailed):
        service.attest("sim", good[:-1], challenge.nonce, key)
    with pytest.raises(AttestationFailed, match="already used"):
        service.attest("sim", good, challenge.nonce, key)


def test_unknown_and_expired_nonces_are_refused() -> None:
    clock = FakeClock(T0)
    service = sim_service(clock)
    key = os.urandom(32)
    stranger = os.urandom(32)
    evidence = PLATFORM.quote(MEASUREMENT, report_data_for(stranger, key))
    with pytest.raises(AttestationFailed, match="unknown"):
        service.attest("sim", evidence, stranger, key)
    challenge = service.challenge()
    evidence = PLATFORM.quote(MEASUREMENT, report_data_for(challenge.nonce, key))
    clock.now += _dt.timedelta(seconds=61)
    with pytest.raises(AttestationFailed, match="expired"):
        service.attest("sim", evidence, challenge.nonce, key)


def test_evidence_bound_to_another_nonce_or_key_is_refused() -> None:
    service = sim_service()
    key = os.urandom(32)
    first, second = service.challenge(), service.challenge()
    for_first = PLATFORM.quote(MEASUREMENT, report_data_for(first.nonce, key))
    with pytest.raises(AttestationFailed, match="report data"):
        service.attest("sim", for_first, second.nonce, key)
    with pytest.raises(AttestationFailed, match="report data"):
        service.attest("sim", for_first, first.nonce, os.urandom(32))


@pytest.mark.parametrize("length", [0, 31, 33, 65])
def test_workload_key_must_be_32_bytes(length: int) -> None:
    service = sim_service()
    key = os.urandom(length)
    challenge = service.challenge()
    evidence = PLATFORM.quote(MEASUREMENT, report_data_for(challenge.nonce, key))
    with pytest.raises(AttestationFailed, match="32 bytes"):
        service.attest("sim", evidence, challenge.nonce, key)


def test_sim_is_refused_when_not_allowed() -> None:
    service = sim_service(allow_sim=False)
    assert service.tee_types == frozenset()
    key = os.urandom(32)
    challenge = service.challenge()
    evidence = PLATFORM.quote(MEASUREMENT, report_data_for(challenge.nonce, key))
    with pytest.raises(AttestationFailed, match="sim evidence is not accepted"):
        service.attest("sim", evidence, challenge.nonce, key)


def test_sim_verifier_given_explicitly_is_still_refused_without_allow_sim() -> None:
    service = AttestationService(
        verifiers={TeeType.SIM: SimVerifier(PLATFORM.public_key)},
        challenges=ChallengeStore(),
        issuer=TokenIssuer(TOKEN_KEY),
    )
    assert service.tee_types == frozenset()
    key = os.urandom(32)
    challenge = service.challenge()
    evidence = PLATFORM.quote(MEASUREMENT, report_data_for(challenge.nonce, key))
    with pytest.raises(AttestationFailed, match="sim"):
        service.attest("sim", evidence, challenge.nonce, key)


@pytest.mark.parametrize("tee", ["tpm", "SIM", "", "sim ", "sgx", "tdx", "snp"])
def test_unknown_or_unconfigured_tee_types_are_refused(tee: str) -> None:
    service = sim_service()
    key = os.urandom(32)
    challenge = service.challenge()
    evidence = PLATFORM.quote(MEASUREMENT, report_data_for(challenge.nonce, key))
    with pytest.raises(AttestationFailed, match=r"unknown TEE type|no verifier"):
        service.attest(tee, evidence, challenge.nonce, key)


class FakeSgxVerifier:
    """A stand-in hardware verifier: accepts evidence that is exactly the report data."""

    tee = TeeType.SGX

    def verify(self, evidence: bytes, *, expected_report_data: bytes) -> EvidenceClaims:
        if evidence != expected_report_data:
            raise AttestationFailed("fake sgx: report data mismatch")
        return EvidenceClaims(
            tee=TeeType.SGX,
            measurements=MappingProxyType({"mr_enclave": "11" * 32, "mr_signer": "22" * 32}),
            debug=False,
            tcb_status=TcbStatus.SW_HARDENING_NEEDED,
            report_data=evidence,
        )


def test_other_tee_verifiers_plug_in_behind_the_same_interface() -> None:
    verifier: Verifier = FakeSgxVerifier()
    service = AttestationService.for_keys(
        TOKEN_KEY, verifiers={TeeType.SGX: verifier}, clock=FakeClock(T0)
    )
    assert service.tee_types == {TeeType.SGX}
    key = os.urandom(32)
    challenge = service.challenge()
    result = service.attest("sgx", report_data_for(challenge.nonce, key), challenge.nonce, key)
    assert result.claims.tee is TeeType.SGX
    assert result.claims.tcb_status is TcbStatus.SW_HARDENING_NEEDED
    assert set(result.claims.measurements) == {"mr_enclave", "mr_signer"}


def test_a_verifier_returning_claims_for_another_tee_is_refused() -> None:
    class Confused(FakeSgxVerifier):
        tee = TeeType.TDX

    service = AttestationService.for_keys(
        TOKEN_KEY, verifiers={TeeType.TDX: Confused()}, clock=FakeClock(T0)
    )
    key = os.urandom(32)
    challenge = service.challenge()
    with pytest.raises(AttestationFailed, match="another TEE"):
        service.attest("tdx", report_data_for(challenge.nonce, key), challenge.nonce, key)


def test_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="sim platform public key"):
        AttestationService.for_keys(TOKEN_KEY, allow_sim=True)
    with pytest.raises(ConfigurationError, match="another TEE"):
        AttestationService(
            verifiers={TeeType.SGX: SimVerifier(PLATFORM.public_key)},
            challenges=ChallengeStore(),
            issuer=TokenIssuer(TOKEN_KEY),
        )


def test_an_appraiser_returning_one_string_is_a_configuration_error() -> None:
    service = sim_service(appraise=lambda claims: "sales-read")
    key = os.urandom(32)
    challenge = service.challenge()
    evidence = PLATFORM.quote(MEASUREMENT, report_data_for(challenge.nonce, key))
    with pytest.raises(ConfigurationError):
        service.attest("sim", evidence, challenge.nonce, key)


def test_refusals_are_logged_with_the_reason_and_without_secrets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = sim_service()
    key = os.urandom(32)
    challenge = service.challenge()
    evidence = PLATFORM.quote(MEASUREMENT, report_data_for(os.urandom(32), key))
    with caplog.at_level(logging.INFO, logger="ppml.attestation"):
        with pytest.raises(AttestationFailed):
            service.attest("sim", evidence, challenge.nonce, key)
        with pytest.raises(AttestationFailed):
            service.attest("x" * 500, evidence, challenge.nonce, key)
    messages = [r.getMessage() for r in caplog.records if r.name == "ppml.attestation"]
    assert len(messages) == 2
    assert "report data does not match" in messages[0]
    assert "unknown TEE type" in messages[1]
    assert "x" * 33 not in messages[1]
    for text in messages:
        assert key.hex() not in text
        assert challenge.nonce.hex() not in text


def test_success_is_logged_without_the_token(caplog: pytest.LogCaptureFixture) -> None:
    service = sim_service()
    key = os.urandom(32)
    challenge = service.challenge()
    evidence = PLATFORM.quote(MEASUREMENT, report_data_for(challenge.nonce, key))
    with caplog.at_level(logging.INFO, logger="ppml.attestation"):
        result = service.attest("sim", evidence, challenge.nonce, key)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "attestation accepted" in text
    assert result.claims.token_id in text
    assert result.token not in text
    for segment in result.token.split("."):
        assert segment not in text
    assert key.hex() not in text


def test_appraiser_denial_propagates_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    def deny(claims: EvidenceClaims) -> Sequence[str]:
        raise AccessDenied("measurement not in any policy")

    service = sim_service(appraise=deny)
    key = os.urandom(32)
    challenge = service.challenge()
    evidence = PLATFORM.quote(MEASUREMENT, report_data_for(challenge.nonce, key))
    with (
        caplog.at_level(logging.WARNING, logger="ppml.attestation"),
        pytest.raises(AccessDenied),
    ):
        service.attest("sim", evidence, challenge.nonce, key)
    assert "measurement not in any policy" in caplog.text
