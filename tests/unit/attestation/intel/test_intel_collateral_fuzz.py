"""Fuzzing the collateral parsers: mutated or random input raises only `EvidenceError`."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tests.support.evidence.intel_collateral import (
    TestPki,
    isv_level,
    make_crl,
    module_identity,
    qe_identity_body,
    signed_document,
    tcb_info_body,
    tcb_level,
)

from ppml.attestation.collateral import Collateral
from ppml.attestation.intel.collateral import (
    parse_crl,
    parse_pem_chain,
    parse_qe_identity_json,
    parse_tcb_info_json,
)
from ppml.errors import EvidenceError

FUZZ = settings(max_examples=300, deadline=None, database=None)

_PKI = TestPki.create()
_TCB_TDX = signed_document(
    "tcbInfo",
    tcb_info_body(
        tee="tdx",
        levels=[tcb_level(tdx=(3,) * 16, advisory_ids=["INTEL-SA-00001"])],
        module_identities=[module_identity("TDX_01", [isv_level(1), isv_level(0, "OutOfDate")])],
    ),
    _PKI.signing_key,
)
_TCB_V2 = signed_document(
    "tcbInfo", tcb_info_body(version=2, levels=[tcb_level(version=2)]), _PKI.signing_key
)
_QE = signed_document("enclaveIdentity", qe_identity_body(), _PKI.signing_key)
_CRL_DER = make_crl(_PKI.pck_ca, _PKI.pck_ca_key, revoked_serials=[1, 2, 3])
_CRL_PEM = make_crl(_PKI.pck_ca, _PKI.pck_ca_key, revoked_serials=[1], pem=True)
_CHAIN = _PKI.signing_chain_pem()


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "dup"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 16))]
        elif kind == "truncate":
            del data[pos:]
        elif kind == "dup" and data:
            end = min(len(data), pos + draw(st.integers(1, 64)))
            data[pos:pos] = data[pos:end]
    return bytes(data)


def _only_evidence_errors(parse: Any, data: bytes) -> None:
    with contextlib.suppress(EvidenceError):
        parse(data)


@FUZZ
@given(mutated(_TCB_TDX))
def test_mutated_tcb_info(data: bytes) -> None:
    _only_evidence_errors(parse_tcb_info_json, data)


@FUZZ
@given(mutated(_TCB_V2))
def test_mutated_tcb_info_v2(data: bytes) -> None:
    _only_evidence_errors(parse_tcb_info_json, data)


@FUZZ
@given(mutated(_QE))
def test_mutated_qe_identity(data: bytes) -> None:
    _only_evidence_errors(parse_qe_identity_json, data)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)


@FUZZ
@given(_JSON, st.sampled_from(["tcbInfo", "enclaveIdentity"]))
def test_random_json_bodies(body: Any, key: str) -> None:
    raw = json.dumps(body).encode()
    doc = b'{"' + key.encode() + b'":' + raw + b',"signature":"' + b"00" * 64 + b'"}'
    _only_evidence_errors(parse_tcb_info_json, doc)
    _only_evidence_errors(parse_qe_identity_json, doc)


@FUZZ
@given(st.sampled_from(sorted(tcb_info_body(tee="tdx"))), _JSON)
def test_random_field_values(name: str, value: Any) -> None:
    body = tcb_info_body(tee="tdx")
    body[name] = value
    _only_evidence_errors(parse_tcb_info_json, signed_document("tcbInfo", body, _PKI.signing_key))


# A CRL whose version field says 33: cryptography raises InvalidVersion, not ValueError.
_CRL_VERSION_33 = (
    b"-----BEGIN X509 CRL-----\nMIHVMH0CASEwCgYIKoZIzj0EAwIwODEhMB8GA1UEAwwYVGVzdCBTR1ggUENLIFBs\n"
    b"YXRmb3JtIENBMRMwEQYDVQQKDApwcG1sIHRlc3RzFw0yNTAxMDEwMDAwMDBaFw0y\n"
    b"NTAyMDEwMDAwMDBaMBQwEgIBARcNMjUwMTAxMDAwMDAwWjAKBggqhkjOPQQDAgNI\n"
    b"ADBFAiEA+07wHYpRKg1b9R5MN9tpMzYdb7ynLIj2TZXs4vAo8BICIHpvXU/FZSxR\n"
    b"4fvYS1fOkTPal3VoRUSfOGAXj6wg5ceX\n-----END X509 CRL-----\n"
)


@FUZZ
@given(st.one_of(mutated(_CRL_DER), mutated(_CRL_PEM), st.binary(max_size=300)))
@example(_CRL_VERSION_33)
def test_mutated_crls(data: bytes) -> None:
    _only_evidence_errors(lambda d: parse_crl(d, source="pck_crl"), data)


def test_a_crl_with_a_bad_version_is_evidence_error_in_every_loader() -> None:
    from ppml.attestation.intel.chain import load_crl

    _only_evidence_errors(load_crl, _CRL_VERSION_33)
    with pytest.raises(EvidenceError):
        load_crl(_CRL_VERSION_33)


@FUZZ
@given(st.one_of(mutated(_CHAIN), st.binary(max_size=300)))
def test_mutated_chains(data: bytes) -> None:
    _only_evidence_errors(lambda d: parse_pem_chain(d, source="chain"), data)


@FUZZ
@given(mutated(_TCB_TDX), mutated(_QE), mutated(_CRL_DER))
def test_mutated_collateral_parse_all(tcb: bytes, qe: bytes, crl: bytes) -> None:
    def parse(_: bytes) -> None:
        Collateral(
            tcb_info_json=tcb,
            tcb_info_issuer_chain=_CHAIN,
            qe_identity_json=qe,
            qe_identity_issuer_chain=_CHAIN,
            root_ca_crl=crl,
        ).parse_all()

    _only_evidence_errors(parse, b"")


def test_deeply_nested_json_is_refused() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    doc = b'{"tcbInfo":' + deep + b',"signature":"' + b"00" * 64 + b'"}'
    _only_evidence_errors(parse_tcb_info_json, doc)
    huge = b'{"tcbInfo":{"version":' + b"9" * 10_000 + b'},"signature":"' + b"00" * 64 + b'"}'
    _only_evidence_errors(parse_tcb_info_json, huge)


def test_a_chain_with_a_non_positive_serial_number_is_malformed() -> None:
    """Found by the fuzzer: cryptography only warns (deprecated) on a serial number that is not
    positive; RFC 5280 forbids it, so the chain is refused like any other malformed one."""
    data = (Path(__file__).parents[3] / "data" / "chain-non-positive-serial.pem").read_bytes()
    with pytest.raises(EvidenceError, match="not a PEM certificate chain"):
        parse_pem_chain(data, source="chain")


def test_a_chain_with_a_wrong_length_country_name_is_malformed() -> None:
    """Found by the fuzzer: a countryName of 10 characters is only a warning in cryptography;
    the chain is refused like any other malformed one."""
    data = (Path(__file__).parents[3] / "data" / "chain-long-country-name.pem").read_bytes()
    with pytest.raises(EvidenceError, match="not a PEM certificate chain"):
        parse_pem_chain(data, source="chain")
