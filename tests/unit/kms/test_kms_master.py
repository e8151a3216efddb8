"""The keys derived from the master key, pinned: a key store written by any earlier version opens,
and its rules and key-encryption keys authenticate, only while these stay the same."""

from __future__ import annotations

import pytest

from ppml.attestation.claims import TeeType
from ppml.errors import ConfigurationError, IntegrityError
from ppml.kms.master import MasterKey
from ppml.kms.policy import Rule

MASTER = bytes(range(32))
STORE_ID = b"\x01" * 16
RULE = Rule(TeeType.SGX, "ab" * 32, mr_signer="cd" * 32, isv_prod_id=1, min_isv_svn=2)
KEK_BLOB = bytes.fromhex(
    "03030303030303030303030344efccaa7c3f891a212a10f48f89a9be35d4e306b2f98b0892831e49c019d5d4"
    "37e393bb2915c3de6260d6b720b9d0d2"
)


def test_derived_keys_and_macs_are_pinned() -> None:
    master = MasterKey(MASTER)
    assert master.check_value(STORE_ID).hex() == (
        "491b4465d8742efb3d7d494b69f1db9bad5a125020b3bb51788f9b7b7264fe26"
    )
    assert master.rule_mac(STORE_ID, "sales", RULE).hex() == (
        "6bae93b4cda326711417bdb63d6397bac0ee63d29a50565868edd014311cfa23"
    )
    assert master.audit_key.hex() == (
        "c0ff22dc3f228bdfa1ab714c1c8ea01ac9df92fded6f21218c69214cc2b38853"
    )
    assert master.state_key.hex() == (
        "5672307dfe59329077a69f42121dd57af11b820211bbdc66a18180c88af73062"
    )
    assert master.seal_kek("sales", 3, b"\x02" * 32, nonce=b"\x03" * 12) == KEK_BLOB
    assert master.open_kek("sales", 3, KEK_BLOB) == b"\x02" * 32


def test_a_kek_opens_only_under_its_name_and_version() -> None:
    master = MasterKey(MASTER)
    for name, version in (("sales", 4), ("pii", 3)):
        with pytest.raises(IntegrityError):
            master.open_kek(name, version, KEK_BLOB)
    with pytest.raises(IntegrityError):
        MasterKey(bytes(32)).open_kek("sales", 3, KEK_BLOB)


def test_a_master_key_must_be_32_bytes_and_never_shows() -> None:
    for bad in (b"", bytes(31), bytes(33), "x" * 32):
        with pytest.raises(ConfigurationError):
            MasterKey(bad)  # type: ignore[arg-type]
    assert MASTER.hex() not in repr(MasterKey(MASTER))
