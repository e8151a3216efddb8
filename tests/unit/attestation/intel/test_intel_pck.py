"""The Intel SGX PCK certificate extensions: real certificates, round trips, and a strict DER
reader that refuses every malformed, missing, duplicated or unknown field."""

from __future__ import annotations

import json

import pytest
from cryptography import x509
from tests.support.evidence.intel import (
    IntelTestPki,
    default_pck_extensions,
    der_int,
    der_oid,
    der_tlv,
    encode_pck_extensions,
)
from tests.support.vectors import VECTORS

from ppml.attestation.intel.pck import (
    PckExtensions,
    PlatformConfiguration,
    parse_pck_extensions,
)
from ppml.attestation.intel.quote import parse_quote
from ppml.errors import EvidenceError

ARC = "1.2.840.113741.1.13.1"


@pytest.mark.parametrize("name", ["sgx-v3-occlum", "tdx-v4"])
def test_real_pck_certificates(name: str) -> None:
    raw = (VECTORS / name / "quote.dat").read_bytes()
    exp = json.loads((VECTORS / name / "expected.json").read_text())["pck_chain"]["pck_sgx_ext"]
    ext = parse_pck_extensions(parse_quote(raw).pck_chain[0])
    assert ext.ppid.hex() == exp["ppid"]
    assert list(ext.sgx_tcb_components) == exp["tcb"]["comp_svn_01_16"]
    assert ext.pce_svn == exp["tcb"]["pcesvn"]
    assert ext.cpu_svn.hex() == exp["tcb"]["cpusvn"]
    assert ext.pce_id.hex() == exp["pceid"]
    assert ext.fmspc.hex() == exp["fmspc"]
    assert ext.sgx_type == exp["sgx_type"]
    assert ext.platform_instance_id is not None
    assert ext.platform_instance_id.hex() == exp["platform_instance_id"]
    assert exp["configuration"] == "present" and ext.configuration is not None


def test_ca_and_root_have_no_sgx_extension() -> None:
    raw = (VECTORS / "tdx-v4" / "quote.dat").read_bytes()
    for cert in parse_quote(raw).pck_chain[1:]:
        with pytest.raises(EvidenceError, match="has none"):
            parse_pck_extensions(cert)


@pytest.mark.parametrize(
    "ext",
    [
        default_pck_extensions(),
        default_pck_extensions(platform_instance_id=None, configuration=None, sgx_type=0),
        default_pck_extensions(configuration=PlatformConfiguration(None, False, None)),
        default_pck_extensions(configuration=PlatformConfiguration()),
        default_pck_extensions(
            sgx_tcb_components=tuple(range(240, 256)), pce_svn=0xFFFF, cpu_svn=b"\xff" * 16
        ),
        default_pck_extensions(sgx_tcb_components=(0,) * 16, pce_svn=0, sgx_type=2),
    ],
)
def test_round_trip(ext: PckExtensions) -> None:
    assert PckExtensions.from_der(encode_pck_extensions(ext)) == ext


def test_from_the_synthetic_certificate() -> None:
    ext = default_pck_extensions(fmspc=bytes.fromhex("30606a000000"), pce_svn=11)
    pki = IntelTestPki.create(seed=3, pck_extensions=ext)
    assert parse_pck_extensions(pki.pck_cert) == ext


# --- strictness ---------------------------------------------------------------------------------


def _entry(sub: str, value: bytes) -> bytes:
    return der_tlv(0x30, der_oid(f"{ARC}.{sub}") + value)


def _tcb(components: list[bytes] | None = None, extra: list[bytes] | None = None) -> bytes:
    comps = components or [_entry(f"2.{i}", der_int(0x02, 1)) for i in range(1, 17)]
    tail = [_entry("2.17", der_int(0x02, 13)), _entry("2.18", der_tlv(0x04, bytes(16)))]
    return _entry("2", der_tlv(0x30, b"".join(comps + tail + (extra or []))))


def _ext(items: list[bytes]) -> bytes:
    return der_tlv(0x30, b"".join(items))


def _base_items() -> list[bytes]:
    return [
        _entry("1", der_tlv(0x04, bytes(16))),
        _tcb(),
        _entry("3", der_tlv(0x04, bytes(2))),
        _entry("4", der_tlv(0x04, bytes(6))),
        _entry("5", der_int(0x0A, 0)),
    ]


def test_minimal_processor_extension_parses() -> None:
    ext = PckExtensions.from_der(_ext(_base_items()))
    assert ext.sgx_tcb_components == (1,) * 16 and ext.pce_svn == 13
    assert ext.platform_instance_id is None and ext.configuration is None


def _replace(index: int, item: bytes) -> bytes:
    items = _base_items()
    items[index] = item
    return _ext(items)


def _without(index: int) -> bytes:
    items = _base_items()
    del items[index]
    return _ext(items)


def _comps_with(i: int, item: bytes) -> list[bytes]:
    comps = [_entry(f"2.{n}", der_int(0x02, 1)) for n in range(1, 17)]
    comps[i] = item
    return comps


MALFORMED = {
    "missing PPID": _without(0),
    "missing TCB": _without(1),
    "missing PCE-ID": _without(2),
    "missing FMSPC": _without(3),
    "missing SGX type": _without(4),
    "duplicate FMSPC": _ext([*_base_items(), _entry("4", der_tlv(0x04, bytes(6)))]),
    "unknown top entry": _ext([*_base_items(), _entry("8", der_tlv(0x04, b""))]),
    "foreign arc": _ext([*_base_items(), der_tlv(0x30, der_oid("1.2.3.4") + der_tlv(4, b""))]),
    "short PPID": _replace(0, _entry("1", der_tlv(0x04, bytes(15)))),
    "PPID wrong tag": _replace(0, _entry("1", der_tlv(0x0C, bytes(16)))),
    "long FMSPC": _replace(3, _entry("4", der_tlv(0x04, bytes(7)))),
    "short PCE-ID": _replace(2, _entry("3", der_tlv(0x04, bytes(1)))),
    "SGX type as INTEGER": _replace(4, _entry("5", der_int(0x02, 0))),
    "SGX type too big": _replace(4, _entry("5", der_int(0x0A, 256))),
    "negative SGX type": _replace(4, _entry("5", der_tlv(0x0A, b"\xff"))),
    "non-minimal integer": _replace(4, _entry("5", der_tlv(0x0A, b"\x00\x01"))),
    "empty integer": _replace(4, _entry("5", der_tlv(0x0A, b""))),
    "component 256": _replace(1, _tcb(_comps_with(0, _entry("2.1", der_int(0x02, 256))))),
    "component missing": _replace(1, _tcb(_comps_with(5, _entry("2.1", der_int(0x02, 1))))),
    "component as octets": _replace(1, _tcb(_comps_with(2, _entry("2.3", der_tlv(4, b"\x01"))))),
    "TCB unknown entry": _replace(1, _tcb(extra=[_entry("2.19", der_int(0x02, 1))])),
    "TCB duplicate": _replace(1, _tcb(extra=[_entry("2.17", der_int(0x02, 1))])),
    "CPUSVN short": _replace(
        1,
        _entry(
            "2",
            der_tlv(
                0x30,
                b"".join(
                    [_entry(f"2.{i}", der_int(0x02, 1)) for i in range(1, 17)]
                    + [_entry("2.17", der_int(0x02, 1)), _entry("2.18", der_tlv(4, bytes(15)))]
                ),
            ),
        ),
    ),
    "bad boolean": _ext(
        [*_base_items(), _entry("7", der_tlv(0x30, _entry("7.1", b"\x01\x01\x01")))]
    ),
    "config unknown": _ext(
        [*_base_items(), _entry("7", der_tlv(0x30, _entry("7.4", b"\x01\x01\x00")))]
    ),
    "instance id short": _ext([*_base_items(), _entry("6", der_tlv(0x04, bytes(15)))]),
    "trailing after sequence": _ext(_base_items()) + b"\x00",
    "not a sequence": b"\x31" + _ext(_base_items())[1:],
    "entry with extra value": _replace(
        0, der_tlv(0x30, der_oid(f"{ARC}.1") + der_tlv(4, bytes(16)) * 2)
    ),
    "empty": b"",
    "indefinite length": b"\x30\x80" + b"".join(_base_items()) + b"\x00\x00",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_extension_is_refused(name: str) -> None:
    with pytest.raises(EvidenceError, match="PCK certificate SGX extensions"):
        PckExtensions.from_der(MALFORMED[name])


def test_length_encodings_must_be_minimal_and_bounded() -> None:
    good = _ext(_base_items())
    assert good[1] == 0x82  # long form, two length bytes
    body = good[4:]
    n = len(body)
    for data in (
        b"\x30\x83\x00" + n.to_bytes(2, "big") + body,  # unsupported length of length
        b"\x30\x82" + (n + 1).to_bytes(2, "big") + body,  # overruns
        b"\x30\x82\x00\x10" + bytes(16),  # fits in one length byte
        b"\x30\x81\x10" + bytes(16),  # fits in the short form
        b"\x3f\x01\x00",  # multi-byte tag
    ):
        with pytest.raises(EvidenceError):
            PckExtensions.from_der(data)
    oid = der_oid(f"{ARC}.1")
    padded = bytes([0x06, len(oid) - 1]) + b"\x80" + oid[2:-1]  # leading 0x80 in an arc
    with pytest.raises(EvidenceError):
        PckExtensions.from_der(der_tlv(0x30, der_tlv(0x30, padded + der_tlv(4, bytes(16)))))


def test_every_truncation_is_refused() -> None:
    der = encode_pck_extensions(default_pck_extensions())
    for n in range(len(der)):
        with pytest.raises(EvidenceError):
            PckExtensions.from_der(der[:n])


def test_oversized_value_is_refused() -> None:
    with pytest.raises(EvidenceError, match="at most"):
        PckExtensions.from_der(der_tlv(0x30, bytes(5000)))


def test_certificate_with_malformed_extension() -> None:
    pki = IntelTestPki.create(seed=4, pck_extension_der=b"\x30\x03\x02\x01\x00")
    with pytest.raises(EvidenceError, match="PCK certificate SGX extensions"):
        parse_pck_extensions(pki.pck_cert)
    assert isinstance(pki.pck_cert, x509.Certificate)


def test_dataclass_validation() -> None:
    with pytest.raises(EvidenceError, match="fmspc"):
        default_pck_extensions(fmspc=b"\x00")
    with pytest.raises(EvidenceError, match="sgx_tcb_components"):
        default_pck_extensions(sgx_tcb_components=(1,) * 15)
    with pytest.raises(EvidenceError, match="pce_svn"):
        default_pck_extensions(pce_svn=-1)
