"""Parsing SEV-SNP attestation reports: every field, every version, every refusal."""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import pytest
from tests.support.evidence.snp import (
    SnpReportFields,
    encode_report,
    make_evidence,
    sign_report,
)

from ppml.attestation.amd.report import (
    REPORT_SIZE,
    SIGNED_SIZE,
    GuestPolicy,
    PlatformInfo,
    SigningKey,
    SnpReport,
    TcbLayout,
    TcbVersion,
    parse_report,
    tcb_layout_for_family,
    tcb_layout_for_product,
)
from ppml.errors import EvidenceError

VECTOR = Path(__file__).parents[3] / "data" / "snp" / "milan_report_v3.bin"

ALL_FIELDS = SnpReportFields(
    version=5,
    guest_svn=0x01020304,
    policy=1 << 17 | 1 << 18 | 1 << 19 | 1 << 20 | 1 << 21 | 1 << 25 | 0x0207,
    family_id=bytes(range(1, 17)),
    image_id=bytes(range(17, 33)),
    vmpl=2,
    current_tcb=bytes([1, 2, 0, 0, 0, 0, 3, 4]),
    platform_info=0b1011_1111,
    author_key_en=True,
    mask_chip_key=True,
    signing_key=SigningKey.VLEK,
    report_data=bytes(range(64)),
    measurement=bytes(range(64, 112)),
    host_data=bytes(range(112, 144)),
    id_key_digest=bytes(range(144, 192)),
    author_key_digest=bytes(range(192, 240)),
    report_id=bytes(range(10, 42)),
    report_id_ma=bytes(range(42, 74)),
    reported_tcb=bytes([5, 6, 0, 0, 0, 0, 7, 8]),
    cpuid_family=0x19,
    cpuid_model=0x11,
    cpuid_stepping=0x02,
    chip_id=bytes(64),
    committed_tcb=bytes([9, 10, 0, 0, 0, 0, 11, 12]),
    current_build=21,
    current_minor=22,
    current_major=23,
    committed_build=24,
    committed_minor=25,
    committed_major=26,
    launch_tcb=bytes([13, 14, 0, 0, 0, 0, 15, 16]),
    launch_mit_vector=0x1122334455667788,
    current_mit_vector=0x99AABBCCDDEEFF00,
)


def _signed(fields: SnpReportFields) -> bytes:
    key = make_evidence().endorsement.key
    return sign_report(encode_report(fields), key)


def test_every_field_of_a_version_5_report() -> None:
    raw = _signed(ALL_FIELDS)
    r = parse_report(raw)
    f = ALL_FIELDS
    assert r.version == 5
    assert r.guest_svn == f.guest_svn
    assert r.policy == GuestPolicy(f.policy)
    assert r.family_id == f.family_id and r.image_id == f.image_id
    assert r.vmpl == 2 and r.signature_algo == 1
    assert r.current_tcb.raw == f.current_tcb
    assert (r.current_tcb.bootloader, r.current_tcb.tee) == (1, 2)
    assert (r.current_tcb.snp, r.current_tcb.microcode, r.current_tcb.fmc) == (3, 4, None)
    assert r.platform_info.value == f.platform_info
    assert r.author_key_en and r.mask_chip_key and r.signing_key is SigningKey.VLEK
    assert r.report_data == f.report_data
    assert r.measurement == f.measurement
    assert r.host_data == f.host_data
    assert r.id_key_digest == f.id_key_digest
    assert r.author_key_digest == f.author_key_digest
    assert r.report_id == f.report_id and r.report_id_ma == f.report_id_ma
    assert r.reported_tcb.raw == f.reported_tcb
    assert (r.cpuid_family, r.cpuid_model, r.cpuid_stepping) == (0x19, 0x11, 0x02)
    assert r.chip_id == bytes(64) and r.chip_id_masked
    assert r.committed_tcb.raw == f.committed_tcb
    assert (r.current_build, r.current_minor, r.current_major) == (21, 22, 23)
    assert (r.committed_build, r.committed_minor, r.committed_major) == (24, 25, 26)
    assert r.launch_tcb.raw == f.launch_tcb
    assert r.launch_mit_vector == f.launch_mit_vector
    assert r.current_mit_vector == f.current_mit_vector
    assert r.signature_r.to_bytes(48, "little") == raw[SIGNED_SIZE : SIGNED_SIZE + 48]
    assert r.signature_s.to_bytes(48, "little") == raw[SIGNED_SIZE + 72 : SIGNED_SIZE + 120]
    assert r.signed_bytes == raw[:SIGNED_SIZE] and len(r.signed_bytes) == 0x2A0
    assert r.raw == raw and r.trailing_bytes == b""
    assert r.tcb_layout is TcbLayout.MILAN_GENOA


def test_policy_bits_are_decoded() -> None:
    p = parse_report(_signed(ALL_FIELDS)).policy
    assert (p.abi_major, p.abi_minor) == (2, 7)
    assert not p.smt_allowed
    assert p.migrate_ma_allowed and p.debug_allowed and p.single_socket and p.cxl_allowed
    assert not p.mem_aes_256_xts_required and not p.rapl_disabled
    assert not p.ciphertext_hiding_required and p.page_swap_disabled
    q = GuestPolicy(1 << 16 | 1 << 17 | 1 << 22 | 1 << 23 | 1 << 24)
    assert q.smt_allowed and q.mem_aes_256_xts_required and q.rapl_disabled
    assert q.ciphertext_hiding_required and not q.debug_allowed


def test_platform_info_bits_are_decoded() -> None:
    info = PlatformInfo(0b1011_1111)
    assert info.smt_enabled and info.tsme_enabled and info.ecc_enabled and info.rapl_disabled
    assert info.ciphertext_hiding_enabled and info.alias_check_complete and info.tio_enabled
    none = PlatformInfo(1 << 40)  # undefined bits are kept, not refused
    assert none.value == 1 << 40 and not none.smt_enabled and not none.tio_enabled


@pytest.mark.parametrize("version", [2, 3, 4, 5])
def test_each_supported_version_parses(version: int) -> None:
    ev = make_evidence(version=version, launch_mit_vector=7, current_mit_vector=9)
    r = parse_report(ev.raw)
    assert r.version == version
    if version >= 3:
        assert (r.cpuid_family, r.cpuid_model, r.cpuid_stepping) == (0x19, 0x01, 0x01)
    else:
        assert r.cpuid_family is None and r.cpuid_model is None and r.cpuid_stepping is None
        assert r.tcb_layout is TcbLayout.UNKNOWN
    if version >= 5:
        assert (r.launch_mit_vector, r.current_mit_vector) == (7, 9)
    else:
        assert r.launch_mit_vector is None and r.current_mit_vector is None


def test_turin_tcb_layout_comes_from_the_cpuid_family() -> None:
    r = parse_report(make_evidence(product="Turin", version=5).raw)
    assert r.tcb_layout is TcbLayout.TURIN
    t = r.reported_tcb
    assert (t.fmc, t.bootloader, t.tee, t.snp, t.microcode) == (1, 4, 0, 24, 219)
    assert t.raw == bytes([1, 4, 0, 24, 0, 0, 0, 219]) and t.reserved_clear


def test_version_2_tcb_can_be_redecoded_with_the_product_layout() -> None:
    turin_tcb = bytes([1, 4, 0, 24, 0, 0, 0, 219])
    ev = make_evidence(version=2, reported_tcb=turin_tcb)
    r = parse_report(ev.raw)
    assert r.reported_tcb.layout is TcbLayout.UNKNOWN
    assert r.reported_tcb.bootloader == 1  # read with the Milan/Genoa layout
    again = r.decode_tcb(r.reported_tcb, tcb_layout_for_product("Turin-C0"))
    assert (again.fmc, again.bootloader, again.snp, again.microcode) == (1, 4, 24, 219)


def test_decode_tcb_refuses_a_layout_the_cpuid_contradicts() -> None:
    r = parse_report(make_evidence().raw)
    with pytest.raises(EvidenceError, match="contradicts"):
        r.decode_tcb(r.reported_tcb, TcbLayout.TURIN)


def test_tcb_version_build_and_layout_helpers() -> None:
    milan = TcbVersion.build(bootloader=3, tee=0, snp=8, microcode=115)
    assert milan.raw == bytes([3, 0, 0, 0, 0, 0, 8, 115]) and milan.fmc is None
    assert milan.value == int.from_bytes(milan.raw, "little")
    assert not TcbVersion.decode(bytes([3, 0, 1, 0, 0, 0, 8, 115]), milan.layout).reserved_clear
    with pytest.raises(EvidenceError):
        TcbVersion.build(bootloader=1, tee=0, snp=0, microcode=0, fmc=1)
    with pytest.raises(EvidenceError):
        TcbVersion.build(bootloader=256, tee=0, snp=0, microcode=0)
    with pytest.raises(EvidenceError):
        TcbVersion.decode(b"1234567", TcbLayout.TURIN)
    assert tcb_layout_for_family(0x1A) is TcbLayout.TURIN
    assert tcb_layout_for_family(0x19) is TcbLayout.MILAN_GENOA
    assert tcb_layout_for_product("Genoa-B1") is TcbLayout.MILAN_GENOA


def test_the_public_milan_vector() -> None:
    r = parse_report(VECTOR.read_bytes())
    assert r.version == 3 and r.guest_svn == 2 and r.vmpl == 0
    assert r.policy.value == 0x3001F and r.policy.smt_allowed and not r.policy.debug_allowed
    assert (r.policy.abi_major, r.policy.abi_minor) == (0, 31)
    assert r.family_id == b"\x01" + bytes(15) and r.image_id == b"\x02" + bytes(15)
    assert r.platform_info.value == 0x25 and r.platform_info.alias_check_complete
    assert r.signing_key is SigningKey.VCEK and not r.mask_chip_key and not r.author_key_en
    assert r.report_data == bytes(64)
    assert r.measurement.hex().startswith("5feee30d6d7e1a29f403d70a4198237d")
    assert r.host_data.hex().startswith("aadd911a47eaf71b")
    assert r.report_id_ma == b"\xff" * 32
    assert r.chip_id.hex().startswith("0f92f1d29e384e0a")
    for tcb in (r.current_tcb, r.reported_tcb, r.committed_tcb, r.launch_tcb):
        assert (tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode) == (4, 0, 24, 219)
    assert (r.cpuid_family, r.cpuid_model, r.cpuid_stepping) == (0x19, 1, 1)
    assert (r.current_major, r.current_minor, r.current_build) == (1, 55, 29)
    assert (r.committed_major, r.committed_minor, r.committed_build) == (1, 55, 29)


def test_trailing_bytes_are_kept_unparsed() -> None:
    raw = make_evidence().raw
    r = parse_report(raw + b"\x01\x02extra")
    assert r.trailing_bytes == b"\x01\x02extra" and r.raw == raw
    assert parse_report(bytearray(raw)).raw == raw


@pytest.mark.parametrize("size", [0, 1, SIGNED_SIZE, REPORT_SIZE - 1])
def test_truncated_input_is_refused(size: int) -> None:
    with pytest.raises(EvidenceError, match="need 1184"):
        parse_report(make_evidence().raw[:size])


def test_non_bytes_input_is_refused() -> None:
    with pytest.raises(EvidenceError):
        parse_report("not bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize("version", [0, 1, 6, 0xFFFFFFFF])
def test_unsupported_versions_are_refused(version: int) -> None:
    with pytest.raises(EvidenceError, match=f"unsupported version {version}"):
        parse_report(_signed(SnpReportFields(version=version)))


@pytest.mark.parametrize("algo", [0, 2, 0xFFFFFFFF])
def test_signature_algorithms_other_than_ecdsa_p384_are_refused(algo: int) -> None:
    with pytest.raises(EvidenceError, match="signature_algo"):
        parse_report(make_evidence(signature_algo=algo).raw)


@pytest.mark.parametrize("key", [2, 3, 4, 5, 6])
def test_reserved_signing_keys_are_refused(key: int) -> None:
    with pytest.raises(EvidenceError, match=f"signing_key value {key} is reserved"):
        parse_report(make_evidence(signing_key=key).raw)


def test_signing_key_none_parses() -> None:
    assert parse_report(make_evidence(signing_key=7).raw).signing_key is SigningKey.NONE


def test_reserved_key_info_bits_are_refused() -> None:
    with pytest.raises(EvidenceError, match="key_info"):
        parse_report(make_evidence(patches={0x048: b"\x20"}).raw)


@pytest.mark.parametrize(
    ("version", "offset"),
    [
        (3, 0x04C),
        (3, 0x04F),
        (2, 0x188),
        (2, 0x19F),
        (3, 0x18B),
        (4, 0x19F),
        (3, 0x1EB),
        (3, 0x1EF),
        (2, 0x1F8),
        (3, 0x200),
        (4, 0x29F),
        (5, 0x208),
        (5, 0x29F),
    ],
)
def test_reserved_ranges_of_the_signed_part_must_be_zero(version: int, offset: int) -> None:
    ev = make_evidence(version=version, patches={offset: b"\x01"})
    with pytest.raises(EvidenceError, match="reserved"):
        parse_report(ev.raw)


@pytest.mark.parametrize("offset", [0x330, 0x400, REPORT_SIZE - 1])
def test_the_signature_tail_must_be_zero(offset: int) -> None:
    raw = bytearray(make_evidence().raw)
    raw[offset] = 1
    with pytest.raises(EvidenceError, match="signature tail"):
        parse_report(bytes(raw))


@pytest.mark.parametrize(("which", "offset"), [("r", 48), ("r", 71), ("s", 120), ("s", 143)])
def test_high_bytes_of_r_and_s_must_be_zero(which: str, offset: int) -> None:
    raw = bytearray(make_evidence().raw)
    raw[SIGNED_SIZE + offset] = 0x80
    with pytest.raises(EvidenceError, match=f"signature {which} has non-zero bytes"):
        parse_report(bytes(raw))


def test_sign_report_hooks_write_the_high_bytes() -> None:
    ev = make_evidence()
    raw = sign_report(encode_report(ev.fields), ev.endorsement.key, r_high=b"\x01")
    with pytest.raises(EvidenceError, match="signature r"):
        parse_report(raw)
    raw = sign_report(encode_report(ev.fields), ev.endorsement.key, s_high=b"\x00" * 23 + b"\x01")
    with pytest.raises(EvidenceError, match="signature s"):
        parse_report(raw)


def test_policy_reserved_bits() -> None:
    with pytest.raises(EvidenceError, match="bit 17"):
        parse_report(make_evidence(policy=0x1001F).raw)
    for bit in (26, 40, 63):
        with pytest.raises(EvidenceError, match=r"26\.\.63"):
            parse_report(make_evidence(policy=0x3001F | 1 << bit).raw)


def test_report_is_frozen_and_slotted() -> None:
    r = parse_report(make_evidence().raw)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.version = 4  # type: ignore[misc]
    assert not hasattr(r, "__dict__")
    assert dataclasses.fields(SnpReport)


def test_direct_construction_is_validated() -> None:
    r = parse_report(make_evidence().raw)
    with pytest.raises(EvidenceError, match="measurement"):
        dataclasses.replace(r, measurement=b"short")
    with pytest.raises(EvidenceError, match="CPUID"):
        dataclasses.replace(r, cpuid_family=None)
    with pytest.raises(EvidenceError, match="mitigation"):
        dataclasses.replace(r, launch_mit_vector=1)
    with pytest.raises(EvidenceError, match="1184"):
        dataclasses.replace(r, raw=b"")
    with pytest.raises(EvidenceError, match="current_build"):
        dataclasses.replace(r, current_build=256)


def test_every_signed_byte_is_covered_by_a_field_or_a_reserved_check() -> None:
    """Flip each signed byte in turn: either a parsed field changes or parsing refuses."""
    raw = make_evidence(version=5).raw
    base = parse_report(raw)
    for offset in range(SIGNED_SIZE):
        mutated = bytearray(raw)
        mutated[offset] ^= 0x01 if offset != 0x00A else 0x04  # keep policy bit 17 set
        try:
            r = parse_report(bytes(mutated))
        except EvidenceError:
            continue
        assert r != base, f"byte 0x{offset:03X} is not covered"
    assert struct.calcsize("<Q") == 8
