"""Property tests: no mutation of valid sim evidence, and no random input, ever verifies."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from ppml.attestation import SimPlatform, SimVerifier, report_data_for
from ppml.errors import AttestationFailed

KEY = Ed25519PrivateKey.from_private_bytes(b"\x42" * 32)
VERIFIER = SimVerifier(KEY.public_key())
REPORT_DATA = report_data_for(b"\x01" * 32, b"\x02" * 32)
EVIDENCE = SimPlatform(KEY).quote("c0" * 32, REPORT_DATA)
FUZZ = settings(max_examples=400, deadline=None, database=None)


@st.composite
def mutations(draw: st.DrawFn) -> bytes:
    data = bytearray(EVIDENCE)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "splice"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[i] ^= draw(st.integers(1, 255))
        elif kind == "set" and data:
            data[i] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and data:
            del data[i : i + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del data[i:]
        elif kind == "splice":
            j = draw(st.integers(i, len(data)))
            data[i:j] = draw(st.binary(max_size=16))
    return bytes(data)


@FUZZ
@given(mutations())
def test_mutated_evidence_never_verifies(mutated: bytes) -> None:
    if mutated == EVIDENCE:
        return
    with pytest.raises(AttestationFailed):
        VERIFIER.verify(mutated, expected_report_data=REPORT_DATA)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_never_verify(data: bytes) -> None:
    with pytest.raises(AttestationFailed):
        VERIFIER.verify(data, expected_report_data=REPORT_DATA)


def test_the_unmutated_evidence_does_verify() -> None:
    assert VERIFIER.verify(EVIDENCE, expected_report_data=REPORT_DATA).debug is False
