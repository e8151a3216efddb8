"""The AMD SEV-SNP ATTESTATION_REPORT: a strict parser into a frozen, validated type.

Layout: AMD SEV Secure Nested Paging Firmware ABI Specification, "ATTESTATION_REPORT
Structure" (1184 bytes, little-endian). The firmware signs bytes ``0x000..0x29F`` with the VCEK
or VLEK (ECDSA P-384, SHA-384); `SnpReport.signed_bytes` is exactly that range.

Versions and strictness (decisions):

- Versions 2, 3, 4 and 5 are parsed. Version 3 added ``CPUID_FAM_ID``, ``CPUID_MOD_ID`` and
  ``CPUID_STEP`` at ``0x188``; version 5 added ``LAUNCH_MIT_VECTOR`` (``0x1F8``) and
  ``CURRENT_MIT_VECTOR`` (``0x200``). Version 4 shares the version 3 layout. Any other version
  is refused: a later layout may give meaning to bytes this parser would otherwise call reserved,
  so parsing it "as version 5" could silently drop a field someone relies on. Fail closed.
- Reserved ranges the specification marks must-be-zero are checked, in the signed part and in
  the signature block: ``0x04C..0x050``, the reserved bits of the key-info word, the bytes after
  the CPUID fields (or ``0x188..0x1A0`` in version 2), ``0x1EB``, ``0x1EF``, the tail of the
  signed part after the last field of the version, the high 24 bytes of R and S, and
  ``0x330..0x4A0``. A non-zero reserved byte raises `EvidenceError` naming the range.
- ``POLICY`` bit 17 must be one and bits 26..63 must be zero. ``PLATFORM_INFO``'s undefined
  bits are *not* checked (firmware has been seen to set them); the raw value is kept.
- The reserved bytes inside a TCB_VERSION are not checked here: a version 2 report carries no
  CPUID, so the layout (Milan/Genoa or Turin) is only known once the product is; the verifier
  checks the reported TCB exactly against the VCEK.
- ``SIGNATURE_ALGO`` must be 1 (ECDSA P-384 with SHA-384); ``SIGNING_KEY`` values 2..6 are
  reserved and refused.
- Bytes after the 1184-byte report are kept, unparsed, in `SnpReport.trailing_bytes`.

TCB versions: Milan and Genoa use ``[BOOT_LOADER, TEE, 4 reserved, SNP, MICROCODE]``; Turin
(CPUID family 1Ah) uses ``[FMC, BOOT_LOADER, TEE, SNP, 3 reserved, MICROCODE]``. A report of
version 3 or later says which through its CPUID family; for version 2, `SnpReport.tcb_layout`
is `TcbLayout.UNKNOWN`, its TCB fields are decoded with the Milan/Genoa layout, and
`SnpReport.decode_tcb` re-decodes with the layout of a product named by the certificate chain.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from ppml.errors import EvidenceError

__all__ = [
    "FIRST_SUPPORTED_VERSION",
    "LAST_SUPPORTED_VERSION",
    "REPORT_SIZE",
    "SIGNED_SIZE",
    "GuestPolicy",
    "PlatformInfo",
    "SigningKey",
    "SnpReport",
    "TcbLayout",
    "TcbVersion",
    "parse_report",
    "tcb_layout_for_family",
    "tcb_layout_for_product",
]

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0
FIRST_SUPPORTED_VERSION = 2
LAST_SUPPORTED_VERSION = 5
SIGNATURE_ALGO_ECDSA_P384_SHA384 = 1

_TURIN_FAMILY = 0x1A
_COMPONENT_SIZE = 72  # R and S: zero-extended little-endian fields
_SCALAR_SIZE = 48  # P-384 scalars
_POLICY_RESERVED_ONE = 1 << 17
_POLICY_MBZ_MASK = ~((1 << 26) - 1) & 0xFFFF_FFFF_FFFF_FFFF
_KEY_INFO_MBZ_MASK = ~0x1F & 0xFFFF_FFFF


class TcbLayout(enum.StrEnum):
    """Which TCB_VERSION byte layout a report uses."""

    MILAN_GENOA = "milan_genoa"
    TURIN = "turin"
    UNKNOWN = "unknown"  # version 2: no CPUID in the report


def tcb_layout_for_family(family: int) -> TcbLayout:
    """The TCB layout of a CPUID family (combined extended family and family)."""
    return TcbLayout.TURIN if family == _TURIN_FAMILY else TcbLayout.MILAN_GENOA


def tcb_layout_for_product(product: str) -> TcbLayout:
    """The TCB layout of a product name as the certificate chain gives it (``Turin-C0``...)."""
    return TcbLayout.TURIN if product.split("-", 1)[0] == "Turin" else TcbLayout.MILAN_GENOA


@dataclass(frozen=True, slots=True)
class TcbVersion:
    """One TCB_VERSION: the security patch levels of the platform's firmware components.

    ``fmc`` is the Flexible Memory Controller firmware level, present only in the Turin layout
    (``None`` otherwise). ``raw`` is the 8 bytes as they appear in the report.
    """

    raw: bytes
    layout: TcbLayout
    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None

    def __post_init__(self) -> None:
        if len(self.raw) != 8:
            raise EvidenceError("tcb_version: raw value must be 8 bytes")
        for name in ("bootloader", "tee", "snp", "microcode"):
            value = getattr(self, name)
            if not 0 <= value <= 0xFF:
                raise EvidenceError(f"tcb_version: {name} out of range")
        if (self.fmc is None) != (self.layout is not TcbLayout.TURIN):
            raise EvidenceError("tcb_version: fmc is present exactly in the Turin layout")
        if self.fmc is not None and not 0 <= self.fmc <= 0xFF:
            raise EvidenceError("tcb_version: fmc out of range")

    @classmethod
    def decode(cls, raw: bytes, layout: TcbLayout) -> TcbVersion:
        """Decode 8 raw bytes. `TcbLayout.UNKNOWN` decodes as Milan/Genoa and says so."""
        if len(raw) != 8:
            raise EvidenceError("tcb_version: raw value must be 8 bytes")
        if layout is TcbLayout.TURIN:
            return cls(bytes(raw), layout, raw[1], raw[2], raw[3], raw[7], raw[0])
        return cls(bytes(raw), layout, raw[0], raw[1], raw[6], raw[7])

    @classmethod
    def build(
        cls,
        *,
        bootloader: int,
        tee: int,
        snp: int,
        microcode: int,
        fmc: int | None = None,
        layout: TcbLayout = TcbLayout.MILAN_GENOA,
    ) -> TcbVersion:
        """Encode component levels into a TCB_VERSION of the given layout (reserved bytes zero)."""
        values = (bootloader, tee, snp, microcode, fmc or 0)
        if any(not 0 <= v <= 0xFF for v in values):
            raise EvidenceError("tcb_version: component out of range")
        if layout is TcbLayout.TURIN:
            raw = bytes([fmc or 0, bootloader, tee, snp, 0, 0, 0, microcode])
        else:
            if fmc is not None:
                raise EvidenceError("tcb_version: fmc exists only in the Turin layout")
            raw = bytes([bootloader, tee, 0, 0, 0, 0, snp, microcode])
        return cls.decode(raw, layout)

    @property
    def reserved_clear(self) -> bool:
        """The layout's reserved bytes are all zero."""
        reserved = self.raw[4:7] if self.layout is TcbLayout.TURIN else self.raw[2:6]
        return not any(reserved)

    @property
    def value(self) -> int:
        """The raw TCB_VERSION as the little-endian 64-bit integer the firmware uses."""
        return int.from_bytes(self.raw, "little")


@dataclass(frozen=True, slots=True)
class GuestPolicy:
    """The guest policy the owner set at launch (``POLICY``, offset 0x008)."""

    value: int

    def __post_init__(self) -> None:
        if not 0 <= self.value < 1 << 64:
            raise EvidenceError("report: policy out of range")
        if not self.value & _POLICY_RESERVED_ONE:
            raise EvidenceError("report: policy bit 17 is reserved and must be one")
        if self.value & _POLICY_MBZ_MASK:
            raise EvidenceError("report: policy bits 26..63 are reserved and must be zero")

    def _bit(self, n: int) -> bool:
        return bool(self.value >> n & 1)

    @property
    def abi_minor(self) -> int:
        return self.value & 0xFF

    @property
    def abi_major(self) -> int:
        return self.value >> 8 & 0xFF

    @property
    def smt_allowed(self) -> bool:
        return self._bit(16)

    @property
    def migrate_ma_allowed(self) -> bool:
        return self._bit(18)

    @property
    def debug_allowed(self) -> bool:
        return self._bit(19)

    @property
    def single_socket(self) -> bool:
        return self._bit(20)

    @property
    def cxl_allowed(self) -> bool:
        return self._bit(21)

    @property
    def mem_aes_256_xts_required(self) -> bool:
        return self._bit(22)

    @property
    def rapl_disabled(self) -> bool:
        return self._bit(23)

    @property
    def ciphertext_hiding_required(self) -> bool:
        return self._bit(24)

    @property
    def page_swap_disabled(self) -> bool:
        return self._bit(25)


@dataclass(frozen=True, slots=True)
class PlatformInfo:
    """The platform's configuration (``PLATFORM_INFO``, offset 0x040). Undefined bits are
    kept in `value` and not interpreted."""

    value: int

    def __post_init__(self) -> None:
        if not 0 <= self.value < 1 << 64:
            raise EvidenceError("report: platform_info out of range")

    def _bit(self, n: int) -> bool:
        return bool(self.value >> n & 1)

    @property
    def smt_enabled(self) -> bool:
        return self._bit(0)

    @property
    def tsme_enabled(self) -> bool:
        return self._bit(1)

    @property
    def ecc_enabled(self) -> bool:
        return self._bit(2)

    @property
    def rapl_disabled(self) -> bool:
        return self._bit(3)

    @property
    def ciphertext_hiding_enabled(self) -> bool:
        return self._bit(4)

    @property
    def alias_check_complete(self) -> bool:
        return self._bit(5)

    @property
    def tio_enabled(self) -> bool:
        return self._bit(7)


class SigningKey(enum.IntEnum):
    """Which key signed the report (``SIGNING_KEY``, bits 4:2 at offset 0x048)."""

    VCEK = 0
    VLEK = 1
    NONE = 7


_BYTE_FIELDS = {
    "family_id": 16,
    "image_id": 16,
    "report_data": 64,
    "measurement": 48,
    "host_data": 32,
    "id_key_digest": 48,
    "author_key_digest": 48,
    "report_id": 32,
    "report_id_ma": 32,
    "chip_id": 64,
}
_U8_FIELDS = (
    "current_build",
    "current_minor",
    "current_major",
    "committed_build",
    "committed_minor",
    "committed_major",
)


@dataclass(frozen=True, slots=True)
class SnpReport:
    """A parsed SEV-SNP attestation report. Build it with `parse_report`."""

    version: int
    guest_svn: int
    policy: GuestPolicy
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: TcbVersion
    platform_info: PlatformInfo
    author_key_en: bool
    mask_chip_key: bool
    signing_key: SigningKey
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: TcbVersion
    cpuid_family: int | None
    cpuid_model: int | None
    cpuid_stepping: int | None
    chip_id: bytes
    committed_tcb: TcbVersion
    current_build: int
    current_minor: int
    current_major: int
    committed_build: int
    committed_minor: int
    committed_major: int
    launch_tcb: TcbVersion
    launch_mit_vector: int | None
    current_mit_vector: int | None
    signature_r: int
    signature_s: int
    raw: bytes = field(repr=False)
    trailing_bytes: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        if not FIRST_SUPPORTED_VERSION <= self.version <= LAST_SUPPORTED_VERSION:
            raise EvidenceError(f"report: unsupported version {self.version}")
        if len(self.raw) != REPORT_SIZE:
            raise EvidenceError("report: raw report must be exactly 1184 bytes")
        for name, size in _BYTE_FIELDS.items():
            if len(getattr(self, name)) != size:
                raise EvidenceError(f"report: {name} must be {size} bytes")
        for name in _U8_FIELDS:
            if not 0 <= getattr(self, name) <= 0xFF:
                raise EvidenceError(f"report: {name} out of range")
        if self.signature_algo != SIGNATURE_ALGO_ECDSA_P384_SHA384:
            raise EvidenceError(
                f"report: signature_algo {self.signature_algo} is not 1 (ECDSA P-384 SHA-384)"
            )
        has_cpuid = self.version >= 3
        if has_cpuid != (self.cpuid_family is not None):
            raise EvidenceError("report: CPUID fields are present exactly from version 3")
        has_mit = self.version >= 5
        if has_mit != (self.launch_mit_vector is not None):
            raise EvidenceError("report: mitigation vectors are present exactly from version 5")
        for r_or_s in (self.signature_r, self.signature_s):
            if not 0 <= r_or_s < 1 << (8 * _SCALAR_SIZE):
                raise EvidenceError("report: signature component out of range")

    @property
    def signed_bytes(self) -> bytes:
        """The bytes the firmware signed: ``0x000..0x29F`` of the report."""
        return self.raw[:SIGNED_SIZE]

    @property
    def tcb_layout(self) -> TcbLayout:
        """The TCB layout the report itself declares (through its CPUID family)."""
        if self.cpuid_family is None:
            return TcbLayout.UNKNOWN
        return tcb_layout_for_family(self.cpuid_family)

    def decode_tcb(self, tcb: TcbVersion, layout: TcbLayout) -> TcbVersion:
        """Re-decode one of this report's TCB fields with a layout known from elsewhere (the
        product named by the certificate chain). Refuses a layout that contradicts the report's
        own CPUID family."""
        own = self.tcb_layout
        if own is not TcbLayout.UNKNOWN and layout is not own:
            raise EvidenceError(f"report: tcb layout {layout} contradicts the CPUID family")
        return TcbVersion.decode(tcb.raw, layout)

    @property
    def chip_id_masked(self) -> bool:
        return not any(self.chip_id)


def _mbz(data: bytes, lo: int, hi: int, name: str) -> None:
    if any(data[lo:hi]):
        raise EvidenceError(f"report: reserved {name} [0x{lo:03X}..0x{hi:03X}) is not zero")


def _component(data: bytes, offset: int, name: str) -> int:
    field_bytes = data[offset : offset + _COMPONENT_SIZE]
    if any(field_bytes[_SCALAR_SIZE:]):
        raise EvidenceError(f"report: signature {name} has non-zero bytes above 48")
    return int.from_bytes(field_bytes[:_SCALAR_SIZE], "little")


def _signing_key(raw: bytes, key_info: int) -> SigningKey:
    if key_info & _KEY_INFO_MBZ_MASK:
        raise EvidenceError("report: reserved key_info bits 31:5 are not zero")
    key_sel = key_info >> 2 & 0x7
    try:
        signing_key = SigningKey(key_sel)
    except ValueError:
        raise EvidenceError(f"report: signing_key value {key_sel} is reserved") from None
    _mbz(raw, 0x04C, 0x050, "after key_info")
    return signing_key


def _cpuid(raw: bytes, version: int) -> tuple[int | None, int | None, int | None, TcbLayout]:
    """(family, model, stepping, the TCB layout they imply): version 3 and later."""
    if version >= 3:
        _mbz(raw, 0x18B, 0x1A0, "after CPUID")
        return raw[0x188], raw[0x189], raw[0x18A], tcb_layout_for_family(raw[0x188])
    _mbz(raw, 0x188, 0x1A0, "after reported_tcb")
    return None, None, None, TcbLayout.UNKNOWN


def _mit_vectors(raw: bytes, version: int) -> tuple[int | None, int | None]:
    """(launch, current) mitigation vectors: version 5 and later."""
    _mbz(raw, 0x1EB, 0x1EC, "after current_major")
    _mbz(raw, 0x1EF, 0x1F0, "after committed_major")
    if version >= 5:
        launch_mit, current_mit = struct.unpack_from("<QQ", raw, 0x1F8)
        _mbz(raw, 0x208, SIGNED_SIZE, "after current_mit_vector")
        return launch_mit, current_mit
    _mbz(raw, 0x1F8, SIGNED_SIZE, "after launch_tcb")
    return None, None


def parse_report(data: bytes) -> SnpReport:
    """Parse a SEV-SNP attestation report. Input beyond 1184 bytes is kept unparsed in
    ``trailing_bytes``. Raises only `EvidenceError`."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EvidenceError("report: input must be bytes")
    data = bytes(data)
    if len(data) < REPORT_SIZE:
        raise EvidenceError(f"report: {len(data)} bytes, need {REPORT_SIZE}")
    raw, trailing = data[:REPORT_SIZE], data[REPORT_SIZE:]

    version, guest_svn, policy = struct.unpack_from("<IIQ", raw, 0x000)
    if not FIRST_SUPPORTED_VERSION <= version <= LAST_SUPPORTED_VERSION:
        raise EvidenceError(f"report: unsupported version {version}")
    vmpl, signature_algo = struct.unpack_from("<II", raw, 0x030)
    platform_info, key_info = struct.unpack_from("<QI", raw, 0x040)
    signing_key = _signing_key(raw, key_info)
    cpuid_family, cpuid_model, cpuid_stepping, layout = _cpuid(raw, version)
    launch_mit, current_mit = _mit_vectors(raw, version)
    signature_r = _component(raw, SIGNED_SIZE, "r")
    signature_s = _component(raw, SIGNED_SIZE + _COMPONENT_SIZE, "s")
    _mbz(raw, SIGNED_SIZE + 2 * _COMPONENT_SIZE, REPORT_SIZE, "signature tail")

    def tcb(offset: int) -> TcbVersion:
        return TcbVersion.decode(raw[offset : offset + 8], layout)

    return SnpReport(
        version=version,
        guest_svn=guest_svn,
        policy=GuestPolicy(policy),
        family_id=raw[0x010:0x020],
        image_id=raw[0x020:0x030],
        vmpl=vmpl,
        signature_algo=signature_algo,
        current_tcb=tcb(0x038),
        platform_info=PlatformInfo(platform_info),
        author_key_en=bool(key_info & 1),
        mask_chip_key=bool(key_info & 2),
        signing_key=signing_key,
        report_data=raw[0x050:0x090],
        measurement=raw[0x090:0x0C0],
        host_data=raw[0x0C0:0x0E0],
        id_key_digest=raw[0x0E0:0x110],
        author_key_digest=raw[0x110:0x140],
        report_id=raw[0x140:0x160],
        report_id_ma=raw[0x160:0x180],
        reported_tcb=tcb(0x180),
        cpuid_family=cpuid_family,
        cpuid_model=cpuid_model,
        cpuid_stepping=cpuid_stepping,
        chip_id=raw[0x1A0:0x1E0],
        committed_tcb=tcb(0x1E0),
        current_build=raw[0x1E8],
        current_minor=raw[0x1E9],
        current_major=raw[0x1EA],
        committed_build=raw[0x1EC],
        committed_minor=raw[0x1ED],
        committed_major=raw[0x1EE],
        launch_tcb=tcb(0x1F0),
        launch_mit_vector=launch_mit,
        current_mit_vector=current_mit,
        signature_r=signature_r,
        signature_s=signature_s,
        raw=raw,
        trailing_bytes=trailing,
    )
