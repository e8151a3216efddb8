"""Image inputs: the preprocessing (against numpy by hand), its refusals, the settings, the
sealed payload kind and the worker's batch."""

from __future__ import annotations

import io
import struct
import tomllib
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ppml.data.payload import EncodedImage, PayloadCodec
from ppml.errors import IntegrityError, UsageError
from ppml.serving.batching import NO_IMAGES, run_batch
from ppml.serving.contract import ModelInfo
from ppml.serving.deploy.settings import load_settings
from ppml.serving.image import ImageSpec, sniff_format
from ppml.serving.queue import Request

RNG = np.random.default_rng(3)


def encode(pixels: np.ndarray, fmt: str = "PNG", **options: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **options)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and whose data is a few bytes: a bomb that
    must be refused from its header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


# -- preprocessing, against a hand computation ---------------------------------------------------


def test_rgb_crop_scale_mean_std_nchw_by_hand() -> None:
    pixels = RNG.integers(0, 256, (10, 13, 3), dtype=np.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    spec = ImageSpec("RGB", crop=(6, 8), mean=mean, std=std)
    got = spec.preprocess(encode(pixels))
    top, left = round((10 - 6) / 2), round((13 - 8) / 2)  # torchvision's CenterCrop offsets
    crop = pixels[top : top + 6, left : left + 8].astype(np.float32)
    want = ((crop * np.float32(1 / 255) - np.float32(mean)) / np.float32(std)).transpose(2, 0, 1)
    assert got.dtype == np.float32 and got.shape == (3, 6, 8) == spec.instance_shape()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_bgr_nhwc_flips_the_channels_and_keeps_them_last() -> None:
    pixels = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    spec = ImageSpec("BGR", layout="NHWC", scale=1 / 255)
    got = spec.preprocess(encode(pixels))
    np.testing.assert_allclose(got, pixels[:, :, ::-1] / np.float32(255), rtol=1e-6)
    assert got.shape == (5, 7, 3) and spec.instance_shape() == (None, None, 3)


def test_grey_from_colour_and_integer_pixels_stay_uint8() -> None:
    pixels = RNG.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    spec = ImageSpec("L", scale=1, mean=0, std=1)  # type: ignore[arg-type]
    got = spec.preprocess(encode(pixels))
    want = np.asarray(Image.fromarray(pixels).convert("L"))[None]  # ITU-R 601-2 luma
    assert got.dtype == np.uint8 and got.shape == (1, 4, 6)
    np.testing.assert_array_equal(got, want)


def test_box_resize_by_two_is_the_mean_of_each_block() -> None:
    blocks = RNG.integers(1, 63, (4, 4), dtype=np.uint8) * 4  # block sums divisible by 4
    pixels = np.kron(blocks, np.ones((2, 2), dtype=np.uint8))
    pixels[0::2, 0::2] += 2
    pixels[1::2, 1::2] -= 2  # each 2x2 block: mean equals the block's value
    spec = ImageSpec("L", resize=(4, 4), resample="box", scale=1, layout="NHWC")
    np.testing.assert_array_equal(
        spec.preprocess(encode(pixels))[:, :, 0], blocks.astype(np.float32)
    )


def test_resize_shorter_side_keeps_the_aspect_then_crops() -> None:
    pixels = RNG.integers(0, 256, (40, 80), dtype=np.uint8)
    spec = ImageSpec("L", resize=20, crop=(20, 20))
    assert spec._resized_size((80, 40)) == (40, 20)
    assert spec.preprocess(encode(pixels)).shape == (1, 20, 20)


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP", "WEBP"])
def test_lossless_formats_decode_to_the_same_pixels(fmt: str) -> None:
    pixels = RNG.integers(0, 256, (6, 5), dtype=np.uint8)
    options = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(np.stack([pixels] * 3, axis=-1) if fmt == "WEBP" else pixels, fmt, **options)
    assert sniff_format(data) == fmt
    got = ImageSpec("L", scale=1).preprocess(data)
    np.testing.assert_array_equal(got[0], pixels.astype(np.float32))


def test_jpeg_decodes() -> None:
    pixels = np.full((16, 16, 3), 128, dtype=np.uint8)
    data = encode(pixels, "JPEG", quality=95)
    assert sniff_format(data) == "JPEG"
    assert np.abs(ImageSpec("RGB", scale=1).preprocess(data) - 128).max() <= 2


# -- refusals ---------------------------------------------------------------------------------


def refused(spec: ImageSpec, data: bytes, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        spec.preprocess(data)


def test_malformed_truncated_oversized_and_bombs_are_refused_with_a_reason() -> None:
    spec = ImageSpec("L", max_bytes=4096, max_pixels=64 * 64)
    png = encode(RNG.integers(0, 256, (32, 32), dtype=np.uint8))
    refused(spec, b"GIF88a not really", "not an image file of a supported format")
    refused(spec, b"", "not an image file")
    refused(spec, png[: len(png) // 2], "could not be decoded as PNG: damaged or truncated")
    refused(spec, png[:8] + bytes(200), "could not be decoded as PNG")
    refused(spec, b"\xff\xd8\xff" + bytes(100), "could not be decoded as JPEG")
    refused(spec, png + bytes(4096), "over the limit of 4096 bytes")
    refused(spec, encode(np.zeros((65, 64), np.uint8)), "64x65 pixels, over the limit of 4096")
    # a header claiming 2 billion pixels: refused before anything is decoded
    refused(ImageSpec("L"), png_header_only(50_000, 40_000), "over the limit of 16777216 pixels")
    refused(ImageSpec("L", crop=(40, 40)), png, "32x32 pixels .* smaller than the crop 40x40")


def test_pillow_bomb_check_is_a_refusal_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # below the spec's own limit
    refused(ImageSpec("L"), encode(np.zeros((20, 20), np.uint8)), "over the limit of")


def test_reasons_never_quote_the_content() -> None:
    secret = b"\x89PNG\r\n\x1a\nSECRET-CONTENT"
    with pytest.raises(UsageError) as exc:
        ImageSpec("L").preprocess(secret)
    assert "SECRET" not in str(exc.value)


# -- the settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"mode": "CMYK"}, "image mode is one of L, RGB, BGR"),
        ({"mode": "RGB", "layout": "NCWH"}, "NCHW or NHWC"),
        ({"mode": "RGB", "mean": [0.1, 0.2]}, "one value or one per channel"),
        ({"mode": "L", "std": 0}, "std values must be positive"),
        ({"mode": "L", "scale": "nan"}, "finite"),
        ({"mode": "L", "resize": "0,8"}, "integers from 1"),
        ({"mode": "L", "crop": "a,b"}, "positive integers"),
        ({"mode": "L", "resample": "cubic"}, "resample is one of"),
        ({"mode": "L", "max_pixels": 0}, "max_pixels must be a positive integer"),
        ({"mode": "L", "colour": "x"}, r"unknown image settings \['colour'\]"),
        ({"resize": "8,8"}, "image inputs need a mode"),
    ],
)
def test_bad_settings_are_refused(values: dict[str, Any], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        ImageSpec.from_dict(values)


def test_settings_round_trip_canonically_and_read_fractions() -> None:
    spec = ImageSpec.from_dict(
        {
            "mode": "RGB",
            "resize": "256",
            "crop": "224,224",
            "scale": "1/255",
            "mean": "0.485,0.456,0.406",
            "std": [0.229, 0.224, 0.225],
        }
    )
    assert spec.scale == 1 / 255 and spec.crop == (224, 224) and spec.resize == 256
    assert ImageSpec.from_json(spec.to_json()) == spec
    assert spec.to_json() == ImageSpec.from_json(spec.to_json()).to_json()


def test_settings_are_checked_against_the_model() -> None:
    spec = ImageSpec("L", resize=(8, 8))
    spec.check_model((1, 8, 8), "float32")
    with pytest.raises(
        UsageError, match=r"give instances of shape \(1, 8, 8\) but the model takes \(3, 8, 8\)"
    ):
        spec.check_model((3, 8, 8), "float32")
    with pytest.raises(UsageError, match="set image resize"):
        ImageSpec("L").check_model((1, 8, 8), "float32")
    with pytest.raises(UsageError, match="3 dimensions per instance"):
        spec.check_model((64,), "float32")
    with pytest.raises(UsageError, match="need a float input"):
        spec.check_model((1, 8, 8), "int64")
    ImageSpec("L", resize=(8, 8), scale=1).check_model((1, 8, 8), "int64")
    with pytest.raises(UsageError, match="the model takes"):
        ModelInfo("m", (1, 9, 9), image=spec)
    info = ModelInfo("m", (1, 8, 8), image=spec)
    assert ModelInfo.from_json(info.to_json()) == info
    assert "image" not in ModelInfo("m", (1, 8, 8)).to_json()  # numeric models: unchanged text


def test_deploy_settings_from_toml_and_flags(tmp_path: Path) -> None:
    config = tmp_path / "serving.toml"
    config.write_text(
        '[serving]\nmodel = "m.onnx.ppml"\n[serving.image]\nmode = "RGB"\nresize = [8, 8]\n'
        "mean = [0.5, 0.5, 0.5]\n"
    )
    tomllib.loads(config.read_text())
    s = load_settings(config, {"image": {"mode": "BGR", "std": "0.25", "crop": None}})
    assert s.image == ImageSpec("BGR", resize=(8, 8), mean=(0.5, 0.5, 0.5), std=(0.25,))
    assert load_settings(config, {}).image is not None
    assert load_settings(None, {"model": "m", "image": {"mode": None}}).image is None
    with pytest.raises(UsageError, match="image inputs need a mode"):
        load_settings(None, {"model": "m", "image": {"resize": "8,8"}})
    with pytest.raises(UsageError, match=r"max_body_bytes .* cannot hold one image"):
        load_settings(None, {"model": "m", "image": {"mode": "L", "max_bytes": 1024 * 1024}})
    config.write_text('model = "m"\nimage = "RGB"\n')
    with pytest.raises(UsageError, match="image must be a table"):
        load_settings(config, {})


# -- sealed, and run by the worker ------------------------------------------------------------


def test_an_image_travels_sealed_as_its_own_payload_kind() -> None:
    codec = PayloadCodec(bytes(32), "dep")
    image = EncodedImage(b"\x89PNG\r\n\x1a\nbytes")
    blob = codec.seal_input("r1", image, model="m")
    assert b"PNG" not in blob
    assert codec.open_input("r1", blob, model="m") == image
    with pytest.raises(IntegrityError):
        codec.open_input("r2", blob, model="m")  # bound to the request id
    with pytest.raises(IntegrityError):
        codec.open("r1", "request", blob, model="m")  # not an array
    array_blob = codec.seal_input("r1", np.arange(3.0), model="m")
    np.testing.assert_array_equal(codec.open_input("r1", array_blob, model="m"), np.arange(3.0))
    with pytest.raises(UsageError):
        EncodedImage(b"")
    assert "PNG" not in repr(image)


class Identity:
    name = "id"

    def validate(self, array: Any) -> np.ndarray:
        value = np.asarray(array, dtype=np.float32)
        if value.shape != (1, 2, 2):
            raise UsageError(f"shape {value.shape}")
        return value

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return batch.reshape(len(batch), -1).sum(axis=1, keepdims=True)


def test_the_worker_preprocesses_images_and_answers_a_bad_one_with_its_reason() -> None:
    spec = ImageSpec("L", scale=1)
    good = encode(np.array([[1, 2], [3, 4]], dtype=np.uint8))
    requests = [
        Request("a", "id", EncodedImage(good), "1-0", 1),
        Request("b", "id", EncodedImage(good[:20]), "2-0", 1),
        Request("c", "id", np.ones((1, 2, 2)), "3-0", 1),
    ]
    done = run_batch(Identity(), requests, preprocess=spec.preprocess)
    results = {r.request_id: r for _, r in done}
    assert results["a"].array is not None and results["a"].array.tolist() == [10.0]
    assert results["b"].error is not None and "damaged or truncated" in results["b"].error
    assert results["c"].array is not None and results["c"].array.tolist() == [4.0]
    (_, refused_) = run_batch(Identity(), requests[:1])[0]
    assert refused_.error == NO_IMAGES
