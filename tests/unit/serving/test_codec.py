"""The serving payload codec: round trips, and every tamper or mix-up refused opaquely."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ppml.data.payload import PayloadCodec
from ppml.errors import IntegrityError, UsageError

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


@pytest.fixture
def codec() -> PayloadCodec:
    return PayloadCodec(KEY, "fraud")


def test_round_trip_keeps_dtype_shape_and_values(codec: PayloadCodec) -> None:
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    out = codec.open("r1", "request", codec.seal("r1", "request", array))
    assert out.dtype == array.dtype and out.shape == array.shape
    np.testing.assert_array_equal(out, array)
    assert out.flags.writeable and out.flags.aligned


def test_non_contiguous_and_big_endian_arrays(codec: PayloadCodec) -> None:
    array = np.arange(20, dtype=">i4").reshape(4, 5)[:, ::2]
    out = codec.open("r1", "result", codec.seal("r1", "result", array))
    assert out.dtype == np.dtype(">i4")
    np.testing.assert_array_equal(out, array)


def test_no_plaintext_in_sealed_payload(codec: PayloadCodec) -> None:
    array = np.full(64, 1234.5678, dtype=np.float64)
    blob = codec.seal("r1", "request", array)
    assert array.tobytes()[:16] not in blob


def test_nonces_are_fresh(codec: PayloadCodec) -> None:
    array = np.zeros(3)
    assert codec.seal("r1", "request", array) != codec.seal("r1", "request", array)


def test_injected_random_pins_the_output() -> None:
    a = PayloadCodec(KEY, "fraud", random=lambda n: b"\x07" * n)
    b = PayloadCodec(KEY, "fraud", random=lambda n: b"\x07" * n)
    assert a.seal("r1", "request", np.ones(2)) == b.seal("r1", "request", np.ones(2))


def test_every_flipped_byte_is_detected(codec: PayloadCodec) -> None:
    blob = codec.seal("r1", "request", np.arange(5, dtype=np.int16))
    for i in range(len(blob)):
        tampered = bytearray(blob)
        tampered[i] ^= 0x01
        with pytest.raises(IntegrityError) as info:
            codec.open("r1", "request", bytes(tampered))
        assert str(info.value) == "integrity check failed"


@pytest.mark.parametrize(
    ("request_id", "direction", "model"),
    [("r2", "request", ""), ("r1", "result", ""), ("r1", "request", "other-model")],
)
def test_mix_ups_are_detected(
    codec: PayloadCodec, request_id: str, direction: str, model: str
) -> None:
    blob = codec.seal("r1", "request", np.arange(5))
    with pytest.raises(IntegrityError):
        codec.open(request_id, direction, blob, model=model)  # type: ignore[arg-type]


def test_model_name_is_bound(codec: PayloadCodec) -> None:
    blob = codec.seal("r1", "request", np.arange(5), model="lenet:v1")
    np.testing.assert_array_equal(codec.open("r1", "request", blob, model="lenet:v1"), range(5))
    with pytest.raises(IntegrityError):
        codec.open("r1", "request", blob, model="lenet:v2")


def test_other_deployment_or_key_is_refused(codec: PayloadCodec) -> None:
    blob = codec.seal("r1", "request", np.arange(5))
    with pytest.raises(IntegrityError):
        PayloadCodec(KEY, "other").open("r1", "request", blob)
    with pytest.raises(IntegrityError):
        PayloadCodec(OTHER_KEY, "fraud").open("r1", "request", blob)


def test_truncated_and_extended_blobs_are_refused(codec: PayloadCodec) -> None:
    blob = codec.seal("r1", "request", np.arange(5))
    for cut in (0, 1, 2, 13, 30, len(blob) - 1):
        with pytest.raises(IntegrityError):
            codec.open("r1", "request", blob[:cut])
    with pytest.raises(IntegrityError):
        codec.open("r1", "request", blob + b"\x00")


def test_object_and_structured_dtypes_are_refused(codec: PayloadCodec) -> None:
    for array in (
        np.array([{"a": 1}, None], dtype=object),
        np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")]),
        np.array(["2020-01-01"], dtype="datetime64[D]"),
    ):
        with pytest.raises(UsageError):
            codec.seal("r1", "request", array)
    with pytest.raises(UsageError):
        codec.seal("r1", "request", [1, 2, 3])  # type: ignore[arg-type]


def test_errors_round_trip_and_are_not_arrays(codec: PayloadCodec) -> None:
    blob = codec.seal_error("r1", "input has the wrong shape")
    assert codec.open_result("r1", blob) == (None, "input has the wrong shape")
    with pytest.raises(IntegrityError):
        codec.open("r1", "result", blob)
    with pytest.raises(IntegrityError):
        codec.open_result("r2", blob)
    array, error = codec.open_result("r1", codec.seal_result("r1", np.ones(2), None))
    assert error is None and array is not None
    with pytest.raises(UsageError):
        codec.seal_result("r1", np.ones(2), "both")
    with pytest.raises(UsageError):
        codec.seal_result("r1", None, None)


def test_bad_arguments_are_usage_errors(codec: PayloadCodec) -> None:
    for bad_id in ("", "a:b", "x" * 161, "a b", "-start", "é"):
        with pytest.raises(UsageError):
            codec.seal(bad_id, "request", np.ones(1))
    with pytest.raises(UsageError):
        codec.seal("r1", "sideways", np.ones(1))  # type: ignore[arg-type]
    for key in (b"", b"k" * 16, b"k" * 33):
        with pytest.raises(UsageError) as info:
            PayloadCodec(key, "fraud")
        assert "k" * 16 not in str(info.value)
    with pytest.raises(UsageError):
        PayloadCodec(KEY, "Bad:Name")


def test_codec_hides_its_key(codec: PayloadCodec) -> None:
    assert KEY.hex() not in repr(codec) and repr(KEY) not in repr(codec)
    with pytest.raises(TypeError):
        __import__("pickle").dumps(codec)


def test_plaintext_codec_same_framing_no_encryption() -> None:
    plain = PayloadCodec.plaintext("fraud")
    assert not plain.encrypted
    array = np.full(8, 1234.5678)
    blob = plain.seal("r1", "request", array)
    assert array.tobytes() in blob
    np.testing.assert_array_equal(plain.open("r1", "request", blob), array)
    assert plain.open_result("r1", plain.seal_error("r1", "bad")) == (None, "bad")
    sealed = PayloadCodec(KEY, "fraud")
    # Neither accepts the other's payloads: a plaintext payload injected into a real
    # deployment is refused.
    with pytest.raises(IntegrityError):
        sealed.open("r1", "request", blob)
    with pytest.raises(IntegrityError):
        plain.open("r1", "request", sealed.seal("r1", "request", array))


def test_plaintext_codec_refuses_malformed_bodies() -> None:
    plain = PayloadCodec.plaintext("fraud")
    blob = plain.seal("r1", "request", np.arange(6, dtype=np.int32).reshape(2, 3))
    for cut in range(len(blob)):
        with pytest.raises(IntegrityError):
            plain.open("r1", "request", blob[:cut])
    # A header that claims a huge shape is refused before anything is allocated.
    huge = bytearray(blob)
    huge[-24 - 16 : -24] = (2**40).to_bytes(8, "big") + (2**40).to_bytes(8, "big")
    with pytest.raises(IntegrityError):
        plain.open("r1", "request", bytes(huge))


_dtypes = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(),
    hnp.unsigned_integer_dtypes(),
    hnp.floating_dtypes(),
    hnp.complex_number_dtypes(),
    hnp.byte_string_dtypes(),
    hnp.unicode_string_dtypes(),
)
_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,40}", fullmatch=True)


@settings(max_examples=150, deadline=None)
@given(
    array=hnp.arrays(_dtypes, hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=6)),
    request_id=_ids,
    direction=st.sampled_from(["request", "result"]),
    plaintext=st.booleans(),
)
def test_round_trip_property(
    array: np.ndarray, request_id: str, direction: str, plaintext: bool
) -> None:
    codec = PayloadCodec.plaintext("d") if plaintext else PayloadCodec(KEY, "d")
    out = codec.open(request_id, direction, codec.seal(request_id, direction, array))  # type: ignore[arg-type]
    assert out.dtype == array.dtype and out.shape == array.shape
    np.testing.assert_array_equal(out, array)


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(_ids, min_size=2, max_size=2, unique=True), data=st.binary(max_size=64))
def test_swapped_ids_never_open(ids: list[str], data: bytes) -> None:
    codec = PayloadCodec(KEY, "d")
    array = np.frombuffer(data, dtype=np.uint8)
    for a, b in itertools.permutations(ids):
        with pytest.raises(IntegrityError):
            codec.open(b, "request", codec.seal(a, "request", array))
