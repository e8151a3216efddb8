"""Fuzzing the SEV-SNP parser and verifier: random and mutated input raises only EvidenceError,
and no change to the signed bytes ever verifies."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.support.evidence.snp import SnpEvidence, make_endorsement_key, make_evidence, make_pki

from ppml.attestation.amd.report import REPORT_SIZE, SIGNED_SIZE, parse_report
from ppml.attestation.amd.verify import (
    OID_BL_SPL,
    OID_HW_ID,
    OID_PRODUCT_NAME,
    OID_SNP_SPL,
    ChainCache,
    verify_report,
)
from ppml.attestation.steps import VerificationReport
from ppml.errors import EvidenceError

FUZZ = settings(
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
CACHE = ChainCache()
EVIDENCE: dict[tuple[str, int], SnpEvidence] = {}


def _evidence(product: str, version: int) -> SnpEvidence:
    key = (product, version)
    if key not in EVIDENCE:
        EVIDENCE[key] = make_evidence(product=product, version=version)
    return EVIDENCE[key]


def _parse_and_verify(data: bytes, ev: SnpEvidence) -> VerificationReport | None:
    try:
        report = parse_report(data)
    except EvidenceError:
        return None
    result = verify_report(report, cache=CACHE, **ev.verify_kwargs())  # type: ignore[arg-type]
    assert isinstance(result, VerificationReport)
    return result


evidences = st.sampled_from([("Milan", 2), ("Milan", 3), ("Genoa", 5), ("Turin", 3), ("Turin", 5)])


@FUZZ
@given(st.binary(min_size=0, max_size=REPORT_SIZE + 64))
def test_random_bytes_raise_only_evidence_error(data: bytes) -> None:
    _parse_and_verify(data, _evidence("Milan", 3))


@FUZZ
@given(
    version=st.integers(2, 5),
    policy_high=st.integers(0, 0xFF),
    key_info=st.integers(0, 0x1F),
    body=st.binary(min_size=REPORT_SIZE - 0x4C, max_size=REPORT_SIZE - 0x4C),
    zero_reserved=st.booleans(),
)
def test_random_reports_with_a_plausible_header(
    version: int, policy_high: int, key_info: int, body: bytes, zero_reserved: bool
) -> None:
    header = struct.pack("<IIQ", version, 0, 0x30000 | policy_high << 18)
    header += bytes(0x30 - len(header)) + struct.pack("<II", 0, 1) + bytes(8)
    header += struct.pack("<QI", 0, key_info)
    data = bytearray(header + body)
    assert len(data) == REPORT_SIZE
    if zero_reserved:  # reach the verifier more often
        data[0x4C:0x50] = bytes(4)
        data[0x18B:0x1A0] = bytes(0x15)
        data[0x1EB] = data[0x1EF] = 0
        data[0x1F8 if version < 5 else 0x208 : SIGNED_SIZE] = bytes(
            SIGNED_SIZE - (0x1F8 if version < 5 else 0x208)
        )
        if version < 3:
            data[0x188:0x18B] = bytes(3)
        data[SIGNED_SIZE + 48 : SIGNED_SIZE + 72] = bytes(24)
        data[SIGNED_SIZE + 120 :] = bytes(REPORT_SIZE - SIGNED_SIZE - 120)
    result = _parse_and_verify(bytes(data), _evidence("Milan", 3))
    assert result is None or not result.verified


@FUZZ
@given(
    which=evidences,
    flips=st.dictionaries(
        st.integers(0, SIGNED_SIZE - 1), st.integers(1, 255), min_size=1, max_size=6
    ),
)
def test_no_change_to_the_signed_bytes_verifies(
    which: tuple[str, int], flips: dict[int, int]
) -> None:
    ev = _evidence(*which)
    data = bytearray(ev.raw)
    for offset, mask in flips.items():
        data[offset] ^= mask
    assert bytes(data[:SIGNED_SIZE]) != ev.raw[:SIGNED_SIZE]
    result = _parse_and_verify(bytes(data), ev)
    assert result is None or not result.verified


@FUZZ
@given(
    which=evidences,
    flips=st.dictionaries(
        st.integers(SIGNED_SIZE, REPORT_SIZE - 1), st.integers(1, 255), min_size=1, max_size=4
    ),
)
def test_changes_to_the_signature_block_never_verify(
    which: tuple[str, int], flips: dict[int, int]
) -> None:
    ev = _evidence(*which)
    data = bytearray(ev.raw)
    for offset, mask in flips.items():
        data[offset] ^= mask
    result = _parse_and_verify(bytes(data), ev)
    assert result is None or not result.verified


@FUZZ
@given(which=evidences, extra=st.binary(max_size=64))
def test_trailing_bytes_change_nothing(which: tuple[str, int], extra: bytes) -> None:
    ev = _evidence(*which)
    result = _parse_and_verify(ev.raw + extra, ev)
    assert result is not None and result.verified


@settings(max_examples=300, deadline=None, database=None)
@given(
    oid=st.sampled_from([OID_BL_SPL, OID_SNP_SPL, OID_HW_ID, OID_PRODUCT_NAME]),
    value=st.binary(min_size=1, max_size=80),
)
def test_garbage_extension_values_never_raise(oid: object, value: bytes) -> None:
    ev = _evidence("Milan", 3)
    vcek = make_endorsement_key(make_pki("Milan"), override={oid: value})  # type: ignore[dict-item]
    result = verify_report(parse_report(ev.raw), **{**ev.verify_kwargs(), "vcek": vcek.cert})  # type: ignore[arg-type]
    assert isinstance(result, VerificationReport)
