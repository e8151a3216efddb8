"""Fuzzing the quote parser and verifier: random and mutated quotes raise only `EvidenceError`,
and no mutation of a signed or bound region still verifies."""

from __future__ import annotations

import contextlib
import struct

from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.support.evidence.intel import (
    DEFAULT_AT,
    IntelTestPki,
    default_pck_extensions,
    encode_pck_extensions,
    sgx_quote,
    td_body,
    tdx_quote,
)
from tests.support.vectors import VECTORS

from ppml.attestation.intel.chain import intel_sgx_root, verify_quote
from ppml.attestation.intel.pck import PckExtensions
from ppml.attestation.intel.quote import SgxQuote, TdxQuote, parse_quote
from ppml.errors import EvidenceError

FUZZ = settings(max_examples=400, deadline=None, database=None)

PKI = IntelTestPki.create(seed=31)
ROOTS = {"synthetic": PKI.root_cert, "intel": intel_sgx_root()}
SAMPLES: list[tuple[bytes, str]] = [
    (sgx_quote(PKI), "synthetic"),
    (tdx_quote(PKI), "synthetic"),
    (tdx_quote(PKI, version=5), "synthetic"),
    (tdx_quote(PKI, td_body(td15=True), version=5), "synthetic"),
]
for name in ("sgx-v3-occlum", "tdx-v4"):
    SAMPLES.append(((VECTORS / name / "quote.dat").read_bytes(), "intel"))
VECTOR_AT = DEFAULT_AT.replace(year=2025)


def _at(root: str) -> object:
    return VECTOR_AT if root == "intel" else DEFAULT_AT


def _fingerprint(q: SgxQuote | TdxQuote) -> tuple[object, ...]:
    """Everything that is signed or bound: if it changed, the quote must not verify. For the
    certificates that is the signed TBS part and the signature value; the outer encoding of a
    certificate's signature (its BIT STRING header) is not covered by any signature."""
    return (
        q.signed_bytes,
        q.signature,
        q.attestation_key,
        q.qe_report_bytes,
        q.qe_report_signature,
        q.qe_auth_data,
        tuple((c.tbs_certificate_bytes, c.signature) for c in q.pck_chain),
        q.pck_chain[-1].public_bytes(Encoding.DER),  # the root copy must equal the pin
    )


ORIGINALS = [_fingerprint(parse_quote(raw)) for raw, _ in SAMPLES]


def _parse_and_verify(data: bytes, root: str) -> tuple[SgxQuote | TdxQuote, bool] | None:
    try:
        q = parse_quote(data)
    except EvidenceError:
        return None
    report = verify_quote(q, root=ROOTS[root], at=_at(root))  # type: ignore[arg-type]
    return q, report.verified


@FUZZ
@given(st.binary(max_size=6000))
def test_random_bytes_raise_only_evidence_error(data: bytes) -> None:
    _parse_and_verify(data, "synthetic")
    with contextlib.suppress(EvidenceError):
        verify_quote(data, root=PKI.root_cert, at=DEFAULT_AT)


@FUZZ
@given(
    st.sampled_from([(3, 0), (4, 0x81), (5, 0x81)]),
    st.binary(min_size=0, max_size=5000),
)
def test_random_bodies_behind_a_valid_header(kind: tuple[int, int], rest: bytes) -> None:
    version, tee = kind
    header = struct.pack("<HHIHH", version, 2, tee, 0, 0) + bytes(36)
    _parse_and_verify(header + rest, "synthetic")


_MUTATIONS = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 64)),
    st.tuples(st.just("u32"), st.integers(0, 10**6), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("u16"), st.integers(0, 10**6), st.integers(0, 2**16 - 1)),
)


def _mutate(raw: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(raw)
    for op, pos, value in ops:
        if not data:
            break
        i = pos % len(data)
        if op == "set":
            data[i] = value
        elif op == "flip":
            data[i] ^= 1 << value
        elif op == "insert":
            data.insert(i, value)
        elif op == "delete":
            del data[i : i + value]
        elif op == "u32" and i + 4 <= len(data):
            struct.pack_into("<I", data, i, value)
        elif op == "u16" and i + 2 <= len(data):
            struct.pack_into("<H", data, i, value)
    return bytes(data)


@FUZZ
@given(st.integers(0, 10**6), st.lists(_MUTATIONS, min_size=1, max_size=4))
def test_mutated_quotes_raise_only_evidence_error_and_never_verify_changed(
    which: int, ops: list[tuple[str, int, int]]
) -> None:
    index = which % len(SAMPLES)
    raw, root = SAMPLES[index]
    mutated = _mutate(raw, ops)
    result = _parse_and_verify(mutated, root)
    if result is None:
        return
    q, verified = result
    if verified:
        assert _fingerprint(q) == ORIGINALS[index]


@FUZZ
@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(1, 255))
def test_every_signed_byte_matters(which: int, pos: int, xor: int) -> None:
    """Change one byte inside the signed and bound regions (header, body, signature, key, QE
    report, its signature, auth data): the quote must not verify."""
    index = which % len(SAMPLES)
    raw, root = SAMPLES[index]
    q = parse_quote(raw)
    sig_off = len(q.signed_bytes) + 4
    regions = [(0, len(q.signed_bytes)), (sig_off, sig_off + 128)]
    for part in (q.qe_report_bytes + q.qe_report_signature, q.qe_auth_data):
        start = raw.index(part, sig_off)
        regions.append((start, start + len(part)))
    total = sum(end - start for start, end in regions)
    offset = pos % total
    for start, end in regions:
        if offset < end - start:
            target = start + offset
            break
        offset -= end - start
    data = bytearray(raw)
    data[target] ^= xor
    result = _parse_and_verify(bytes(data), root)
    assert result is None or not result[1]


@settings(max_examples=300, deadline=None, database=None)
@given(st.binary(max_size=800))
def test_pck_extension_reader_raises_only_evidence_error(data: bytes) -> None:
    with contextlib.suppress(EvidenceError):
        PckExtensions.from_der(data)


_EXT_DER = encode_pck_extensions(default_pck_extensions())


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(_MUTATIONS, min_size=1, max_size=3))
def test_mutated_pck_extension_raises_only_evidence_error(ops: list[tuple[str, int, int]]) -> None:
    with contextlib.suppress(EvidenceError):
        PckExtensions.from_der(_mutate(_EXT_DER, ops))
