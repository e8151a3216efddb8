"""Intel PCS documents: TCB info, QE identity, CRLs and issuer chains, parsed strictly, and the
verification of a signed document by its issuer chain.

The signed JSON documents (``{"tcbInfo": {...}, "signature": "<hex r||s>"}`` and
``{"enclaveIdentity": ...}``) are verified over the exact bytes of the signed value as they
appear in the file, never over a re-serialisation; the issuer chains are verified up to a root
the caller pins, by the rules of `ppml.attestation.x509_checks`; verified CRLs answer "is this
certificate revoked?" (`RevocationChecker`). Issuer chains are PEM, leaf first, as in PCS's
``TCB-Info-Issuer-Chain``, ``SGX-Enclave-Identity-Issuer-Chain`` and ``SGX-PCK-CRL-Issuer-Chain``
headers (URL-decoded). The collateral as a whole (`Collateral`) and its directory are in
`ppml.attestation.collateral`; its verification, in `ppml.attestation.intel.verified`.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.utils import CryptographyDeprecationWarning

from ppml.attestation.claims import TcbStatus
from ppml.attestation.x509_checks import ca_problem, signer_problem, validity_problem
from ppml.errors import EvidenceError

__all__ = [
    "MAX_CHAIN_BYTES",
    "MAX_CRL_BYTES",
    "MAX_JSON_BYTES",
    "EnclaveIdentity",
    "IsvTcbLevel",
    "RevocationChecker",
    "SignedEnclaveIdentity",
    "SignedTcbInfo",
    "TcbComponent",
    "TcbInfo",
    "TcbLevel",
    "TdxModule",
    "TdxModuleIdentity",
    "check_freshness",
    "extract_signed_body",
    "format_pcs_date",
    "parse_crl",
    "parse_pem_chain",
    "parse_qe_identity_json",
    "parse_tcb_info_json",
    "verify_chain",
    "verify_signed_body",
]

MAX_JSON_BYTES = 1024 * 1024
MAX_CHAIN_BYTES = 64 * 1024
MAX_CRL_BYTES = 4 * 1024 * 1024
_MAX_CHAIN_CERTS = 4
_MAX_LEVELS = 512
_MAX_ADVISORIES = 256
_MAX_MODULE_IDENTITIES = 64
_MAX_TEXT = 128
_COMPONENTS = 16

_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,6}))?Z")
_HEX = re.compile(r"[0-9a-fA-F]*")
_ADVISORY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MODULE_ID = re.compile(r"TDX_[0-9A-Fa-f]{2}")
_JSON_WS = " \t\n\r"
# TCB status names as they appear in collateral (``Unknown`` is ppml's, never Intel's).
_STATUS_NAMES = {s.value: s for s in TcbStatus if s is not TcbStatus.UNKNOWN}

_TCB_INFO_FILE = "tcb_info.json"
_QE_IDENTITY_FILE = "qe_identity.json"


def _fail(source: str, reason: str) -> NoReturn:
    raise EvidenceError(f"{source}: {reason}")


# --------------------------------------------------------------------------- signed JSON


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"non-finite number {name}")


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _JSON_WS:
        i += 1
    return i


def extract_signed_body(
    data: bytes, body_key: str, *, source: str
) -> tuple[bytes, dict[str, Any], bytes]:
    """Split a PCS signed document ``{"<body_key>": {...}, "signature": "<hex>"}`` into the exact
    bytes of the body's value as they appear in `data`, the parsed body and the 64-byte raw
    signature. Exactly those two keys, no duplicate key at any depth, nothing after the object."""
    if not isinstance(data, bytes):
        _fail(source, "must be bytes")
    if len(data) > MAX_JSON_BYTES:
        _fail(source, f"larger than {MAX_JSON_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        _fail(source, "is not UTF-8")
    try:
        return _split_signed(text, body_key, source)
    except _DuplicateKey as exc:
        _fail(source, f"duplicate key {str(exc)[:40]!r}")
    except (ValueError, RecursionError):
        _fail(source, "is not a well-formed JSON document")


def _split_signed(text: str, body_key: str, source: str) -> tuple[bytes, dict[str, Any], bytes]:
    i = _skip_ws(text, 0)
    if i >= len(text) or text[i] != "{":
        _fail(source, "must be a JSON object")
    i += 1
    members: dict[str, tuple[Any, int, int]] = {}
    first = True
    while True:
        i = _skip_ws(text, i)
        if first and i < len(text) and text[i] == "}":
            i += 1
            break
        if i >= len(text) or text[i] != '"':
            _fail(source, "expected a member name")
        key, i = json.decoder.scanstring(text, i + 1, True)  # type: ignore[attr-defined]
        if key in members:
            _fail(source, f"duplicate key {key[:40]!r}")
        i = _skip_ws(text, i)
        if i >= len(text) or text[i] != ":":
            _fail(source, "expected ':'")
        i = _skip_ws(text, i + 1)
        value, end = _DECODER.raw_decode(text, i)
        members[key] = (value, i, end)
        i = _skip_ws(text, end)
        first = False
        if i < len(text) and text[i] == ",":
            i += 1
            continue
        if i < len(text) and text[i] == "}":
            i += 1
            break
        _fail(source, "expected ',' or '}'")
    if _skip_ws(text, i) != len(text):
        _fail(source, "has data after the JSON object")
    if set(members) != {body_key, "signature"}:
        _fail(source, f"must have exactly the keys {body_key!r} and 'signature'")
    body, start, end = members[body_key]
    if not isinstance(body, dict):
        _fail(source, f"{body_key!r} must be an object")
    signature = members["signature"][0]
    if not isinstance(signature, str) or len(signature) != 128 or not _HEX.fullmatch(signature):
        _fail(source, "'signature' must be 128 hex digits (raw r||s)")
    return text[start:end].encode("utf-8"), body, bytes.fromhex(signature)


# --------------------------------------------------------------------------- field readers


class _Fields:
    """Reads one JSON object's fields strictly: exactly the allowed keys, typed values."""

    def __init__(
        self,
        obj: object,
        where: str,
        source: str,
        required: set[str],
        optional: Collection[str] = (),
    ) -> None:
        self.source = source
        self.where = where
        if not isinstance(obj, dict):
            self.fail("must be an object")
        keys = set(obj)
        missing = required - keys
        if missing:
            self.fail(f"missing field {sorted(missing)[0]!r}")
        extra = keys - required - set(optional)
        if extra:
            self.fail(f"unexpected field {sorted(extra)[0][:40]!r}")
        self.obj: dict[str, Any] = obj

    def fail(self, reason: str, name: str | None = None) -> NoReturn:
        at = f"{self.where}.{name}" if name else self.where
        _fail(self.source, f"{at}: {reason}")

    def has(self, name: str) -> bool:
        return name in self.obj

    def get_int(self, name: str, maximum: int) -> int:
        value = self.obj[name]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
            self.fail(f"must be an integer in 0..{maximum}", name)
        return value

    def get_str(self, name: str) -> str:
        value = self.obj[name]
        if not isinstance(value, str) or len(value) > _MAX_TEXT:
            self.fail(f"must be a string of at most {_MAX_TEXT} characters", name)
        return value

    def get_hex(self, name: str, size: int) -> bytes:
        value = self.obj[name]
        if not isinstance(value, str) or len(value) != 2 * size or not _HEX.fullmatch(value):
            self.fail(f"must be {2 * size} hex digits", name)
        return bytes.fromhex(value)

    def get_date(self, name: str) -> tuple[_dt.datetime, str]:
        value = self.obj[name]
        if not isinstance(value, str):
            self.fail("must be a date string", name)
        m = _DATE.fullmatch(value)
        if not m:
            self.fail("must be a date like 2024-01-31T00:00:00Z", name)
        year, month, day, hour, minute, second, frac = m.groups()
        try:
            when = _dt.datetime(
                int(year),
                int(month),
                int(day),
                int(hour),
                int(minute),
                int(second),
                int((frac or "0").ljust(6, "0")),
                tzinfo=_dt.UTC,
            )
        except ValueError:
            self.fail("is not a valid date", name)
        return when, value

    def get_status(self, name: str) -> TcbStatus:
        value = self.obj[name]
        if not isinstance(value, str) or value not in _STATUS_NAMES:
            self.fail("is not a TCB status name", name)
        return _STATUS_NAMES[value]

    def get_array(self, name: str, maximum: int, *, nonempty: bool = True) -> list[Any]:
        value = self.obj[name]
        if not isinstance(value, list) or len(value) > maximum or (nonempty and not value):
            self.fail(
                f"must be a {'non-empty ' if nonempty else ''}array of at most {maximum}", name
            )
        return value

    def advisories(self) -> tuple[str, ...]:
        if not self.has("advisoryIDs"):
            return ()
        items = self.get_array("advisoryIDs", _MAX_ADVISORIES, nonempty=False)
        for item in items:
            if not isinstance(item, str) or not _ADVISORY.fullmatch(item):
                self.fail("must hold advisory ids like INTEL-SA-00615", "advisoryIDs")
        if len(set(items)) != len(items):
            self.fail("holds an advisory id twice", "advisoryIDs")
        return tuple(items)


# --------------------------------------------------------------------------- parsed types


@dataclass(frozen=True, slots=True)
class TcbComponent:
    svn: int
    category: str | None = None
    type: str | None = None


@dataclass(frozen=True, slots=True)
class TcbLevel:
    """One platform TCB level: 16 SGX component SVNs, the PCE SVN and (TDX) 16 TDX ones."""

    sgx_components: tuple[TcbComponent, ...]
    pce_svn: int
    tdx_components: tuple[TcbComponent, ...] | None
    tcb_date: _dt.datetime
    tcb_date_text: str
    status: TcbStatus
    advisory_ids: tuple[str, ...]

    @property
    def sgx_svns(self) -> tuple[int, ...]:
        return tuple(c.svn for c in self.sgx_components)

    @property
    def tdx_svns(self) -> tuple[int, ...] | None:
        return None if self.tdx_components is None else tuple(c.svn for c in self.tdx_components)


@dataclass(frozen=True, slots=True)
class IsvTcbLevel:
    """A TCB level keyed by one ISV SVN (QE identity levels, TDX module identity levels)."""

    isv_svn: int
    tcb_date: _dt.datetime
    tcb_date_text: str
    status: TcbStatus
    advisory_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TdxModule:
    mr_signer: bytes  # 48 bytes
    attributes: bytes  # 8 bytes
    attributes_mask: bytes  # 8 bytes


@dataclass(frozen=True, slots=True)
class TdxModuleIdentity:
    id: str  # "TDX_01" ...
    mr_signer: bytes
    attributes: bytes
    attributes_mask: bytes
    tcb_levels: tuple[IsvTcbLevel, ...]


@dataclass(frozen=True, slots=True)
class TcbInfo:
    """TCB info v2 (SGX) or v3 (SGX or TDX)."""

    id: str  # "SGX" or "TDX" (v2 is always SGX)
    version: int
    issue_date: _dt.datetime
    next_update: _dt.datetime
    fmspc: bytes
    pce_id: bytes
    tcb_type: int
    tcb_evaluation_data_number: int
    tcb_levels: tuple[TcbLevel, ...]
    tdx_module: TdxModule | None = None
    tdx_module_identities: tuple[TdxModuleIdentity, ...] = ()


@dataclass(frozen=True, slots=True)
class EnclaveIdentity:
    """Enclave identity v2 (QE, TD_QE or QVE)."""

    id: str
    version: int
    issue_date: _dt.datetime
    next_update: _dt.datetime
    tcb_evaluation_data_number: int
    miscselect: int
    miscselect_mask: int
    attributes: bytes
    attributes_mask: bytes
    mr_signer: bytes
    isv_prod_id: int
    tcb_levels: tuple[IsvTcbLevel, ...]


@dataclass(frozen=True, slots=True)
class SignedTcbInfo:
    body: TcbInfo
    signed_bytes: bytes  # the exact bytes of the "tcbInfo" value in the file
    signature: bytes  # raw r||s, 64 bytes


@dataclass(frozen=True, slots=True)
class SignedEnclaveIdentity:
    body: EnclaveIdentity
    signed_bytes: bytes
    signature: bytes


def format_pcs_date(when: _dt.datetime) -> str:
    """A UTC datetime in PCS's notation (``2024-03-13T00:00:00Z``)."""
    return when.astimezone(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _components(raw: list[Any], where: str, source: str) -> tuple[TcbComponent, ...]:
    if len(raw) != _COMPONENTS:
        _fail(source, f"{where}: must have exactly {_COMPONENTS} components")
    out = []
    for n, item in enumerate(raw):
        f = _Fields(item, f"{where}[{n}]", source, {"svn"}, {"category", "type"})
        out.append(
            TcbComponent(
                svn=f.get_int("svn", 255),
                category=f.get_str("category") if f.has("category") else None,
                type=f.get_str("type") if f.has("type") else None,
            )
        )
    return tuple(out)


def _tcb_level(raw: object, where: str, source: str, version: int, tdx: bool) -> TcbLevel:
    f = _Fields(raw, where, source, {"tcb", "tcbDate", "tcbStatus"}, {"advisoryIDs"})
    date, date_text = f.get_date("tcbDate")
    status = f.get_status("tcbStatus")
    advisories = f.advisories()
    if version == 2:
        names = {f"sgxtcbcomp{n:02d}svn" for n in range(1, 17)}
        t = _Fields(f.obj["tcb"], f"{where}.tcb", source, names | {"pcesvn"})
        sgx = tuple(TcbComponent(t.get_int(f"sgxtcbcomp{n:02d}svn", 255)) for n in range(1, 17))
        tdx_components = None
    else:
        required = {"sgxtcbcomponents", "pcesvn"} | ({"tdxtcbcomponents"} if tdx else set())
        t = _Fields(f.obj["tcb"], f"{where}.tcb", source, required)
        sgx = _components(t.get_array("sgxtcbcomponents", _COMPONENTS), f"{where}.tcb.sgx", source)
        tdx_components = (
            _components(t.get_array("tdxtcbcomponents", _COMPONENTS), f"{where}.tcb.tdx", source)
            if tdx
            else None
        )
    return TcbLevel(
        sgx_components=sgx,
        pce_svn=t.get_int("pcesvn", 0xFFFF),
        tdx_components=tdx_components,
        tcb_date=date,
        tcb_date_text=date_text,
        status=status,
        advisory_ids=advisories,
    )


def _isv_levels(raw: list[Any], where: str, source: str) -> tuple[IsvTcbLevel, ...]:
    out = []
    for n, item in enumerate(raw):
        f = _Fields(item, f"{where}[{n}]", source, {"tcb", "tcbDate", "tcbStatus"}, {"advisoryIDs"})
        t = _Fields(f.obj["tcb"], f"{where}[{n}].tcb", source, {"isvsvn"})
        date, date_text = f.get_date("tcbDate")
        out.append(
            IsvTcbLevel(
                t.get_int("isvsvn", 0xFFFF),
                date,
                date_text,
                f.get_status("tcbStatus"),
                f.advisories(),
            )
        )
    if len({lv.isv_svn for lv in out}) != len(out):
        _fail(source, f"{where}: two levels have the same isvsvn")
    return tuple(out)


def _tdx_module(raw: object, where: str, source: str) -> TdxModule:
    f = _Fields(raw, where, source, {"mrsigner", "attributes", "attributesMask"})
    return TdxModule(
        f.get_hex("mrsigner", 48), f.get_hex("attributes", 8), f.get_hex("attributesMask", 8)
    )


def _module_identity(raw: object, where: str, source: str) -> TdxModuleIdentity:
    f = _Fields(raw, where, source, {"id", "mrsigner", "attributes", "attributesMask", "tcbLevels"})
    ident = f.get_str("id")
    if not _MODULE_ID.fullmatch(ident):
        f.fail("must be like TDX_01", "id")
    return TdxModuleIdentity(
        id=ident,
        mr_signer=f.get_hex("mrsigner", 48),
        attributes=f.get_hex("attributes", 8),
        attributes_mask=f.get_hex("attributesMask", 8),
        tcb_levels=_isv_levels(f.get_array("tcbLevels", _MAX_LEVELS), f"{where}.tcbLevels", source),
    )


_TCB_INFO_COMMON = {
    "version",
    "issueDate",
    "nextUpdate",
    "fmspc",
    "pceId",
    "tcbType",
    "tcbEvaluationDataNumber",
    "tcbLevels",
}


def _tcb_info(body: dict[str, Any], source: str) -> TcbInfo:
    version = body.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        _fail(source, "tcbInfo.version: must be 2 or 3")
    if version == 2:
        f = _Fields(body, "tcbInfo", source, _TCB_INFO_COMMON)
        ident = "SGX"
    elif version == 3:
        raw_id = body.get("id")
        ident = raw_id if isinstance(raw_id, str) else ""
        if ident == "SGX":
            f = _Fields(body, "tcbInfo", source, _TCB_INFO_COMMON | {"id"})
        elif ident == "TDX":
            f = _Fields(
                body,
                "tcbInfo",
                source,
                _TCB_INFO_COMMON | {"id", "tdxModule"},
                {"tdxModuleIdentities"},
            )
        else:
            _fail(source, "tcbInfo.id: must be 'SGX' or 'TDX'")
    else:
        _fail(source, "tcbInfo.version: must be 2 or 3")
    tdx = ident == "TDX"
    if f.get_int("tcbType", 0xFFFF) != 0:
        f.fail("only TCB type 0 is supported", "tcbType")
    issue, _ = f.get_date("issueDate")
    next_update, _ = f.get_date("nextUpdate")
    levels = tuple(
        _tcb_level(item, f"tcbInfo.tcbLevels[{n}]", source, version, tdx)
        for n, item in enumerate(f.get_array("tcbLevels", _MAX_LEVELS))
    )
    keys = [(lv.sgx_svns, lv.pce_svn, lv.tdx_svns) for lv in levels]
    if len(set(keys)) != len(keys):
        f.fail("two levels have the same TCB components", "tcbLevels")
    identities: tuple[TdxModuleIdentity, ...] = ()
    if tdx and f.has("tdxModuleIdentities"):
        raw_ids = f.get_array("tdxModuleIdentities", _MAX_MODULE_IDENTITIES)
        identities = tuple(
            _module_identity(item, f"tcbInfo.tdxModuleIdentities[{n}]", source)
            for n, item in enumerate(raw_ids)
        )
        if len({i.id.upper() for i in identities}) != len(identities):
            f.fail("two identities have the same id", "tdxModuleIdentities")
    return TcbInfo(
        id=ident,
        version=version,
        issue_date=issue,
        next_update=next_update,
        fmspc=f.get_hex("fmspc", 6),
        pce_id=f.get_hex("pceId", 2),
        tcb_type=0,
        tcb_evaluation_data_number=f.get_int("tcbEvaluationDataNumber", 0xFFFFFFFF),
        tcb_levels=levels,
        tdx_module=_tdx_module(f.obj["tdxModule"], "tcbInfo.tdxModule", source) if tdx else None,
        tdx_module_identities=identities,
    )


def _enclave_identity(body: dict[str, Any], source: str) -> EnclaveIdentity:
    f = _Fields(
        body,
        "enclaveIdentity",
        source,
        {
            "id",
            "version",
            "issueDate",
            "nextUpdate",
            "tcbEvaluationDataNumber",
            "miscselect",
            "miscselectMask",
            "attributes",
            "attributesMask",
            "mrsigner",
            "isvprodid",
            "tcbLevels",
        },
    )
    if f.get_int("version", 0xFFFF) != 2:
        f.fail("must be 2", "version")
    ident = f.get_str("id")
    if ident not in ("QE", "TD_QE", "QVE"):
        f.fail("must be 'QE', 'TD_QE' or 'QVE'", "id")
    issue, _ = f.get_date("issueDate")
    next_update, _ = f.get_date("nextUpdate")
    return EnclaveIdentity(
        id=ident,
        version=2,
        issue_date=issue,
        next_update=next_update,
        tcb_evaluation_data_number=f.get_int("tcbEvaluationDataNumber", 0xFFFFFFFF),
        miscselect=int.from_bytes(f.get_hex("miscselect", 4), "big"),
        miscselect_mask=int.from_bytes(f.get_hex("miscselectMask", 4), "big"),
        attributes=f.get_hex("attributes", 16),
        attributes_mask=f.get_hex("attributesMask", 16),
        mr_signer=f.get_hex("mrsigner", 32),
        isv_prod_id=f.get_int("isvprodid", 0xFFFF),
        tcb_levels=_isv_levels(
            f.get_array("tcbLevels", _MAX_LEVELS), "enclaveIdentity.tcbLevels", source
        ),
    )


def parse_tcb_info_json(data: bytes, *, source: str = _TCB_INFO_FILE) -> SignedTcbInfo:
    """Parse a PCS TCB info response strictly (not verified: see `verify_signed_body`)."""
    raw, body, signature = extract_signed_body(data, "tcbInfo", source=source)
    return SignedTcbInfo(_tcb_info(body, source), raw, signature)


def parse_qe_identity_json(
    data: bytes, *, source: str = _QE_IDENTITY_FILE
) -> SignedEnclaveIdentity:
    """Parse a PCS enclave identity response strictly (not verified)."""
    raw, body, signature = extract_signed_body(data, "enclaveIdentity", source=source)
    return SignedEnclaveIdentity(_enclave_identity(body, source), raw, signature)


# --------------------------------------------------------------------------- X.509 and CRLs


def parse_pem_chain(data: bytes, *, source: str) -> tuple[x509.Certificate, ...]:
    """A PEM issuer chain, leaf first (1 to 4 certificates)."""
    if not isinstance(data, bytes) or len(data) > MAX_CHAIN_BYTES:
        _fail(source, f"must be at most {MAX_CHAIN_BYTES} bytes of PEM")
    try:
        with warnings.catch_warnings():
            # A serial number that is not positive (RFC 5280 forbids it) is only a deprecation
            # warning in cryptography today: malformed collateral here.
            warnings.simplefilter("error", CryptographyDeprecationWarning)
            # A name attribute of the wrong length (a 10-character countryName) is a
            # UserWarning there: malformed too.
            warnings.simplefilter("error", UserWarning)
            certs = x509.load_pem_x509_certificates(data)
            for cert in certs:  # force the lazily parsed parts now, not later
                _ = (cert.subject, cert.issuer, cert.extensions, cert.public_key())
                _ = (cert.not_valid_before_utc, cert.not_valid_after_utc, cert.serial_number)
    except (
        ValueError,
        TypeError,
        UnsupportedAlgorithm,
        x509.InvalidVersion,
        CryptographyDeprecationWarning,
        UserWarning,
    ):
        # e.g. a key on a curve cryptography does not support: malformed collateral too.
        _fail(source, "is not a PEM certificate chain")
    if not 1 <= len(certs) <= _MAX_CHAIN_CERTS:
        _fail(source, f"must hold 1 to {_MAX_CHAIN_CERTS} certificates")
    return tuple(certs)


def parse_crl(data: bytes, *, source: str) -> x509.CertificateRevocationList:
    """A CRL in DER or PEM."""
    if not isinstance(data, bytes) or not data or len(data) > MAX_CRL_BYTES:
        _fail(source, f"must be 1 to {MAX_CRL_BYTES} bytes")
    try:
        if data.lstrip().startswith(b"-----BEGIN X509 CRL-----"):
            crl = x509.load_pem_x509_crl(data)
        else:
            crl = x509.load_der_x509_crl(data)
        _ = (crl.issuer, crl.extensions, crl.last_update_utc, crl.next_update_utc)
        _ = crl.signature_hash_algorithm
        for entry in crl:
            _ = (entry.serial_number, entry.revocation_date_utc, entry.extensions)
    except (
        ValueError,
        TypeError,
        UnsupportedAlgorithm,
        x509.UnsupportedGeneralNameType,
        x509.InvalidVersion,  # newer cryptography checks a CRL's version when loading it
    ):
        _fail(source, "is not a DER or PEM CRL")
    return crl


def _name(name: x509.Name) -> str:
    return repr(name.rfc4514_string()[:80])


def verify_chain(
    chain: Sequence[x509.Certificate],
    *,
    root: x509.Certificate,
    at: _dt.datetime,
    source: str,
    leaf_signs: Literal["data", "crl"] = "data",
) -> x509.Certificate:
    """Verify an issuer chain (leaf first; the root itself may be included or not) up to
    `root` by the rules of `ppml.attestation.x509_checks`, every certificate valid at `at` and
    the leaf fit to sign data (a document) or CRLs (`leaf_signs`); return the leaf."""
    certs = list(chain)
    if certs and certs[-1] == root:
        certs = certs[:-1]
    if not certs:
        _fail(source, "has no certificate below the root")
    if root in certs:
        _fail(source, "holds the root in the middle of the chain")
    for cert in [*certs, root]:
        problem = validity_problem(cert, at)
        if problem is not None:
            _fail(
                source,
                f"certificate {_name(cert.subject)} is not valid at {format_pcs_date(at)}:"
                f" {problem}",
            )
    if (problem := signer_problem(certs[0], signs=leaf_signs)) is not None:
        _fail(source, f"certificate {_name(certs[0].subject)} {problem}")
    for below, (child, parent) in enumerate(zip(certs, [*certs[1:], root], strict=True)):
        if (problem := ca_problem(parent, cas_below=below)) is not None:
            _fail(source, f"issuer {parent.subject.rfc4514_string()[:80]!r} {problem}")
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            _fail(
                source,
                f"certificate {_name(child.subject)} is not issued by {_name(parent.subject)}",
            )
    return certs[0]


def verify_signed_body(
    signed: SignedTcbInfo | SignedEnclaveIdentity,
    chain: Sequence[x509.Certificate],
    *,
    root: x509.Certificate,
    at: _dt.datetime,
    source: str,
) -> x509.Certificate:
    """Verify the issuer chain up to `root` and the ECDSA P-256 SHA-256 signature over the
    exact signed bytes; return the signing certificate."""
    leaf = verify_chain(chain, root=root, at=at, source=f"{source} issuer chain")
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        _fail(source, "the signing certificate does not hold a P-256 key")
    r = int.from_bytes(signed.signature[:32], "big")
    s = int.from_bytes(signed.signature[32:], "big")
    try:
        key.verify(encode_dss_signature(r, s), signed.signed_bytes, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        _fail(source, "signature does not verify")
    return leaf


def check_freshness(
    what: str, issued: _dt.datetime, next_update: _dt.datetime | None, at: _dt.datetime
) -> str | None:
    """Why `what` is not current at `at`, or None when it is."""
    if at < issued:
        return f"{what} is issued at {format_pcs_date(issued)}, after {format_pcs_date(at)}"
    if next_update is None:
        return f"{what} has no nextUpdate"
    if at > next_update:
        return (
            f"{what} expired: nextUpdate {format_pcs_date(next_update)}"
            f" is before {format_pcs_date(at)}"
        )
    return None


class RevocationChecker:
    """Answers revocation questions from CRLs that have been verified by their issuers."""

    def __init__(self, crls: Sequence[x509.CertificateRevocationList] = ()) -> None:
        self._by_issuer: dict[x509.Name, x509.CertificateRevocationList] = {}
        for crl in crls:
            self._by_issuer[crl.issuer] = crl

    def covers(self, issuer: x509.Name) -> bool:
        """Whether a verified CRL from `issuer` is at hand."""
        return issuer in self._by_issuer

    def is_revoked(self, serial: int, issuer: x509.Name) -> bool:
        """Whether the certificate with `serial` issued by `issuer` is revoked. Raises
        `EvidenceError` when no verified CRL from that issuer is at hand."""
        crl = self._by_issuer.get(issuer)
        if crl is None:
            raise EvidenceError(f"no verified CRL from {issuer.rfc4514_string()[:80]!r}")
        return crl.get_revoked_certificate_by_serial_number(serial) is not None

    def is_certificate_revoked(self, cert: x509.Certificate) -> bool:
        return self.is_revoked(cert.serial_number, cert.issuer)
