"""Parsing SGX v3 and TDX v4/v5 quotes: real vectors field by field, synthetic quotes of every
kind, and every malformed shape (versions, key types, certification data, lengths, trailing)."""

from __future__ import annotations

import base64
import dataclasses
import json
import struct
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from tests.support.evidence.intel import (
    IntelTestPki,
    raw_public_key,
    sgx_body,
    sgx_quote,
    td_body,
    tdx_quote,
)
from tests.support.vectors import VECTORS

from ppml.attestation.intel.quote import (
    HEADER_LEN,
    MAX_QUOTE_LEN,
    SGX_REPORT_LEN,
    TD10_REPORT_LEN,
    TD15_REPORT_LEN,
    QuoteHeader,
    SgxQuote,
    SgxReportBody,
    TdReportBody,
    TdxQuote,
    parse_pck_chain_pem,
    parse_quote,
    parse_sgx_quote,
    parse_tdx_quote,
)
from ppml.errors import EvidenceError


def _vector(name: str) -> tuple[bytes, dict[str, Any]]:
    folder = VECTORS / name
    return (folder / "quote.dat").read_bytes(), json.loads((folder / "expected.json").read_text())


@pytest.fixture(scope="module")
def pki() -> IntelTestPki:
    return IntelTestPki.create(seed=7)


# --- real vectors ------------------------------------------------------------------------------


def _check_common(q: SgxQuote | TdxQuote, raw: bytes, exp: dict[str, Any]) -> None:
    h = exp["header"]
    assert len(raw) == exp["file_len"]
    assert q.header.version == h["version"]
    assert q.header.att_key_type == h["att_key_type"]
    assert q.header.tee_type == int(h["tee_type"], 16)
    assert q.header.qe_svn == h["qe_svn(off8)"]
    assert q.header.pce_svn == h["pce_svn(off10)"]
    assert q.header.qe_vendor_id.hex() == h["qe_vendor_id"]
    assert q.header.user_data.hex() == h["user_data"]
    qe = exp["qe_report"]
    assert q.qe_report.mr_enclave.hex() == qe["mr_enclave"]
    assert q.qe_report.mr_signer.hex() == qe["mr_signer"]
    assert q.qe_report.isv_prod_id == qe["isv_prod_id"]
    assert q.qe_report.isv_svn == qe["isv_svn"]
    assert q.qe_report.attributes.hex() == qe["attributes"]
    assert q.qe_report.report_data.hex() == qe["report_data"]
    assert SgxReportBody.from_bytes(q.qe_report_bytes) == q.qe_report
    assert q.attestation_key.hex() == exp["attestation_key_xy"]
    assert q.qe_auth_data.hex() == exp["qe_auth_data"]
    assert q.cert_data_type == exp["cert_data_type"] == 5
    chain = exp["pck_chain"]
    assert [c.subject.rfc4514_string() for c in q.pck_chain] == chain["subjects"]
    assert [c.not_valid_after_utc.isoformat() for c in q.pck_chain] == chain["not_after"]
    assert q.pck_chain_pem in raw
    assert q.trailing_bytes == b""
    assert raw.startswith(q.signed_bytes)
    assert q.signed_bytes[:HEADER_LEN] == q.header.to_bytes()


def test_sgx_v3_vector_every_expected_field() -> None:
    raw, exp = _vector("sgx-v3-occlum")
    q = parse_quote(raw)
    assert isinstance(q, SgxQuote)
    assert parse_sgx_quote(raw) == q
    _check_common(q, raw, exp)
    b = exp["body"]
    assert q.body.cpu_svn.hex() == b["cpu_svn"]
    assert q.body.misc_select == int.from_bytes(bytes.fromhex(b["misc_select"]), "little")
    assert q.body.isv_ext_prod_id.hex() == b["isv_ext_prod_id"]
    assert q.body.attributes.hex() == b["attributes"]
    assert q.body.mr_enclave.hex() == b["mr_enclave"]
    assert q.body.mr_signer.hex() == b["mr_signer"]
    assert q.body.config_id.hex() == b["config_id"]
    assert q.body.isv_prod_id == b["isv_prod_id"]
    assert q.body.isv_svn == b["isv_svn"]
    assert q.body.config_svn == b["config_svn"]
    assert q.body.isv_family_id.hex() == b["isv_family_id"]
    assert q.body.report_data.hex() == b["report_data"]
    assert q.report_data.startswith(b"test")
    assert q.debug and q.body.attribute_flags == 0x07
    assert q.signed_bytes == raw[: HEADER_LEN + SGX_REPORT_LEN]


def test_tdx_v4_vector_every_expected_field() -> None:
    raw, exp = _vector("tdx-v4")
    q = parse_quote(raw)
    assert isinstance(q, TdxQuote)
    assert parse_tdx_quote(raw) == q
    _check_common(q, raw, exp)
    assert exp["outer_cert_data_type"] == 6
    for name, value in exp["body"].items():
        assert getattr(q.body, name).hex() == value, name
    assert q.body_type == 2 and not q.body.is_td15
    assert q.body.tee_tcb_svn2 is None and q.body.mr_service_td is None
    assert q.debug
    assert q.body.rtmrs == (q.body.rtmr0, q.body.rtmr1, q.body.rtmr2, q.body.rtmr3)
    assert q.signed_bytes == raw[: HEADER_LEN + TD10_REPORT_LEN]
    assert TdReportBody.from_bytes(q.body.to_bytes()) == q.body
    assert q.body.to_bytes() == raw[HEADER_LEN : HEADER_LEN + TD10_REPORT_LEN]


def test_vector_pem_chain_keeps_its_terminator() -> None:
    raw, _ = _vector("tdx-v4")
    q = parse_quote(raw)
    assert q.pck_chain_pem.endswith(b"\x00")
    assert parse_pck_chain_pem(q.pck_chain_pem) == q.pck_chain


# --- synthetic quotes ---------------------------------------------------------------------------


def test_synthetic_sgx_quote_round_trips_every_field(pki: IntelTestPki) -> None:
    body = sgx_body(
        debug=True,
        mr_enclave=b"\x11" * 32,
        mr_signer=b"\x22" * 32,
        isv_prod_id=3,
        isv_svn=9,
        config_svn=2,
        misc_select=0x01020304,
        config_id=b"\x33" * 64,
        report_data=b"\x44" * 64,
    )
    raw = sgx_quote(pki, body, user_data=b"\x55" * 20, qe_auth_data=b"auth")
    q = parse_quote(raw)
    assert isinstance(q, SgxQuote)
    assert q.body == body and q.debug and q.report_data == b"\x44" * 64
    assert q.header == QuoteHeader(3, 2, 0, 8, 13, q.header.qe_vendor_id, b"\x55" * 20)
    assert q.signed_bytes == q.header.to_bytes() + body.to_bytes()
    assert q.attestation_key == raw_public_key(pki.attestation_key)
    assert q.qe_auth_data == b"auth"
    assert q.pck_chain_pem == pki.chain_pem()
    assert [c.public_bytes(Encoding.DER) for c in q.pck_chain] == [
        c.public_bytes(Encoding.DER) for c in (pki.pck_cert, pki.ca_cert, pki.root_cert)
    ]
    assert not parse_quote(sgx_quote(pki, sgx_body(debug=False))).debug


@pytest.mark.parametrize("version", [4, 5])
def test_synthetic_tdx_10_body(pki: IntelTestPki, version: int) -> None:
    body = td_body(debug=True, mr_td=b"\x01" * 48, rtmr3=b"\x02" * 48, report_data=b"\x03" * 64)
    q = parse_quote(tdx_quote(pki, body, version=version))
    assert isinstance(q, TdxQuote)
    assert q.version == version and q.body == body and q.body_type == 2 and q.debug
    descriptor = struct.pack("<HI", 2, TD10_REPORT_LEN) if version == 5 else b""
    assert q.signed_bytes == q.header.to_bytes() + descriptor + body.to_bytes()


def test_synthetic_tdx_15_body(pki: IntelTestPki) -> None:
    body = td_body(td15=True, tee_tcb_svn2=b"\x09" * 16, mr_service_td=b"\x0a" * 48)
    q = parse_quote(tdx_quote(pki, body, version=5))
    assert isinstance(q, TdxQuote)
    assert q.body_type == 3 and q.body.is_td15 and not q.debug
    assert q.body.tee_tcb_svn2 == b"\x09" * 16 and q.body.mr_service_td == b"\x0a" * 48
    assert len(q.signed_bytes) == HEADER_LEN + 6 + TD15_REPORT_LEN


def test_td15_body_in_v4_quote_is_refused(pki: IntelTestPki) -> None:
    raw = tdx_quote(pki, td_body(td15=True), version=4)
    with pytest.raises(EvidenceError):
        parse_quote(raw)


@pytest.mark.parametrize("kind", ["sgx", "tdx4", "tdx5"])
def test_trailing_bytes_are_reported_and_not_parsed(pki: IntelTestPki, kind: str) -> None:
    inner = sgx_quote(pki)  # a whole quote as trailing garbage is still only bytes
    trailing = b"\xff\x00garbage" + inner
    raw = {
        "sgx": lambda: sgx_quote(pki, trailing=trailing),
        "tdx4": lambda: tdx_quote(pki, trailing=trailing),
        "tdx5": lambda: tdx_quote(pki, version=5, trailing=trailing),
    }[kind]()
    q = parse_quote(raw)
    assert q.trailing_bytes == trailing
    assert raw == q.signed_bytes + raw[len(q.signed_bytes) : -len(trailing)] + trailing


# --- unsupported shapes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "tee_type"), [(1, 0), (2, 0), (4, 0), (5, 0), (6, 0x81), (3, 0x81), (3, 0x80)]
)
def test_unsupported_version_and_tee_type(pki: IntelTestPki, version: int, tee_type: int) -> None:
    raw = sgx_quote(pki, version=version, tee_type=tee_type)
    with pytest.raises(EvidenceError, match="version"):
        parse_quote(raw)


def test_per_type_parsers_refuse_the_other_type(pki: IntelTestPki) -> None:
    with pytest.raises(EvidenceError, match="not a TDX"):
        parse_tdx_quote(sgx_quote(pki))
    with pytest.raises(EvidenceError, match="not an SGX"):
        parse_sgx_quote(tdx_quote(pki))


@pytest.mark.parametrize("key_type", [0, 1, 3, 4, 0xFFFF])
def test_unsupported_attestation_key_type(pki: IntelTestPki, key_type: int) -> None:
    for raw in (sgx_quote(pki, att_key_type=key_type), tdx_quote(pki, att_key_type=key_type)):
        with pytest.raises(EvidenceError, match="attestation key type"):
            parse_quote(raw)
    with pytest.raises(EvidenceError, match="attestation key type"):
        parse_sgx_quote(sgx_quote(pki, att_key_type=key_type))


@pytest.mark.parametrize("cert_type", [1, 2, 3, 4, 6, 7])
def test_unsupported_certification_data_type_v3(pki: IntelTestPki, cert_type: int) -> None:
    with pytest.raises(EvidenceError, match=f"certification data type {cert_type}"):
        parse_quote(sgx_quote(pki, cert_data_type=cert_type))


@pytest.mark.parametrize("outer", [1, 5, 7])
def test_unsupported_outer_certification_data_type(pki: IntelTestPki, outer: int) -> None:
    with pytest.raises(EvidenceError, match=f"certification data type {outer}"):
        parse_quote(tdx_quote(pki, outer_cert_data_type=outer))


@pytest.mark.parametrize("inner", [1, 3, 6])
def test_unsupported_inner_certification_data_type(pki: IntelTestPki, inner: int) -> None:
    with pytest.raises(EvidenceError, match=f"certification data type {inner}"):
        parse_quote(tdx_quote(pki, cert_data_type=inner, version=5))


@pytest.mark.parametrize("body_type", [0, 1, 4])
def test_unsupported_v5_body_type(pki: IntelTestPki, body_type: int) -> None:
    with pytest.raises(EvidenceError, match="body type"):
        parse_quote(tdx_quote(pki, version=5, body_type=body_type))


def test_v5_body_size_must_match_body_type(pki: IntelTestPki) -> None:
    raw = bytearray(tdx_quote(pki, version=5))
    struct.pack_into("<I", raw, HEADER_LEN + 2, TD15_REPORT_LEN)
    with pytest.raises(EvidenceError, match="body size"):
        parse_quote(bytes(raw))
    with pytest.raises(EvidenceError, match="body size"):
        parse_quote(tdx_quote(pki, td_body(), version=5, body_type=3))


def test_not_bytes_and_too_large() -> None:
    with pytest.raises(EvidenceError, match="bytes"):
        parse_quote("not bytes")  # type: ignore[arg-type]
    with pytest.raises(EvidenceError, match="larger"):
        parse_quote(bytes(MAX_QUOTE_LEN + 1))
    with pytest.raises(EvidenceError):
        parse_quote(b"")


# --- length fields -----------------------------------------------------------------------------


def _length_fields(raw: bytes) -> list[tuple[str, int, str]]:
    """(name, offset, struct format) of every length field of a synthetic quote."""
    q = parse_quote(raw)
    off = len(q.signed_bytes)
    fields = [("signature data size", off, "<I")]
    off += 4 + 64 + 64
    if isinstance(q, TdxQuote):
        if q.version == 5:
            fields.insert(0, ("body size", HEADER_LEN + 2, "<I"))
        fields.append(("certification data size", off + 2, "<I"))
        off += 6
    off += SGX_REPORT_LEN + 64
    fields.append(("QE auth data size", off, "<H"))
    off += 2 + len(q.qe_auth_data)
    fields.append(("certification data size", off + 2, "<I"))
    return fields


def _quotes(pki: IntelTestPki) -> dict[str, bytes]:
    return {
        "sgx": sgx_quote(pki),
        "tdx4": tdx_quote(pki),
        "tdx5": tdx_quote(pki, version=5),
        "tdx5-15": tdx_quote(pki, td_body(td15=True), version=5),
    }


@pytest.mark.parametrize("kind", ["sgx", "tdx4", "tdx5", "tdx5-15"])
def test_truncated_at_every_byte(pki: IntelTestPki, kind: str) -> None:
    raw = _quotes(pki)[kind]
    for n in range(len(raw)):
        with pytest.raises(EvidenceError):
            parse_quote(raw[:n])


@pytest.mark.parametrize("kind", ["sgx", "tdx4", "tdx5", "tdx5-15"])
def test_truncated_inside_every_length_field(pki: IntelTestPki, kind: str) -> None:
    """Cut inside each length field, with the enclosing sizes made consistent with the cut, so
    that the field itself is what is missing."""
    raw = _quotes(pki)[kind]
    fields = _length_fields(raw)
    containers = [(off, fmt) for name, off, fmt in fields if name == "signature data size"]
    if isinstance(parse_quote(raw), TdxQuote):
        containers.append(next((off, fmt) for n, off, fmt in fields if n.startswith("cert")))
    for name, off, fmt in fields:
        for cut in range(off, off + struct.calcsize(fmt)):
            mutated = bytearray(raw[:cut])
            for c_off, c_fmt in containers:
                if c_off < off:
                    struct.pack_into(c_fmt, mutated, c_off, cut - c_off - 4)
            with pytest.raises(EvidenceError, match=name):
                parse_quote(bytes(mutated))


@pytest.mark.parametrize("kind", ["sgx", "tdx4", "tdx5", "tdx5-15"])
def test_every_length_field_overrun_or_short(pki: IntelTestPki, kind: str) -> None:
    raw = _quotes(pki)[kind]
    for name, off, fmt in _length_fields(raw):
        (value,) = struct.unpack_from(fmt, raw, off)
        top = (1 << (8 * struct.calcsize(fmt))) - 1
        for wrong in {value + 1, value + 1000, top, value - 1, 0} - {value}:
            mutated = bytearray(raw)
            struct.pack_into(fmt, mutated, off, min(max(wrong, 0), top))
            with pytest.raises(EvidenceError):
                parse_quote(bytes(mutated))
        if name == "signature data size":
            # an overrun by exactly the trailing bytes appended is still an exact-fill error
            mutated = bytearray(raw + b"\x00")
            struct.pack_into(fmt, mutated, off, value + 1)
            with pytest.raises(EvidenceError, match="after the end"):
                parse_quote(bytes(mutated))


# --- PEM chain and dataclass validation -----------------------------------------------------------


def test_pem_chain_strictness(pki: IntelTestPki) -> None:
    pem = pki.chain_pem()
    assert len(parse_pck_chain_pem(pem + b"\n\x00\x00")) == 3
    bad = [
        b"",
        b"\x00\x00",
        b"junk" + pem,
        pem + b"junk",
        pem.replace(b"-----\n-----BEGIN", b"-----\nx-----BEGIN", 1),
        pem[:-30],
        pem.replace(b"MII", b"MIJ", 1),
        b"\x00" + pem,
        pki.pck_cert.public_bytes(Encoding.PEM) * 9,
    ]
    for data in bad:
        with pytest.raises(EvidenceError, match="PCK certificate chain"):
            parse_pck_chain_pem(data)


def test_pem_chain_refuses_certificates_that_break_rfc_5280(pki: IntelTestPki) -> None:
    der = pki.pck_cert.public_bytes(Encoding.DER)
    serial = pki.pck_cert.serial_number.to_bytes(2, "big")
    variants = [
        der.replace(b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x42", 1),  # version 67
        der.replace(b"\x02\x02" + serial, b"\x02\x02\x90" + serial[1:], 1),  # negative serial
    ]
    for variant in variants:
        assert variant != der
        pem = x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM)
        body = base64.encodebytes(variant)
        mangled = pem.split(b"\n", 1)[0] + b"\n" + body + pem.rsplit(b"\n", 2)[1] + b"\n"
        with pytest.raises(EvidenceError, match="PCK certificate chain"):
            parse_pck_chain_pem(mangled)


def test_pem_chain_errors_surface_from_parse(pki: IntelTestPki) -> None:
    with pytest.raises(EvidenceError, match="PCK certificate chain"):
        parse_quote(tdx_quote(pki, pck_chain_pem=b"not a certificate"))


def test_dataclasses_validate_and_are_frozen(pki: IntelTestPki) -> None:
    with pytest.raises(EvidenceError, match="mr_enclave"):
        sgx_body(mr_enclave=b"short")
    with pytest.raises(EvidenceError, match="isv_svn"):
        sgx_body(isv_svn=70000)
    with pytest.raises(EvidenceError, match="go together"):
        td_body(tee_tcb_svn2=bytes(16))
    with pytest.raises(EvidenceError, match="rtmr0"):
        td_body(rtmr0=bytes(32))
    with pytest.raises(EvidenceError, match="user_data"):
        QuoteHeader(3, 2, 0, 0, 0, bytes(16), bytes(19))
    with pytest.raises(EvidenceError):
        SgxReportBody.from_bytes(bytes(SGX_REPORT_LEN - 1))
    with pytest.raises(EvidenceError):
        TdReportBody.from_bytes(bytes(TD10_REPORT_LEN + 1))
    q = parse_quote(tdx_quote(pki))
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.signature = bytes(64)  # type: ignore[misc]
    with pytest.raises(EvidenceError, match="attestation_key"):
        dataclasses.replace(q, attestation_key=bytes(63))
    with pytest.raises(EvidenceError, match="body_type"):
        dataclasses.replace(q, body_type=3)
    with pytest.raises(EvidenceError, match="qe_report"):
        dataclasses.replace(q, qe_report=dataclasses.replace(q.qe_report, isv_svn=99))


def test_reserved_bytes_stay_in_signed_bytes(pki: IntelTestPki) -> None:
    raw = bytearray(sgx_quote(pki))
    raw[HEADER_LEN + 20] = 0xAA  # reserved area of the SGX report body
    q = parse_quote(bytes(raw))
    assert q.signed_bytes[HEADER_LEN + 20] == 0xAA
    assert isinstance(q, SgxQuote) and q.body.to_bytes()[20] == 0
