"""Intel SGX and TDX ECDSA quotes (SGX v3, TDX v4 and v5): strict parsers into frozen types.

Every structure is read by its own length fields, each bounded against the bytes that remain,
and must fill its declared length exactly. Only attestation key type 2 (ECDSA-256 with P-256)
and a PCK certificate chain (certification data type 5, nested in type 6 for v4 and v5) are
accepted. Bytes after the signed structure are kept, unparsed, in ``trailing_bytes``.
Layouts (little-endian integers)::

    quote    = header(48) || body || u32 signature_data_len || signature_data || trailing
    body     = v3: SGX report body(384); v4: TD report 1.0(584);
               v5: u16 body_type || u32 body_size || TD report (type 2: 584, type 3: 648)
    v3 signature_data = signature(64) || attestation_key(64) || qe_report(384)
                        || qe_report_signature(64) || u16 auth_len || qe_auth_data
                        || u16 cert_type(5) || u32 cert_len || PEM chain
    v4/v5 signature_data = signature(64) || attestation_key(64)
                        || u16 cert_type(6) || u32 cert_len || qe_report_certification_data
    qe_report_certification_data = qe_report(384) || qe_report_signature(64) || u16 auth_len
                        || qe_auth_data || u16 cert_type(5) || u32 cert_len || PEM chain

The quote signature covers header || body (for v5 including the body type and size).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final, TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.utils import CryptographyDeprecationWarning

from ppml.errors import EvidenceError

__all__ = [
    "ATT_KEY_TYPE_ECDSA_P256",
    "BODY_TYPE_TD10",
    "BODY_TYPE_TD15",
    "CERT_DATA_PCK_CHAIN",
    "CERT_DATA_QE_REPORT",
    "HEADER_LEN",
    "MAX_QUOTE_LEN",
    "SGX_REPORT_LEN",
    "TD10_REPORT_LEN",
    "TD15_REPORT_LEN",
    "TEE_TYPE_SGX",
    "TEE_TYPE_TDX",
    "QuoteHeader",
    "SgxQuote",
    "SgxReportBody",
    "TdReportBody",
    "TdxQuote",
    "evidence_bytes",
    "parse_pck_chain_pem",
    "parse_quote",
    "parse_sgx_quote",
    "parse_tdx_quote",
]

HEADER_LEN: Final = 48
SGX_REPORT_LEN: Final = 384
TD10_REPORT_LEN: Final = 584
TD15_REPORT_LEN: Final = 648
ECDSA_SIGNATURE_LEN: Final = 64
ECDSA_PUBLIC_KEY_LEN: Final = 64
ATT_KEY_TYPE_ECDSA_P256: Final = 2
TEE_TYPE_SGX: Final = 0x00
TEE_TYPE_TDX: Final = 0x81
CERT_DATA_PCK_CHAIN: Final = 5
CERT_DATA_QE_REPORT: Final = 6
BODY_TYPE_TD10: Final = 2
BODY_TYPE_TD15: Final = 3
#: Real quotes are about 5 KiB; anything far larger is refused before parsing.
MAX_QUOTE_LEN: Final = 64 * 1024
#: A PCK chain is leaf, CA and root; a few more are tolerated here and refused by the verifier.
MAX_CHAIN_CERTS: Final = 8

_PEM_BEGIN: Final = b"-----BEGIN CERTIFICATE-----"
_PEM_END: Final = b"-----END CERTIFICATE-----"
_PEM_SPACE: Final = b" \t\r\n"


def _fail(where: str, message: str) -> EvidenceError:
    return EvidenceError(f"{where}: {message}")


def _check_len(where: str, name: str, value: bytes, length: int) -> None:
    if not isinstance(value, bytes) or len(value) != length:
        raise _fail(where, f"{name} must be {length} bytes")


def _check_uint(where: str, name: str, value: int, bits: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < (1 << bits):
        raise _fail(where, f"{name} must be an unsigned {bits}-bit integer")


class _Reader:
    """Reads a byte string front to back; every read is bounded by what remains."""

    __slots__ = ("_data", "_pos", "_where")

    def __init__(self, data: bytes, where: str) -> None:
        self._data = data
        self._pos = 0
        self._where = where

    @property
    def pos(self) -> int:
        return self._pos

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, n: int, name: str) -> bytes:
        if n > self.remaining:
            raise _fail(
                self._where, f"{name} needs {n} bytes but only {self.remaining} remain (truncated)"
            )
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def u16(self, name: str) -> int:
        return int(struct.unpack("<H", self.take(2, name))[0])

    def u32(self, name: str) -> int:
        return int(struct.unpack("<I", self.take(4, name))[0])

    def rest(self) -> bytes:
        return self.take(self.remaining, "rest")

    def expect_end(self, what: str) -> None:
        if self.remaining:
            raise _fail(self._where, f"{self.remaining} bytes after the end of {what}")


@dataclass(frozen=True, slots=True)
class QuoteHeader:
    """The 48-byte quote header. ``qe_svn`` and ``pce_svn`` are meaningful in v3 only; v4 and
    v5 keep the same two 16-bit fields as reserved."""

    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes

    def __post_init__(self) -> None:
        for name, bits in (
            ("version", 16),
            ("att_key_type", 16),
            ("tee_type", 32),
            ("qe_svn", 16),
            ("pce_svn", 16),
        ):
            _check_uint("quote header", name, getattr(self, name), bits)
        _check_len("quote header", "qe_vendor_id", self.qe_vendor_id, 16)
        _check_len("quote header", "user_data", self.user_data, 20)

    @classmethod
    def from_bytes(cls, data: bytes) -> QuoteHeader:
        _check_len("quote header", "header", data, HEADER_LEN)
        version, att_key_type, tee_type, qe_svn, pce_svn = struct.unpack_from("<HHIHH", data)
        return cls(version, att_key_type, tee_type, qe_svn, pce_svn, data[12:28], data[28:48])

    def to_bytes(self) -> bytes:
        return (
            struct.pack(
                "<HHIHH", self.version, self.att_key_type, self.tee_type, self.qe_svn, self.pce_svn
            )
            + self.qe_vendor_id
            + self.user_data
        )


# (name, offset, length) of the SGX report body; the gaps are reserved.
_SGX_LAYOUT: Final = (
    ("cpu_svn", 0, 16),
    ("isv_ext_prod_id", 32, 16),
    ("attributes", 48, 16),
    ("mr_enclave", 64, 32),
    ("mr_signer", 128, 32),
    ("config_id", 192, 64),
    ("isv_family_id", 304, 16),
    ("report_data", 320, 64),
)


@dataclass(frozen=True, slots=True)
class SgxReportBody:
    """An SGX enclave report body (384 bytes): the ISV enclave's report in a v3 quote, and the
    QE report in every quote. `to_bytes` writes the reserved areas as zeros."""

    cpu_svn: bytes
    misc_select: int
    isv_ext_prod_id: bytes
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    config_id: bytes
    isv_prod_id: int
    isv_svn: int
    config_svn: int
    isv_family_id: bytes
    report_data: bytes

    def __post_init__(self) -> None:
        for name, _, length in _SGX_LAYOUT:
            _check_len("SGX report body", name, getattr(self, name), length)
        _check_uint("SGX report body", "misc_select", self.misc_select, 32)
        for name in ("isv_prod_id", "isv_svn", "config_svn"):
            _check_uint("SGX report body", name, getattr(self, name), 16)

    @property
    def attribute_flags(self) -> int:
        """ATTRIBUTES.FLAGS, the first 64 bits of ``attributes``."""
        return int.from_bytes(self.attributes[:8], "little")

    @property
    def xfrm(self) -> int:
        """ATTRIBUTES.XFRM, the last 64 bits of ``attributes``."""
        return int.from_bytes(self.attributes[8:], "little")

    @property
    def debug(self) -> bool:
        """ATTRIBUTES.FLAGS bit 1 (DEBUG): the enclave's memory can be read by a debugger."""
        return bool(self.attribute_flags & 0x02)

    @classmethod
    def from_bytes(cls, data: bytes) -> SgxReportBody:
        _check_len("SGX report body", "report body", data, SGX_REPORT_LEN)
        fields = {name: data[off : off + n] for name, off, n in _SGX_LAYOUT}
        (misc_select,) = struct.unpack_from("<I", data, 16)
        isv_prod_id, isv_svn, config_svn = struct.unpack_from("<HHH", data, 256)
        return cls(
            misc_select=misc_select,
            isv_prod_id=isv_prod_id,
            isv_svn=isv_svn,
            config_svn=config_svn,
            **fields,
        )

    def to_bytes(self) -> bytes:
        out = bytearray(SGX_REPORT_LEN)
        for name, off, n in _SGX_LAYOUT:
            out[off : off + n] = getattr(self, name)
        struct.pack_into("<I", out, 16, self.misc_select)
        struct.pack_into("<HHH", out, 256, self.isv_prod_id, self.isv_svn, self.config_svn)
        return bytes(out)


_TD_LAYOUT: Final = (
    ("tee_tcb_svn", 16),
    ("mr_seam", 48),
    ("mr_signer_seam", 48),
    ("seam_attributes", 8),
    ("td_attributes", 8),
    ("xfam", 8),
    ("mr_td", 48),
    ("mr_config_id", 48),
    ("mr_owner", 48),
    ("mr_owner_config", 48),
    ("rtmr0", 48),
    ("rtmr1", 48),
    ("rtmr2", 48),
    ("rtmr3", 48),
    ("report_data", 64),
)
_TD15_EXTRA: Final = (("tee_tcb_svn2", 16), ("mr_service_td", 48))


@dataclass(frozen=True, slots=True)
class TdReportBody:
    """A TD report body: TDX 1.0 (584 bytes), or TDX 1.5 (648 bytes) when ``tee_tcb_svn2`` and
    ``mr_service_td`` are set (both or neither)."""

    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    report_data: bytes
    tee_tcb_svn2: bytes | None = None
    mr_service_td: bytes | None = None

    def __post_init__(self) -> None:
        for name, length in _TD_LAYOUT:
            _check_len("TD report body", name, getattr(self, name), length)
        if (self.tee_tcb_svn2 is None) != (self.mr_service_td is None):
            raise _fail("TD report body", "tee_tcb_svn2 and mr_service_td go together (TDX 1.5)")
        if self.tee_tcb_svn2 is not None:
            for name, length in _TD15_EXTRA:
                _check_len("TD report body", name, getattr(self, name), length)

    @property
    def is_td15(self) -> bool:
        return self.tee_tcb_svn2 is not None

    @property
    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        return (self.rtmr0, self.rtmr1, self.rtmr2, self.rtmr3)

    @property
    def debug(self) -> bool:
        """TD_ATTRIBUTES bit 0 (TUD.DEBUG): the TD runs in debug mode."""
        return bool(self.td_attributes[0] & 0x01)

    @classmethod
    def from_bytes(cls, data: bytes) -> TdReportBody:
        if not isinstance(data, bytes) or len(data) not in (TD10_REPORT_LEN, TD15_REPORT_LEN):
            raise _fail("TD report body", f"must be {TD10_REPORT_LEN} or {TD15_REPORT_LEN} bytes")
        r = _Reader(data, "TD report body")
        fields: dict[str, bytes] = {name: r.take(n, name) for name, n in _TD_LAYOUT}
        if r.remaining:
            fields.update({name: r.take(n, name) for name, n in _TD15_EXTRA})
        return cls(**fields)

    def to_bytes(self) -> bytes:
        layout = _TD_LAYOUT + (_TD15_EXTRA if self.is_td15 else ())
        return b"".join(getattr(self, name) for name, _ in layout)


@dataclass(frozen=True, slots=True)
class _EcdsaQuote:
    """What every ECDSA quote carries besides its body (see `SgxQuote`, `TdxQuote`)."""

    header: QuoteHeader
    signed_bytes: bytes
    signature: bytes
    attestation_key: bytes
    qe_report: SgxReportBody
    qe_report_bytes: bytes
    qe_report_signature: bytes
    qe_auth_data: bytes
    cert_data_type: int
    pck_chain_pem: bytes
    pck_chain: tuple[x509.Certificate, ...]
    trailing_bytes: bytes

    def __post_init__(self) -> None:
        where = "quote"
        _check_len(where, "signature", self.signature, ECDSA_SIGNATURE_LEN)
        _check_len(where, "attestation_key", self.attestation_key, ECDSA_PUBLIC_KEY_LEN)
        _check_len(where, "qe_report_bytes", self.qe_report_bytes, SGX_REPORT_LEN)
        _check_len(where, "qe_report_signature", self.qe_report_signature, ECDSA_SIGNATURE_LEN)
        for name in ("signed_bytes", "qe_auth_data", "pck_chain_pem", "trailing_bytes"):
            if not isinstance(getattr(self, name), bytes):
                raise _fail(where, f"{name} must be bytes")
        if not isinstance(self.header, QuoteHeader) or not isinstance(
            self.qe_report, SgxReportBody
        ):
            raise _fail(where, "header or qe_report has the wrong type")
        if self.header.att_key_type != ATT_KEY_TYPE_ECDSA_P256:
            raise _fail(where, f"attestation key type {self.header.att_key_type} not supported")
        if not self.signed_bytes.startswith(self.header.to_bytes()):
            raise _fail(where, "signed_bytes do not start with the header")
        if self.qe_report.to_bytes() != _zero_reserved_sgx(self.qe_report_bytes):
            raise _fail(where, "qe_report does not match qe_report_bytes")
        if not self.pck_chain or not all(isinstance(c, x509.Certificate) for c in self.pck_chain):
            raise _fail(where, "pck_chain must hold at least one certificate")

    @property
    def version(self) -> int:
        return self.header.version

    @property
    def debug(self) -> bool:
        return self._report_body().debug

    @property
    def report_data(self) -> bytes:
        return self._report_body().report_data

    def _report_body(self) -> SgxReportBody | TdReportBody:
        raise NotImplementedError


def _zero_reserved_sgx(data: bytes) -> bytes:
    return SgxReportBody.from_bytes(data).to_bytes()


@dataclass(frozen=True, slots=True)
class SgxQuote(_EcdsaQuote):
    """An SGX ECDSA quote, version 3. ``signed_bytes`` is header || body, exactly as received."""

    body: SgxReportBody = field(kw_only=True)

    def __post_init__(self) -> None:
        _EcdsaQuote.__post_init__(self)
        if not isinstance(self.body, SgxReportBody):
            raise _fail("SGX quote", "body must be an SGX report body")
        if len(self.signed_bytes) != HEADER_LEN + SGX_REPORT_LEN:
            raise _fail("SGX quote", "signed_bytes must be header || body")

    def _report_body(self) -> SgxReportBody | TdReportBody:
        return self.body


@dataclass(frozen=True, slots=True)
class TdxQuote(_EcdsaQuote):
    """A TDX ECDSA quote, version 4 or 5. ``body_type`` is 2 (TDX 1.0 body) or 3 (TDX 1.5
    body); a v4 quote always has type 2. ``signed_bytes`` is header || body, and for v5 the
    body's type and size fields sit between them and are signed too."""

    body: TdReportBody = field(kw_only=True)
    body_type: int = field(kw_only=True)

    def __post_init__(self) -> None:
        _EcdsaQuote.__post_init__(self)
        if not isinstance(self.body, TdReportBody):
            raise _fail("TDX quote", "body must be a TD report body")
        if self.body_type not in (BODY_TYPE_TD10, BODY_TYPE_TD15) or (
            self.body.is_td15 != (self.body_type == BODY_TYPE_TD15)
        ):
            raise _fail("TDX quote", "body_type does not match the body")
        descriptor = 6 if self.header.version >= 5 else 0
        body_len = TD15_REPORT_LEN if self.body.is_td15 else TD10_REPORT_LEN
        if len(self.signed_bytes) != HEADER_LEN + descriptor + body_len:
            raise _fail("TDX quote", "signed_bytes must be header || body")

    def _report_body(self) -> SgxReportBody | TdReportBody:
        return self.body


def parse_pck_chain_pem(data: bytes) -> tuple[x509.Certificate, ...]:
    """Parse certification data type 5: PEM certificates (leaf first), separated only by white
    space; NUL bytes are allowed at the very end (quotes carry a C string terminator)."""
    where = "PCK certificate chain"
    text = data.rstrip(b"\x00")
    certs: list[x509.Certificate] = []
    pos = 0
    while True:
        while pos < len(text) and text[pos] in _PEM_SPACE:
            pos += 1
        if pos == len(text):
            break
        if not text.startswith(_PEM_BEGIN, pos):
            raise _fail(where, f"unexpected bytes at offset {pos} (expected a PEM certificate)")
        end = text.find(_PEM_END, pos)
        if end < 0:
            raise _fail(where, f"certificate {len(certs) + 1} has no END line")
        if len(certs) == MAX_CHAIN_CERTS:
            raise _fail(where, f"more than {MAX_CHAIN_CERTS} certificates")
        end += len(_PEM_END)
        try:
            # With warnings turned into errors, cryptography's deprecation warnings for
            # certificates that break RFC 5280 arrive here as exceptions: refuse those too.
            cert = x509.load_pem_x509_certificate(text[pos:end])
        except (
            ValueError,
            x509.InvalidVersion,
            UnsupportedAlgorithm,
            CryptographyDeprecationWarning,
        ) as exc:
            raise _fail(where, f"certificate {len(certs) + 1} is not valid PEM/DER") from exc
        if cert.serial_number <= 0:
            raise _fail(
                where, f"certificate {len(certs) + 1} has a serial number that is not positive"
            )
        certs.append(cert)
        pos = end
    if not certs:
        raise _fail(where, "no certificate")
    return tuple(certs)


@dataclass(frozen=True, slots=True)
class _AuthParts:
    signature: bytes
    attestation_key: bytes
    qe_report_bytes: bytes
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain_pem: bytes


def _read_cert_data(r: _Reader, where: str, expected_type: int) -> bytes:
    cert_type = r.u16("certification data type")
    size = r.u32("certification data size")
    if cert_type != expected_type:
        raise _fail(
            where,
            f"certification data type {cert_type} not supported (expected {expected_type})",
        )
    return r.take(size, "certification data")


def _read_qe_report_part(r: _Reader) -> tuple[bytes, bytes, bytes, bytes]:
    """QE report, its signature, QE auth data and the type-5 PCK chain, in that order."""
    qe_report = r.take(SGX_REPORT_LEN, "QE report")
    qe_report_signature = r.take(ECDSA_SIGNATURE_LEN, "QE report signature")
    auth_len = r.u16("QE auth data size")
    qe_auth_data = r.take(auth_len, "QE auth data")
    pem = _read_cert_data(r, "PCK certification data", CERT_DATA_PCK_CHAIN)
    return qe_report, qe_report_signature, qe_auth_data, pem


def _read_signature_data(r: _Reader, version: int) -> _AuthParts:
    """The signature data of a quote: fills its declared length exactly."""
    size = r.u32("signature data size")
    sig_r = _Reader(r.take(size, "signature data"), "quote signature data")
    signature = sig_r.take(ECDSA_SIGNATURE_LEN, "quote signature")
    attestation_key = sig_r.take(ECDSA_PUBLIC_KEY_LEN, "attestation key")
    if version == 3:
        qe_report, qe_sig, qe_auth, pem = _read_qe_report_part(sig_r)
    else:
        nested = _read_cert_data(sig_r, "quote signature data", CERT_DATA_QE_REPORT)
        nested_r = _Reader(nested, "QE report certification data")
        qe_report, qe_sig, qe_auth, pem = _read_qe_report_part(nested_r)
        nested_r.expect_end("the QE report certification data")
    sig_r.expect_end("the signature data")
    return _AuthParts(signature, attestation_key, qe_report, qe_sig, qe_auth, pem)


def _read_header(r: _Reader) -> QuoteHeader:
    header = QuoteHeader.from_bytes(r.take(HEADER_LEN, "header"))
    if header.att_key_type != ATT_KEY_TYPE_ECDSA_P256:
        raise _fail(
            "quote header",
            f"attestation key type {header.att_key_type} not supported (only 2, ECDSA P-256)",
        )
    return header


def evidence_bytes(data: object, what: str, limit: int) -> bytes:
    """`data` (bytes, a bytearray or a memoryview) as bytes of at most `limit`; `EvidenceError`
    naming `what` otherwise."""
    if isinstance(data, bytearray | memoryview):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise EvidenceError(f"{what}: must be bytes")
    if len(data) > limit:
        raise EvidenceError(f"{what}: {len(data)} bytes is larger than {limit}")
    return data


def _as_bytes(data: object) -> bytes:
    return evidence_bytes(data, "quote", MAX_QUOTE_LEN)


def parse_sgx_quote(data: bytes) -> SgxQuote:
    """Parse an SGX ECDSA quote, version 3 (TEE type 0)."""
    data = _as_bytes(data)
    r = _Reader(data, "SGX quote")
    header = _read_header(r)
    if header.version != 3 or header.tee_type != TEE_TYPE_SGX:
        raise _fail(
            "quote header",
            f"version {header.version} with TEE type {header.tee_type:#x} is not an SGX v3 quote",
        )
    body_bytes = r.take(SGX_REPORT_LEN, "SGX report body")
    signed_len = r.pos
    auth = _read_signature_data(r, 3)
    body = SgxReportBody.from_bytes(body_bytes)
    return _assemble(SgxQuote, header, data, signed_len, auth, r.rest(), body=body)


def parse_tdx_quote(data: bytes) -> TdxQuote:
    """Parse a TDX ECDSA quote, version 4 or 5 (TEE type 0x81)."""
    data = _as_bytes(data)
    r = _Reader(data, "TDX quote")
    header = _read_header(r)
    if header.version not in (4, 5) or header.tee_type != TEE_TYPE_TDX:
        raise _fail(
            "quote header",
            f"version {header.version} with TEE type {header.tee_type:#x} "
            "is not a TDX v4 or v5 quote",
        )
    if header.version == 4:
        body_type, body_len = BODY_TYPE_TD10, TD10_REPORT_LEN
    else:
        body_type = r.u16("body type")
        body_size = r.u32("body size")
        expected = {BODY_TYPE_TD10: TD10_REPORT_LEN, BODY_TYPE_TD15: TD15_REPORT_LEN}
        if body_type not in expected:
            raise _fail("TDX quote", f"body type {body_type} not supported (only 2 and 3)")
        body_len = expected[body_type]
        if body_size != body_len:
            raise _fail("TDX quote", f"body size {body_size} for body type {body_type}")
    body = TdReportBody.from_bytes(r.take(body_len, "TD report body"))
    signed_len = r.pos
    auth = _read_signature_data(r, header.version)
    return _assemble(
        TdxQuote, header, data, signed_len, auth, r.rest(), body=body, body_type=body_type
    )


_Q = TypeVar("_Q", SgxQuote, TdxQuote)


def _assemble(
    cls: type[_Q],
    header: QuoteHeader,
    data: bytes,
    signed_len: int,
    auth: _AuthParts,
    trailing: bytes,
    **body: object,
) -> _Q:
    """A quote of type `cls` from its header, its signature data and its body fields."""
    return cls(
        header=header,
        signed_bytes=data[:signed_len],
        signature=auth.signature,
        attestation_key=auth.attestation_key,
        qe_report=SgxReportBody.from_bytes(auth.qe_report_bytes),
        qe_report_bytes=auth.qe_report_bytes,
        qe_report_signature=auth.qe_report_signature,
        qe_auth_data=auth.qe_auth_data,
        cert_data_type=CERT_DATA_PCK_CHAIN,
        pck_chain_pem=auth.pck_chain_pem,
        pck_chain=parse_pck_chain_pem(auth.pck_chain_pem),
        trailing_bytes=trailing,
        **body,  # type: ignore[arg-type]
    )


def parse_quote(data: bytes) -> SgxQuote | TdxQuote:
    """Parse an SGX v3 or TDX v4/v5 quote, chosen by the header's version and TEE type; raise
    `EvidenceError` naming the field for anything else or anything malformed."""
    data = _as_bytes(data)
    if len(data) < 8:
        raise EvidenceError(f"quote header: needs {HEADER_LEN} bytes but only {len(data)} remain")
    version, att_key_type, tee_type = struct.unpack_from("<HHI", data)
    if att_key_type != ATT_KEY_TYPE_ECDSA_P256:
        raise EvidenceError(
            f"quote header: attestation key type {att_key_type} not supported (only 2, ECDSA P-256)"
        )
    if version == 3 and tee_type == TEE_TYPE_SGX:
        return parse_sgx_quote(data)
    if version in (4, 5) and tee_type == TEE_TYPE_TDX:
        return parse_tdx_quote(data)
    raise EvidenceError(
        f"quote header: version {version} with TEE type {tee_type:#x} not supported "
        "(SGX v3, TDX v4 and v5 are)"
    )
