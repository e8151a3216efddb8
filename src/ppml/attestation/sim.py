"""The simulated TEE: evidence signed by the workspace's sim platform key (Ed25519). It runs the
whole attestation flow anywhere and gives no confidentiality, and everything it produces says `sim`.

Evidence is the canonical JSON (sorted keys, no white space, UTF-8) of::

    {"body": {"debug": false,
              "format": "ppml-sim-evidence/1",
              "measurement": "<64 or 96 lowercase hex: a SHA-256 or SHA-384 digest>",
              "platform_key_id": "<64 lowercase hex: SHA-256 of the raw platform public key>",
              "report_data": "<128 lowercase hex: the 64 bytes of report data>",
              "tcb_status": "UpToDate",
              "tee": "sim"},
     "signature": "<128 lowercase hex: Ed25519 over b'ppml-sim-evidence/1' 0x00 canonical(body)>"}

Parsing is strict: the bytes must be exactly that canonical encoding, with exactly those fields.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ppml._internal.canonical import canonical_json
from ppml.attestation.claims import REPORT_DATA_BYTES, EvidenceClaims, TcbStatus, TeeType
from ppml.attestation.verifier import check_report_data
from ppml.errors import AttestationFailed, ConfigurationError, UsageError

__all__ = [
    "MAX_SIM_EVIDENCE_BYTES",
    "SIM_EVIDENCE_FORMAT",
    "SimEvidence",
    "SimPlatform",
    "SimVerifier",
    "sim_platform_key_id",
]

SIM_EVIDENCE_FORMAT = "ppml-sim-evidence/1"
MAX_SIM_EVIDENCE_BYTES = 16 * 1024
_SIGNING_CONTEXT = SIM_EVIDENCE_FORMAT.encode("ascii") + b"\x00"
_BODY_FIELDS = frozenset(
    {"format", "tee", "measurement", "debug", "report_data", "tcb_status", "platform_key_id"}
)
_MEASUREMENT = re.compile(r"(?:[0-9a-f]{64}|[0-9a-f]{96})")
_KEY_ID = re.compile(r"[0-9a-f]{64}")
_REPORT_DATA = re.compile(r"[0-9a-f]{128}")
_SIGNATURE = re.compile(r"[0-9a-f]{128}")


def sim_platform_key_id(public_key: Ed25519PublicKey) -> str:
    """The id evidence carries for the platform key that signed it: SHA-256 of the raw key, hex."""
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def _fail(reason: str) -> NoReturn:
    raise AttestationFailed(f"sim evidence: {reason}")


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"non-finite number {name}")


def _hex_field(body: dict[str, Any], name: str, pattern: re.Pattern[str]) -> str:
    value = body[name]
    if not isinstance(value, str) or not pattern.fullmatch(value):
        _fail(f"field {name!r} is not lowercase hex of the right length")
    return value


@dataclass(frozen=True, slots=True)
class SimEvidence:
    """Parsed (not yet verified) sim evidence."""

    measurement: str
    debug: bool
    report_data: bytes
    tcb_status: TcbStatus
    platform_key_id: str
    signature: bytes

    def body(self) -> dict[str, Any]:
        return {
            "format": SIM_EVIDENCE_FORMAT,
            "tee": TeeType.SIM.value,
            "measurement": self.measurement,
            "debug": self.debug,
            "report_data": self.report_data.hex(),
            "tcb_status": self.tcb_status.value,
            "platform_key_id": self.platform_key_id,
        }

    def signed_message(self) -> bytes:
        """The bytes the platform key signs: a context string, then the canonical body."""
        return _SIGNING_CONTEXT + canonical_json(self.body())

    def to_bytes(self) -> bytes:
        return canonical_json({"body": self.body(), "signature": self.signature.hex()})

    @classmethod
    def parse(cls, evidence: object) -> SimEvidence:
        """Parse evidence bytes strictly; anything malformed raises `AttestationFailed`."""
        if not isinstance(evidence, bytes):
            _fail("evidence must be bytes")
        if len(evidence) > MAX_SIM_EVIDENCE_BYTES:
            _fail(f"evidence is larger than {MAX_SIM_EVIDENCE_BYTES} bytes")
        try:
            doc = json.loads(evidence.decode("utf-8"), parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            _fail("evidence is not a JSON document")
        if not isinstance(doc, dict) or set(doc) != {"body", "signature"}:
            _fail("evidence must be an object with exactly 'body' and 'signature'")
        body = doc["body"]
        if not isinstance(body, dict):
            _fail("'body' must be an object")
        if body.get("format") != SIM_EVIDENCE_FORMAT:
            _fail("unsupported evidence format")
        if set(body) != _BODY_FIELDS:
            _fail("'body' does not have exactly the expected fields")
        if body["tee"] != TeeType.SIM.value:
            _fail("'tee' must be 'sim'")
        if body["tcb_status"] != TcbStatus.UP_TO_DATE.value:
            _fail("'tcb_status' must be 'UpToDate'")
        debug = body["debug"]
        if not isinstance(debug, bool):
            _fail("'debug' must be a boolean")
        signature = doc["signature"]
        if not isinstance(signature, str) or not _SIGNATURE.fullmatch(signature):
            _fail("'signature' must be 128 lowercase hex digits")
        parsed = cls(
            measurement=_hex_field(body, "measurement", _MEASUREMENT),
            debug=debug,
            report_data=bytes.fromhex(_hex_field(body, "report_data", _REPORT_DATA)),
            tcb_status=TcbStatus.UP_TO_DATE,
            platform_key_id=_hex_field(body, "platform_key_id", _KEY_ID),
            signature=bytes.fromhex(signature),
        )
        # One encoding per document: no alternative spellings of the same evidence.
        if parsed.to_bytes() != evidence:
            _fail("evidence is not in canonical form")
        return parsed


class SimPlatform:
    """The launcher's side of the sim TEE: holds the platform key and signs evidence. The
    workload never holds this object."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise ConfigurationError("the sim platform key must be an Ed25519 private key")
        self._key = private_key
        self._key_id = sim_platform_key_id(private_key.public_key())

    @classmethod
    def generate(cls) -> SimPlatform:
        """A platform with a fresh key (for tests and throwaway workspaces)."""
        return cls(Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    @property
    def key_id(self) -> str:
        return self._key_id

    def quote(self, measurement_hex: str, report_data: bytes, *, debug: bool = False) -> bytes:
        """Signed sim evidence for a workload with `measurement_hex` that asked to bind
        `report_data` (64 bytes)."""
        if not isinstance(measurement_hex, str) or not _MEASUREMENT.fullmatch(measurement_hex):
            raise UsageError("the measurement must be 64 or 96 lowercase hex digits")
        if not isinstance(report_data, bytes) or len(report_data) != REPORT_DATA_BYTES:
            raise UsageError(f"report data must be {REPORT_DATA_BYTES} bytes")
        if not isinstance(debug, bool):
            raise UsageError("debug must be a boolean")
        unsigned = SimEvidence(
            measurement=measurement_hex,
            debug=debug,
            report_data=report_data,
            tcb_status=TcbStatus.UP_TO_DATE,
            platform_key_id=self._key_id,
            signature=b"",
        )
        signature = self._key.sign(unsigned.signed_message())
        return SimEvidence(
            measurement=measurement_hex,
            debug=debug,
            report_data=report_data,
            tcb_status=TcbStatus.UP_TO_DATE,
            platform_key_id=self._key_id,
            signature=signature,
        ).to_bytes()


class SimVerifier:
    """Verifies sim evidence against the workspace's sim platform public key."""

    def __init__(self, platform_public_key: Ed25519PublicKey) -> None:
        if not isinstance(platform_public_key, Ed25519PublicKey):
            raise ConfigurationError("the sim platform key must be an Ed25519 public key")
        self._public_key = platform_public_key
        self._key_id = sim_platform_key_id(platform_public_key)

    @property
    def tee(self) -> TeeType:
        return TeeType.SIM

    def verify(self, evidence: bytes, *, expected_report_data: bytes) -> EvidenceClaims:
        parsed = SimEvidence.parse(evidence)
        if not hmac.compare_digest(parsed.platform_key_id, self._key_id):
            _fail("evidence names another sim platform key")
        try:
            self._public_key.verify(parsed.signature, parsed.signed_message())
        except InvalidSignature:
            _fail("signature does not verify")
        check_report_data(parsed.report_data, expected_report_data)
        return EvidenceClaims(
            tee=TeeType.SIM,
            measurements=MappingProxyType({"measurement": parsed.measurement}),
            debug=parsed.debug,
            tcb_status=parsed.tcb_status,
            report_data=parsed.report_data,
            extra=MappingProxyType({"platform_key_id": parsed.platform_key_id}),
        )
