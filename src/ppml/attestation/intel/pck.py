"""The Intel SGX extensions of a PCK certificate (OID 1.2.840.113741.1.13.1): PPID, TCB
(16 SGX TCB component SVNs, PCESVN, CPUSVN), PCE-ID, FMSPC, SGX type and, in certificates
issued by the Platform CA, the platform instance id and configuration.

``cryptography`` hands over the extension's DER value; a small, strict DER reader here decodes
it: single-byte tags, definite minimal lengths bounded by the enclosing value, minimal integers,
every expected field exactly once and no unknown field (fail closed)::

    SGXExtensions ::= SEQUENCE OF SEQUENCE { id OBJECT IDENTIFIER, value ANY }
      .1 PPID OCTET STRING (16)       .2 TCB SEQUENCE OF SEQUENCE { id, value }
      .3 PCE-ID OCTET STRING (2)         .2.1-.2.16 INTEGER (0..255), .2.17 PCESVN INTEGER,
      .4 FMSPC OCTET STRING (6)          .2.18 CPUSVN OCTET STRING (16)
      .5 SGX type ENUMERATED          .6 platform instance id OCTET STRING (16)
      .7 configuration SEQUENCE OF SEQUENCE { id, BOOLEAN }: .7.1 dynamic platform,
         .7.2 cached keys, .7.3 SMT enabled
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Final

from cryptography import x509

from ppml.errors import EvidenceError

__all__ = [
    "SGX_EXTENSIONS_OID",
    "PckExtensions",
    "PlatformConfiguration",
    "parse_pck_extensions",
]

SGX_EXTENSIONS_OID: Final = x509.ObjectIdentifier("1.2.840.113741.1.13.1")
_ARC: Final = "1.2.840.113741.1.13.1"
#: The extension is about 600 bytes in a real PCK certificate.
_MAX_EXTENSION_LEN: Final = 4096
_MAX_OID_LEN: Final = 32

_TAG_BOOLEAN: Final = 0x01
_TAG_INTEGER: Final = 0x02
_TAG_OCTET_STRING: Final = 0x04
_TAG_OID: Final = 0x06
_TAG_ENUMERATED: Final = 0x0A
_TAG_SEQUENCE: Final = 0x30

_WHERE: Final = "PCK certificate SGX extensions"


def _fail(message: str) -> EvidenceError:
    return EvidenceError(f"{_WHERE}: {message}")


class _Der:
    """A strict reader of a sequence of DER TLVs in one byte string."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def at_end(self) -> bool:
        return self._pos == len(self._data)

    def peek(self, what: str) -> int:
        if self._pos >= len(self._data):
            raise _fail(f"{what} is truncated")
        return self._data[self._pos]

    def _byte(self, what: str) -> int:
        if self._pos >= len(self._data):
            raise _fail(f"{what} is truncated")
        b = self._data[self._pos]
        self._pos += 1
        return b

    def read(self, expected_tag: int, what: str) -> bytes:
        tag = self._byte(what)
        if tag != expected_tag:
            raise _fail(f"{what} has tag {tag:#04x}, expected {expected_tag:#04x}")
        first = self._byte(what)
        if first < 0x80:
            length = first
        else:
            n = first & 0x7F
            if n == 0 or n > 2:  # indefinite, or longer than the 4 KiB bound needs
                raise _fail(f"{what} has an unsupported length encoding")
            length = 0
            for _ in range(n):
                length = (length << 8) | self._byte(what)
            if length < 0x80 or (n == 2 and length < 0x100):
                raise _fail(f"{what} length is not minimally encoded")
        if length > len(self._data) - self._pos:
            raise _fail(f"{what} length {length} overruns its container")
        value = self._data[self._pos : self._pos + length]
        self._pos += length
        return value

    def end(self, what: str) -> None:
        if not self.at_end():
            raise _fail(f"unexpected bytes after {what}")


def _oid(value: bytes, what: str) -> str:
    if not value or len(value) > _MAX_OID_LEN or value[-1] & 0x80:
        raise _fail(f"{what} is not a valid object identifier")
    arcs: list[int] = []
    acc = 0
    start = True
    for b in value:
        if start and b == 0x80:
            raise _fail(f"{what} is not minimally encoded")
        acc = (acc << 7) | (b & 0x7F)
        start = not b & 0x80
        if start:
            arcs.append(acc)
            acc = 0
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(a) for a in head + arcs[1:])


def _uint(value: bytes, what: str, maximum: int) -> int:
    if not value:
        raise _fail(f"{what} is an empty integer")
    if len(value) > 1 and (
        (value[0] == 0x00 and not value[1] & 0x80) or (value[0] == 0xFF and value[1] & 0x80)
    ):
        raise _fail(f"{what} is not minimally encoded")
    n = int.from_bytes(value, "big", signed=True)
    if not 0 <= n <= maximum:
        raise _fail(f"{what} is out of range 0..{maximum}")
    return n


def _octets(value: bytes, what: str, length: int) -> bytes:
    if len(value) != length:
        raise _fail(f"{what} must be {length} bytes, not {len(value)}")
    return value


def _boolean(value: bytes, what: str) -> bool:
    if value not in (b"\x00", b"\xff"):
        raise _fail(f"{what} is not a DER boolean")
    return value == b"\xff"


def _entries(der: bytes, arc: str, what: str) -> dict[int, tuple[int, bytes]]:
    """Read SEQUENCE OF SEQUENCE { OID arc.N, value }: {N: (value tag, value)}; every N at most
    once and directly under `arc`."""
    outer = _Der(der)
    seq = _Der(outer.read(_TAG_SEQUENCE, what))
    outer.end(what)
    out: dict[int, tuple[int, bytes]] = {}
    while not seq.at_end():
        item = _Der(seq.read(_TAG_SEQUENCE, f"{what} entry"))
        oid = _oid(item.read(_TAG_OID, f"{what} entry id"), f"{what} entry id")
        prefix, _, last = oid.rpartition(".")
        if prefix != arc or not last.isdigit():
            raise _fail(f"{what} has an unknown entry {oid}")
        number = int(last)
        if number in out:
            raise _fail(f"{what} has entry {oid} twice")
        tag = item.peek(f"{what} entry {oid} value")
        out[number] = (tag, item.read(tag, f"{what} entry {oid} value"))
        item.end(f"{what} entry {oid}")
    return out


def _require(entries: dict[int, tuple[int, bytes]], number: int, tag: int, name: str) -> bytes:
    if number not in entries:
        raise _fail(f"{name} is missing")
    got_tag, value = entries[number]
    if got_tag != tag:
        raise _fail(f"{name} has tag {got_tag:#04x}, expected {tag:#04x}")
    return value


def _reencode(tag: int, value: bytes) -> bytes:
    """The DER TLV of a value already read (to hand a nested SEQUENCE to `_entries`)."""
    n = len(value)
    if n < 0x80:
        head = bytes([n])
    elif n < 0x100:
        head = bytes([0x81, n])
    else:
        head = bytes([0x82, n >> 8, n & 0xFF])
    return bytes([tag]) + head + value


@dataclass(frozen=True, slots=True)
class PlatformConfiguration:
    """The configuration of a multi-package platform (Platform CA certificates only); each flag
    is None when the certificate leaves it out."""

    dynamic_platform: bool | None = None
    cached_keys: bool | None = None
    smt_enabled: bool | None = None


@dataclass(frozen=True, slots=True)
class PckExtensions:
    """The Intel SGX extensions of one PCK certificate. ``sgx_type``: 0 standard, 1 scalable,
    2 scalable with integrity."""

    ppid: bytes
    sgx_tcb_components: tuple[int, ...]
    pce_svn: int
    cpu_svn: bytes
    pce_id: bytes
    fmspc: bytes
    sgx_type: int
    platform_instance_id: bytes | None = None
    configuration: PlatformConfiguration | None = None

    def __post_init__(self) -> None:
        checks = (
            ("ppid", self.ppid, 16),
            ("cpu_svn", self.cpu_svn, 16),
            ("pce_id", self.pce_id, 2),
            ("fmspc", self.fmspc, 6),
        )
        for name, value, length in checks:
            if not isinstance(value, bytes) or len(value) != length:
                raise _fail(f"{name} must be {length} bytes")
        if self.platform_instance_id is not None and (
            not isinstance(self.platform_instance_id, bytes) or len(self.platform_instance_id) != 16
        ):
            raise _fail("platform_instance_id must be 16 bytes")
        comps = self.sgx_tcb_components
        if len(comps) != 16 or not all(isinstance(c, int) and 0 <= c <= 255 for c in comps):
            raise _fail("sgx_tcb_components must be 16 integers in 0..255")
        if not 0 <= self.pce_svn <= 0xFFFF:
            raise _fail("pce_svn must be in 0..65535")
        if not 0 <= self.sgx_type <= 255:
            raise _fail("sgx_type must be in 0..255")

    @classmethod
    def from_der(cls, der: bytes) -> PckExtensions:
        """Decode the DER value of the SGX extensions (the extension's ``extnValue``)."""
        if not isinstance(der, bytes) or len(der) > _MAX_EXTENSION_LEN:
            raise _fail(f"value must be at most {_MAX_EXTENSION_LEN} bytes")
        top = _entries(der, _ARC, "extension")
        known = {1, 2, 3, 4, 5, 6, 7}
        unknown = sorted(set(top) - known)
        if unknown:
            raise _fail(f"unknown entry {_ARC}.{unknown[0]}")
        ppid = _octets(_require(top, 1, _TAG_OCTET_STRING, "PPID"), "PPID", 16)
        tcb_der = _reencode(_TAG_SEQUENCE, _require(top, 2, _TAG_SEQUENCE, "TCB"))
        tcb = _entries(tcb_der, f"{_ARC}.2", "TCB")
        extra = sorted(set(tcb) - set(range(1, 19)))
        if extra:
            raise _fail(f"TCB has an unknown entry {_ARC}.2.{extra[0]}")
        comps = tuple(
            _uint(_require(tcb, i, _TAG_INTEGER, f"TCB component {i}"), f"TCB component {i}", 255)
            for i in range(1, 17)
        )
        pce_svn = _uint(_require(tcb, 17, _TAG_INTEGER, "PCESVN"), "PCESVN", 0xFFFF)
        cpu_svn = _octets(_require(tcb, 18, _TAG_OCTET_STRING, "CPUSVN"), "CPUSVN", 16)
        pce_id = _octets(_require(top, 3, _TAG_OCTET_STRING, "PCE-ID"), "PCE-ID", 2)
        fmspc = _octets(_require(top, 4, _TAG_OCTET_STRING, "FMSPC"), "FMSPC", 6)
        sgx_type = _uint(_require(top, 5, _TAG_ENUMERATED, "SGX type"), "SGX type", 255)
        instance = None
        if 6 in top:
            raw = _require(top, 6, _TAG_OCTET_STRING, "platform instance id")
            instance = _octets(raw, "platform instance id", 16)
        configuration = None
        if 7 in top:
            conf_der = _reencode(_TAG_SEQUENCE, _require(top, 7, _TAG_SEQUENCE, "configuration"))
            conf = _entries(conf_der, f"{_ARC}.7", "configuration")
            extra = sorted(set(conf) - {1, 2, 3})
            if extra:
                raise _fail(f"configuration has an unknown entry {_ARC}.7.{extra[0]}")
            flags = [
                _boolean(_require(conf, i, _TAG_BOOLEAN, name), name) if i in conf else None
                for i, name in ((1, "dynamic platform"), (2, "cached keys"), (3, "SMT enabled"))
            ]
            configuration = PlatformConfiguration(*flags)
        return cls(
            ppid=ppid,
            sgx_tcb_components=comps,
            pce_svn=pce_svn,
            cpu_svn=cpu_svn,
            pce_id=pce_id,
            fmspc=fmspc,
            sgx_type=sgx_type,
            platform_instance_id=instance,
            configuration=configuration,
        )


@lru_cache(maxsize=256)
def parse_pck_extensions(cert: x509.Certificate) -> PckExtensions:
    """The SGX extensions of a PCK certificate; `EvidenceError` if absent or malformed.
    Remembered for the last certificates asked about (a platform's quotes share one)."""
    try:
        ext = cert.extensions.get_extension_for_oid(SGX_EXTENSIONS_OID)
    except x509.ExtensionNotFound as exc:
        raise _fail("the certificate has none") from exc
    except (ValueError, x509.DuplicateExtension) as exc:
        raise _fail("the certificate's extensions cannot be read") from exc
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise _fail("unexpected extension type")
    return PckExtensions.from_der(value.value)
