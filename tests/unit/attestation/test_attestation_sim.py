"""The sim TEE: quotes verify, and every kind of bad evidence is refused with AttestationFailed."""

from __future__ import annotations

import json
import os
from types import MappingProxyType
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ppml._internal.canonical import canonical_json
from ppml.attestation import (
    EvidenceClaims,
    SimEvidence,
    SimPlatform,
    SimVerifier,
    TcbStatus,
    TeeType,
    Verifier,
    report_data_for,
    sim_platform_key_id,
)
from ppml.attestation.sim import MAX_SIM_EVIDENCE_BYTES, SIM_EVIDENCE_FORMAT
from ppml.errors import AttestationFailed, ConfigurationError, UsageError

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PLATFORM = SimPlatform(KEY)
VERIFIER = SimVerifier(KEY.public_key())
MEASUREMENT = "5e" * 32
NONCE = bytes(range(100, 132))
WORKLOAD_KEY = bytes(range(200, 232))
REPORT_DATA = report_data_for(NONCE, WORKLOAD_KEY)


def good_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "format": SIM_EVIDENCE_FORMAT,
        "tee": "sim",
        "measurement": MEASUREMENT,
        "debug": False,
        "report_data": REPORT_DATA.hex(),
        "tcb_status": "UpToDate",
        "platform_key_id": sim_platform_key_id(KEY.public_key()),
    }
    body.update(changes)
    return body


def signed(body: dict[str, Any], key: Ed25519PrivateKey = KEY) -> bytes:
    """Evidence over an arbitrary body, correctly signed, so only the body's content is wrong."""
    message = SIM_EVIDENCE_FORMAT.encode() + b"\x00" + canonical_json(body)
    return canonical_json({"body": body, "signature": key.sign(message).hex()})


def refused(evidence: object, expected: bytes = REPORT_DATA) -> str:
    with pytest.raises(AttestationFailed) as info:
        VERIFIER.verify(evidence, expected_report_data=expected)  # type: ignore[arg-type]
    return info.value.message


def test_quote_verifies_and_says_sim() -> None:
    evidence = PLATFORM.quote(MEASUREMENT, REPORT_DATA)
    claims = VERIFIER.verify(evidence, expected_report_data=REPORT_DATA)
    assert claims == EvidenceClaims(
        tee=TeeType.SIM,
        measurements={"measurement": MEASUREMENT},
        debug=False,
        tcb_status=TcbStatus.UP_TO_DATE,
        report_data=REPORT_DATA,
        extra={"platform_key_id": PLATFORM.key_id},
    )
    assert json.loads(evidence)["body"]["tee"] == "sim"
    assert json.loads(evidence)["body"]["format"] == "ppml-sim-evidence/1"


def test_sha384_measurement_and_debug_round_trip() -> None:
    evidence = PLATFORM.quote("a1" * 48, REPORT_DATA, debug=True)
    claims = VERIFIER.verify(evidence, expected_report_data=REPORT_DATA)
    assert claims.measurements["measurement"] == "a1" * 48
    assert claims.debug is True


def test_evidence_is_deterministic_canonical_json_and_parses_back() -> None:
    evidence = PLATFORM.quote(MEASUREMENT, REPORT_DATA)
    assert evidence == PLATFORM.quote(MEASUREMENT, REPORT_DATA)  # Ed25519 is deterministic
    assert canonical_json(json.loads(evidence)) == evidence
    parsed = SimEvidence.parse(evidence)
    assert parsed.to_bytes() == evidence
    assert parsed.report_data == REPORT_DATA


def test_claims_cannot_be_modified() -> None:
    claims = VERIFIER.verify(
        PLATFORM.quote(MEASUREMENT, REPORT_DATA), expected_report_data=REPORT_DATA
    )
    assert isinstance(claims.measurements, MappingProxyType)
    with pytest.raises(TypeError):
        claims.measurements["measurement"] = "00" * 32  # type: ignore[index]


def test_sim_verifier_meets_the_verifier_protocol() -> None:
    verifier: Verifier = VERIFIER
    assert isinstance(verifier, Verifier)
    assert verifier.tee is TeeType.SIM


def test_wrong_report_data_is_refused() -> None:
    evidence = PLATFORM.quote(MEASUREMENT, REPORT_DATA)
    assert "report data" in refused(evidence, expected=bytes(64))
    flipped_last = REPORT_DATA[:-1] + bytes([REPORT_DATA[-1] ^ 1])
    assert "report data" in refused(evidence, expected=flipped_last)


def test_report_data_of_another_nonce_or_key_is_refused() -> None:
    other_nonce = report_data_for(os.urandom(32), WORKLOAD_KEY)
    other_key = report_data_for(NONCE, os.urandom(32))
    for report_data in (other_nonce, other_key):
        evidence = PLATFORM.quote(MEASUREMENT, report_data)
        assert "report data" in refused(evidence)


@pytest.mark.parametrize("length", [0, 32, 63, 65])
def test_expected_report_data_of_the_wrong_width_is_refused(length: int) -> None:
    evidence = PLATFORM.quote(MEASUREMENT, REPORT_DATA)
    refused(evidence, expected=REPORT_DATA[:length] + bytes(max(0, length - 64)))


def test_evidence_from_another_platform_key_is_refused() -> None:
    other = SimPlatform.generate()
    assert "another sim platform key" in refused(other.quote(MEASUREMENT, REPORT_DATA))


def test_signature_by_another_key_claiming_our_key_id_is_refused() -> None:
    forged = signed(good_body(), key=Ed25519PrivateKey.generate())
    assert "signature" in refused(forged)


def test_every_single_byte_flip_is_refused() -> None:
    evidence = PLATFORM.quote(MEASUREMENT, REPORT_DATA)
    for i in range(len(evidence)):
        for mask in (0x01, 0x20, 0x80):
            mutated = bytearray(evidence)
            mutated[i] ^= mask
            refused(bytes(mutated))


def test_every_truncation_is_refused() -> None:
    evidence = PLATFORM.quote(MEASUREMENT, REPORT_DATA)
    for n in range(len(evidence)):
        refused(evidence[:n])
    refused(evidence + b" ")
    refused(evidence + b"\n")


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\x00" * 40,
        b"\xff\xfe{}",
        b"not json",
        b"{",
        b"[" * 5000 + b"]" * 5000,
        b"null",
        b"42",
        b'"text"',
        b"[]",
        b"{}",
        b'{"body":{},"signature":""}',
        b'{"body":[],"signature":"00"}',
        b'{"body":NaN,"signature":"00"}',
    ],
)
def test_garbage_is_refused(garbage: bytes) -> None:
    refused(garbage)


def test_non_bytes_evidence_is_refused() -> None:
    evidence = PLATFORM.quote(MEASUREMENT, REPORT_DATA)
    refused(evidence.decode())
    refused(bytearray(evidence))
    refused(None)


def test_oversized_evidence_is_refused() -> None:
    body = good_body()
    evidence = signed(body)
    padded = evidence[:-1] + b"," + b'"x":"' + b"a" * MAX_SIM_EVIDENCE_BYTES + b'"}'
    assert "larger than" in refused(padded)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tee", "sgx"),
        ("tee", "SIM"),
        ("tcb_status", "OutOfDate"),
        ("tcb_status", "Unknown"),
        ("debug", "false"),
        ("debug", 0),
        ("debug", None),
        ("measurement", "5E" * 32),
        ("measurement", "5e" * 31),
        ("measurement", "5e" * 33),
        ("measurement", "5e" * 64),
        ("measurement", "zz" * 32),
        ("measurement", 5),
        ("report_data", REPORT_DATA.hex()[:-2]),
        ("report_data", REPORT_DATA.hex().upper()),
        ("report_data", list(REPORT_DATA)),
        ("platform_key_id", "00" * 31),
        ("platform_key_id", None),
    ],
)
def test_correctly_signed_but_wrong_fields_are_refused(field: str, value: object) -> None:
    refused(signed(good_body(**{field: value})))


@pytest.mark.parametrize("version", ["ppml-sim-evidence/2", "ppml-sim-evidence/0", "", None, 1])
def test_unknown_format_version_is_refused(version: object) -> None:
    assert "format" in refused(signed(good_body(format=version)))


def test_missing_and_extra_fields_are_refused() -> None:
    for name in good_body():
        body = good_body()
        del body[name]
        refused(signed(body))
    refused(signed(good_body(nonce="00")))


def test_outer_document_must_have_exactly_body_and_signature() -> None:
    doc = json.loads(PLATFORM.quote(MEASUREMENT, REPORT_DATA))
    refused(canonical_json({**doc, "extra": 1}))
    refused(canonical_json({"body": doc["body"]}))
    refused(canonical_json({**doc, "signature": doc["signature"].upper()}))
    refused(canonical_json({**doc, "signature": doc["signature"][:-2]}))
    refused(canonical_json({**doc, "signature": 5}))


def test_non_canonical_encodings_of_valid_evidence_are_refused() -> None:
    evidence = PLATFORM.quote(MEASUREMENT, REPORT_DATA)
    doc = json.loads(evidence)
    assert "canonical" in refused(json.dumps(doc).encode())  # spaces
    assert "canonical" in refused(json.dumps(doc, sort_keys=True, indent=1).encode())
    escaped = evidence.replace(b'"tee":"sim"', b'"tee":"\\u0073im"')
    assert escaped != evidence
    assert "canonical" in refused(escaped)
    duplicated = evidence.replace(b'"debug":false', b'"debug":true,"debug":false')
    assert "canonical" in refused(duplicated)


def test_quote_rejects_bad_input() -> None:
    with pytest.raises(UsageError):
        PLATFORM.quote("5E" * 32, REPORT_DATA)
    with pytest.raises(UsageError):
        PLATFORM.quote(MEASUREMENT, REPORT_DATA[:32])
    with pytest.raises(UsageError):
        PLATFORM.quote(MEASUREMENT, REPORT_DATA, debug=1)  # type: ignore[arg-type]


def test_keys_of_the_wrong_type_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError):
        SimPlatform(KEY.public_key())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        SimVerifier(KEY)  # type: ignore[arg-type]
