"""Image inputs: how a deployment turns an image file (PNG, JPEG, ...) into its model's input.

A client sends the image file's bytes; they travel sealed through the queue like every payload
(`ppml.data.payload.EncodedImage`) and the *worker* decodes them (with Pillow) and preprocesses
them with the deployment's `ImageSpec`, in this order:

1. refuse more than `max_bytes` bytes, a format other than PNG, JPEG, GIF, BMP or WebP
   (recognised by its magic bytes, `sniff_format`), and more than `max_pixels` pixels (read from
   the header, before anything is decoded: a decompression bomb is refused, never inflated);
2. decode (the first frame), convert to grey (``L``) or colour (``RGB``/``BGR``);
3. resize: ``resize = [H, W]`` to exactly that, ``resize = S`` the shorter side to S keeping the
   aspect ratio (as torchvision's ``Resize``), with `resample` (default bilinear);
4. center crop to ``crop = [H, W]`` (torchvision's ``CenterCrop`` offsets);
5. ``x * scale``, then ``(x - mean) / std`` per channel (float32); with ``scale = 1``, ``mean = 0``
   and ``std = 1`` the pixels stay integers 0-255 (uint8), for models that take integers;
6. channel order (``BGR`` flips RGB) and layout: ``NCHW`` (channels first, ``(C, H, W)`` per
   instance) or ``NHWC`` (``(H, W, C)``); ``L`` has one channel.

A malformed, truncated, oversized or too-large-in-pixels image is a `UsageError` whose message
says why (never anything of the image's content): the worker answers that request with it as
its error, and the front end refuses what it can see without decoding (size, magic bytes) with
a 400/413 before anything is queued. The spec is canonical JSON (`to_json`) on the measured
command lines of the worker and the front end, so under ``--tee sim`` it is part of what is
attested.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Final

import numpy as np

from ppml.errors import UsageError

__all__ = [
    "FORMATS",
    "IMAGE_KEYS",
    "ImageSpec",
    "parse_floats",
    "parse_size",
    "sniff_format",
]

FORMATS: Final = ("PNG", "JPEG", "GIF", "BMP", "WEBP")
MODES: Final = ("L", "RGB", "BGR")
LAYOUTS: Final = ("NCHW", "NHWC")
RESAMPLE: Final = ("nearest", "bilinear", "bicubic", "lanczos", "box")
DEFAULT_MAX_BYTES: Final = 512 * 1024
DEFAULT_MAX_PIXELS: Final = 4096 * 4096
_MAX_SIDE: Final = 16384


def sniff_format(data: bytes) -> str | None:
    """The format of an image file by its magic bytes (one of `FORMATS`), None otherwise."""
    head = bytes(data[:12])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith(b"BM") and len(head) >= 12:
        return "BMP"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def parse_size(value: Any, what: str) -> tuple[int, int] | int:
    """``"224"``/``224`` (one side) or ``"224,224"``/``[224, 224]`` (height, width)."""
    items: Sequence[Any]
    if isinstance(value, str):
        items = [v for v in value.replace("x", ",").split(",") if v.strip()]
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    elif isinstance(value, Sequence):
        items = value
    else:
        raise UsageError(f"{what} is a size: S or H,W")
    try:
        sizes = [int(v) for v in items]
        if any(isinstance(v, bool | float) for v in items):
            raise ValueError
    except (TypeError, ValueError):
        raise UsageError(f"{what} is a size: S or H,W (positive integers)") from None
    if len(sizes) not in (1, 2) or not all(1 <= s <= _MAX_SIDE for s in sizes):
        raise UsageError(f"{what} is a size: S or H,W (integers from 1 to {_MAX_SIDE})")
    return sizes[0] if len(sizes) == 1 else (sizes[0], sizes[1])


def _number(value: Any) -> float:
    """A number, or the text of one: ``0.5``, ``"0.5"``, ``"1/255"``."""
    if isinstance(value, bool):
        raise ValueError("a boolean")
    if isinstance(value, str) and "/" in value:
        top, bottom = value.split("/", 1)
        return float(top) / float(bottom)
    return float(value)


def parse_floats(value: Any, what: str) -> tuple[float, ...]:
    """``"0.5"``, ``"0.485,0.456,0.406"``, ``"1/255"``, a number or a list of numbers (all
    finite)."""
    items: Sequence[Any]
    if isinstance(value, str):
        items = [v for v in value.split(",") if v.strip()]
    elif isinstance(value, int | float) and not isinstance(value, bool):
        items = [value]
    elif isinstance(value, Sequence):
        items = value
    else:
        raise UsageError(f"{what} is a number or numbers separated by commas")
    try:
        numbers = tuple(_number(v) for v in items)
    except (TypeError, ValueError, ZeroDivisionError):
        raise UsageError(f"{what} is a number or numbers separated by commas") from None
    if not numbers or not all(math.isfinite(n) for n in numbers):
        raise UsageError(f"{what}: finite numbers, at least one")
    return numbers


@dataclass(frozen=True, slots=True)
class ImageSpec:
    """How a deployment preprocesses image inputs (see the module docstring)."""

    mode: str
    resize: tuple[int, int] | int | None = None
    crop: tuple[int, int] | None = None
    layout: str = "NCHW"
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    resample: str = "bilinear"
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"image mode is one of {', '.join(MODES)}, not {self.mode!r}")
        layout = str(self.layout).upper()
        layout = {"CHW": "NCHW", "HWC": "NHWC"}.get(layout, layout)
        if layout not in LAYOUTS:
            raise UsageError(f"image layout is NCHW or NHWC, not {self.layout!r}")
        object.__setattr__(self, "layout", layout)
        if self.resize is not None:
            object.__setattr__(self, "resize", parse_size(self.resize, "image resize"))
        if self.crop is not None:
            crop = parse_size(self.crop, "image crop")
            object.__setattr__(self, "crop", (crop, crop) if isinstance(crop, int) else crop)
        (scale,) = parse_floats([self.scale], "image scale")
        if scale <= 0:
            raise UsageError("image scale must be positive")
        object.__setattr__(self, "scale", scale)
        channels = self.channels
        mean = parse_floats(self.mean, "image mean")
        std = parse_floats(self.std, "image std")
        for name, values in (("mean", mean), ("std", std)):
            if len(values) not in (1, channels):
                raise UsageError(
                    f"image {name} has one value or one per channel ({channels} for mode "
                    f"{self.mode}), not {len(values)}"
                )
        if any(s <= 0 for s in std):
            raise UsageError("image std values must be positive")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        if self.resample not in RESAMPLE:
            raise UsageError(f"image resample is one of {', '.join(RESAMPLE)}")
        for name in ("max_bytes", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"image {name} must be a positive integer")

    # -- facts -------------------------------------------------------------------------------

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    @property
    def integer_pixels(self) -> bool:
        """Whether the output is the pixels themselves (uint8): scale 1, mean 0, std 1."""
        return self.scale == 1.0 and set(self.mean) == {0.0} and set(self.std) == {1.0}

    def instance_shape(self) -> tuple[int | None, ...]:
        """The shape of one preprocessed instance (None: the image's own size decides)."""
        h: int | None = None
        w: int | None = None
        if self.crop is not None:
            h, w = self.crop
        elif isinstance(self.resize, tuple):
            h, w = self.resize
        c = self.channels
        return (c, h, w) if self.layout == "NCHW" else (h, w, c)

    def check_model(self, shape: Sequence[int | None], dtype: str) -> None:
        """Refuse settings whose output the model cannot take (`shape`: one instance)."""
        mine = self.instance_shape()
        text = ", ".join("*" if d is None else str(d) for d in mine)
        want = ", ".join("*" if d is None else str(d) for d in shape)
        if len(shape) != 3:
            raise UsageError(
                f"image inputs give instances of shape ({text}) but the model takes ({want}): "
                "a model for images takes 3 dimensions per instance"
            )
        for got, need in zip(mine, shape, strict=True):
            if need is not None and got is None:
                raise UsageError(
                    f"the model takes instances of shape ({want}): set image resize (H,W) or "
                    "crop so that every image gives that size"
                )
            if need is not None and got != need:
                raise UsageError(
                    f"the image settings give instances of shape ({text}) but the model takes "
                    f"({want}): check image mode, layout, resize and crop"
                )
        kind = np.dtype(dtype).kind
        if kind != "f" and not (self.integer_pixels and np.can_cast(np.uint8, np.dtype(dtype))):
            raise UsageError(
                f"the model's input is {dtype}: image inputs need a float input, or scale 1, "
                "mean 0, std 1 and an integer type that holds 0-255"
            )

    # -- JSON --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "resize": list(self.resize) if isinstance(self.resize, tuple) else self.resize,
            "crop": list(self.crop) if self.crop is not None else None,
            "layout": self.layout,
            "scale": self.scale,
            "mean": list(self.mean),
            "std": list(self.std),
            "resample": self.resample,
            "max_bytes": self.max_bytes,
            "max_pixels": self.max_pixels,
        }

    def to_json(self) -> str:
        """Canonical JSON (the same settings give the same text: it is measured)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageSpec:
        if not isinstance(data, Mapping):
            raise UsageError("image settings are a table of: " + ", ".join(IMAGE_KEYS))
        unknown = set(data) - set(IMAGE_KEYS)
        if unknown:
            raise UsageError(
                f"unknown image settings {sorted(unknown)}; known: {', '.join(IMAGE_KEYS)}"
            )
        if "mode" not in data or data["mode"] is None:
            raise UsageError("image inputs need a mode: L, RGB or BGR (--image-mode)")
        values = {k: v for k, v in data.items() if v is not None}
        for key in ("mean", "std"):
            if key in values:
                values[key] = parse_floats(values[key], f"image {key}")
        if "scale" in values:
            (values["scale"],) = parse_floats([values["scale"]], "image scale")
        try:
            return cls(**values)
        except TypeError:
            raise UsageError("invalid image settings") from None

    @classmethod
    def from_json(cls, text: str) -> ImageSpec:
        try:
            data = json.loads(text)
        except ValueError:
            raise UsageError("image settings are a JSON object") from None
        return cls.from_dict(data)

    # -- the work ----------------------------------------------------------------------------

    def check_bytes(self, data: bytes) -> str:
        """What can be refused without decoding: size and format. Returns the format."""
        if len(data) > self.max_bytes:
            raise UsageError(
                f"the image is {len(data)} bytes, over the limit of {self.max_bytes} bytes"
            )
        fmt = sniff_format(data)
        if fmt is None:
            raise UsageError(f"not an image file of a supported format ({', '.join(FORMATS)})")
        return fmt

    def preprocess(self, data: bytes) -> np.ndarray:
        """One instance for the model from an image file's bytes (see the module docstring)."""
        return self.transform(self._decode(data))

    def transform(self, image: Any) -> np.ndarray:
        """One instance for the model from a decoded Pillow image (steps 2-6 of the module
        docstring): what `preprocess` does after decoding, for training on the same input."""
        image = image.convert("L" if self.mode == "L" else "RGB")
        if self.resize is not None:
            image = image.resize(self._resized_size(image.size), _resample(self.resample))
        if self.crop is not None:
            ch, cw = self.crop
            w, h = image.size
            if ch > h or cw > w:
                raise UsageError(
                    f"the image is {w}x{h} pixels (after resizing), smaller than the crop {cw}x{ch}"
                )
            top, left = round((h - ch) / 2.0), round((w - cw) / 2.0)
            image = image.crop((left, top, left + cw, top + ch))
        pixels = np.asarray(image, dtype=np.uint8)
        del image
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if self.mode == "BGR":
            pixels = pixels[:, :, ::-1]
        out: np.ndarray
        if self.integer_pixels:
            out = pixels
        else:
            mean = np.asarray(self.mean, dtype=np.float32)
            std = np.asarray(self.std, dtype=np.float32)
            out = (pixels.astype(np.float32) * np.float32(self.scale) - mean) / std
        if self.layout == "NCHW":
            out = out.transpose(2, 0, 1)
        return np.ascontiguousarray(out)

    def _resized_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) after `resize`."""
        if isinstance(self.resize, tuple):
            return self.resize[1], self.resize[0]
        assert self.resize is not None
        w, h = size
        short = self.resize
        if w <= h:
            return short, max(1, int(short * h / w))
        return max(1, int(short * w / h)), short

    def _decode(self, data: bytes) -> Any:
        """The image (first frame) in mode L or RGB, after the byte, format and pixel limits."""
        try:
            from PIL import Image
        except ImportError:
            raise UsageError("this worker cannot decode images: install ppml[serving]") from None
        fmt = self.check_bytes(data)
        with warnings.catch_warnings():
            # Pillow's own bomb check warns above its global limit: make it a refusal.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                with Image.open(io.BytesIO(data), formats=[fmt]) as image:
                    w, h = image.size
                    if w < 1 or h < 1 or w * h > self.max_pixels:
                        raise UsageError(
                            f"the image is {w}x{h} pixels, over the limit of "
                            f"{self.max_pixels} pixels"
                        )
                    image.load()
                    return image.convert("L" if self.mode == "L" else "RGB")
            except UsageError:
                raise
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise UsageError(
                    f"the image is over the limit of {self.max_pixels} pixels"
                ) from None
            except Exception:  # any decoder failure: the image is damaged, never the worker
                raise UsageError(
                    f"the image could not be decoded as {fmt}: damaged or truncated"
                ) from None


IMAGE_KEYS: Final = tuple(f.name for f in fields(ImageSpec))


def _resample(name: str) -> Any:
    from PIL import Image

    return {
        "nearest": Image.Resampling.NEAREST,
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "lanczos": Image.Resampling.LANCZOS,
        "box": Image.Resampling.BOX,
    }[name]
