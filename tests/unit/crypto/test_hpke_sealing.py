"""HPKE sealing of data keys: round trips; opening the wrong thing always fails opaquely."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ppml.crypto.envelope import WrappedKey
from ppml.crypto.hpke import (
    PUBLIC_KEY_BYTES,
    generate_keypair,
    open_sealed,
    release_info,
    seal_to,
)
from ppml.errors import IntegrityError, UsageError

INFO = b"ppml/test/v1\x00context"
DEK = bytes(range(32))


def test_a_sealed_value_opens_with_the_private_key_and_the_same_info() -> None:
    private, public = generate_keypair()
    assert len(public) == PUBLIC_KEY_BYTES
    assert public == private.public_key().public_bytes_raw()
    sealed = seal_to(public, DEK, info=INFO)
    assert DEK not in sealed
    assert len(sealed) == 32 + len(DEK) + 16  # encapsulated key, ciphertext, tag
    assert open_sealed(private, sealed, info=INFO) == DEK


def test_sealing_is_randomised() -> None:
    _, public = generate_keypair()
    assert seal_to(public, DEK, info=INFO) != seal_to(public, DEK, info=INFO)


def test_the_wrong_private_key_cannot_open() -> None:
    _, public = generate_keypair()
    other, _ = generate_keypair()
    with pytest.raises(IntegrityError) as info:
        open_sealed(other, seal_to(public, DEK, info=INFO), info=INFO)
    assert str(info.value) == "integrity check failed"


@pytest.mark.parametrize("info", [INFO + b"x", INFO[:-1], b"ppml/test/v1\x00other"])
def test_the_wrong_info_cannot_open(info: bytes) -> None:
    private, public = generate_keypair()
    with pytest.raises(IntegrityError):
        open_sealed(private, seal_to(public, DEK, info=INFO), info=info)


def test_any_flipped_bit_is_detected() -> None:
    private, public = generate_keypair()
    sealed = seal_to(public, DEK, info=INFO)
    for i in range(len(sealed)):
        for bit in (0x01, 0x80):
            tampered = bytearray(sealed)
            tampered[i] ^= bit
            with pytest.raises(IntegrityError):
                open_sealed(private, bytes(tampered), info=INFO)


@pytest.mark.parametrize("cut", [0, 1, 31, 47, 48, -1])
def test_truncation_and_extension_are_detected(cut: int) -> None:
    private, public = generate_keypair()
    sealed = seal_to(public, DEK, info=INFO)
    with pytest.raises(IntegrityError):
        open_sealed(private, sealed[:cut], info=INFO)
    with pytest.raises(IntegrityError):
        open_sealed(private, sealed + b"\x00", info=INFO)


@pytest.mark.parametrize(
    "public", [b"", bytes(31), bytes(33), bytes(32), (1).to_bytes(32, "little")]
)
def test_unusable_public_keys_are_refused(public: bytes) -> None:
    # All-zero and order-one points are low-order: the shared secret would be all zeros.
    with pytest.raises(UsageError):
        seal_to(public, DEK, info=INFO)


def test_info_must_be_given() -> None:
    private, public = generate_keypair()
    with pytest.raises(UsageError):
        seal_to(public, DEK, info=b"")
    with pytest.raises(UsageError):
        open_sealed(private, seal_to(public, DEK, info=INFO), info=b"")
    with pytest.raises(UsageError):
        open_sealed("not a key", b"", info=INFO)  # type: ignore[arg-type]


def test_the_suite_interoperates_with_pyca_hpke_directly() -> None:
    from cryptography.hazmat.primitives import hpke

    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    private = X25519PrivateKey.generate()
    sealed = suite.encrypt(DEK, private.public_key(), info=INFO)
    assert open_sealed(private, sealed, info=INFO) == DEK


WRAPPED = WrappedKey("sales", 3, b"\x01" * 60)


def test_release_info_binds_name_version_purpose_and_wrapped_blob() -> None:
    base = release_info(WRAPPED, "unwrap")
    assert base.startswith(b"ppml/release/v1\x00sales\x00\x00\x00\x00\x03unwrap\x00")
    variants = [
        release_info(WRAPPED, "datakey"),
        release_info(WrappedKey("sales2", 3, WRAPPED.blob), "unwrap"),
        release_info(WrappedKey("sales", 4, WRAPPED.blob), "unwrap"),
        release_info(WrappedKey("sales", 3, b"\x02" * 60), "unwrap"),
    ]
    assert len({base, *variants}) == 5
    assert release_info(WrappedKey("sales", 3, b"\x01" * 60), "unwrap") == base


def test_a_key_released_for_one_context_does_not_open_in_another() -> None:
    private, public = generate_keypair()
    sealed = seal_to(public, DEK, info=release_info(WRAPPED, "datakey"))
    with pytest.raises(IntegrityError):
        open_sealed(private, sealed, info=release_info(WRAPPED, "unwrap"))


def test_release_purposes_are_a_fixed_set() -> None:
    with pytest.raises(UsageError):
        release_info(WRAPPED, "export")  # type: ignore[arg-type]
