"""What `ppml serving up` starts: flags, else the TOML file, else the defaults.

Image inputs are set by an ``image`` table (``[serving.image]``, or ``[image]`` in a file without
``[serving]``) whose keys are `ppml.serving.image.IMAGE_KEYS`, or by ``--image-KEY`` flags,
which win key by key."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Final

from ppml.data.payload import validate_deployment
from ppml.errors import InputNotFound, UsageError
from ppml.serving.contract import parse_shape
from ppml.serving.image import IMAGE_KEYS, ImageSpec

__all__ = ["CONFIG_KEYS", "DeploySettings", "load_settings", "with_overrides"]


@dataclass(frozen=True, slots=True)
class DeploySettings:
    """What `ppml serving up` starts (flags, else the TOML file, else these defaults)."""

    model: Path
    deployment: str = "default"
    workers: int = 1
    tee: str | None = None
    host: str = "127.0.0.1"
    port: int = 8500
    runtime: str = "onnx"
    model_name: str | None = None
    input_shape: tuple[int | None, ...] | None = None
    input_dtype: str = "float32"
    max_batch_size: int = 16
    max_wait_ms: int = 5
    intra_op_threads: int = 1
    sync_timeout_s: float = 10.0
    max_body_bytes: int = 1024 * 1024
    max_instances: int = 256
    redis_maxmemory: str | None = None
    start_timeout_s: float = 60.0
    image: ImageSpec | None = None

    def __post_init__(self) -> None:
        validate_deployment(self.deployment)
        if not 1 <= self.workers <= 64:
            raise UsageError("--workers must be between 1 and 64")
        if self.tee not in (None, "sim"):
            raise UsageError(f"unknown or unsupported TEE backend {self.tee!r} (available: sim)")
        if not 0 <= self.port < 65536:
            raise UsageError(f"invalid port {self.port}")
        if self.runtime not in ("onnx", "torchscript"):
            raise UsageError("runtime is onnx or torchscript")
        if self.max_batch_size < 1 or self.max_wait_ms < 0 or self.intra_op_threads < 1:
            raise UsageError("max_batch_size and intra_op_threads >= 1, max_wait_ms >= 0")
        if not self.start_timeout_s > 0:
            raise UsageError("start_timeout_s must be positive")
        if self.image is not None and self.max_body_bytes < _body_for(self.image.max_bytes):
            raise UsageError(
                f"max_body_bytes ({self.max_body_bytes}) cannot hold one image of image "
                f"max_bytes ({self.image.max_bytes}) in base64: raise it to at least "
                f"{_body_for(self.image.max_bytes)} or lower image max_bytes"
            )
        object.__setattr__(self, "model", Path(self.model).absolute())


def _body_for(image_bytes: int) -> int:
    """The body that carries one image of `image_bytes` in base64, with room for the JSON."""
    return 4 * ((image_bytes + 2) // 3) + 1024


CONFIG_KEYS: Final = tuple(f.name for f in fields(DeploySettings))


def _read_config(config_file: Path) -> dict[str, Any]:
    """The settings of a TOML file (keys at the top level or under ``[serving]``; a relative
    ``model`` is relative to the file)."""
    try:
        raw = tomllib.loads(Path(config_file).read_text())
    except FileNotFoundError:
        raise InputNotFound("no such configuration file", path=config_file) from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"not a valid TOML file: {exc}", path=config_file) from None
    section = raw.get("serving", raw)
    if not isinstance(section, dict):
        raise UsageError("[serving] must be a table", path=config_file)
    unknown = set(section) - set(CONFIG_KEYS) - {"serving"}
    if unknown:
        raise UsageError(
            f"unknown settings {sorted(unknown)}; known: {', '.join(CONFIG_KEYS)}",
            path=config_file,
        )
    values = {k: v for k, v in section.items() if k != "serving"}
    if "model" in values:
        model = Path(str(values["model"])).expanduser()
        values["model"] = model if model.is_absolute() else Path(config_file).parent / model
    return values


def load_settings(config_file: Path | None, overrides: Mapping[str, Any]) -> DeploySettings:
    """Settings from `config_file` (TOML: keys at the top level or under ``[serving]``; a
    relative ``model`` is relative to the file), overridden by the non-None `overrides`."""
    values = _read_config(config_file) if config_file is not None else {}
    image = values.pop("image", None)
    if image is not None and not isinstance(image, dict):
        raise UsageError("image must be a table ([serving.image])", path=config_file)
    image = {
        **(image or {}),
        **{k: v for k, v in overrides.get("image", {}).items() if v is not None},
    }
    values.update({k: v for k, v in overrides.items() if v is not None and k != "image"})
    if image:
        unknown = set(image) - set(IMAGE_KEYS)
        if unknown:
            raise UsageError(
                f"unknown image settings {sorted(unknown)}; known: {', '.join(IMAGE_KEYS)}"
            )
        values["image"] = ImageSpec.from_dict(image)
    if values.get("model") is None:
        raise UsageError("no model: pass --model PATH (or `model` in the --config file)")
    if values.get("input_shape") is not None:
        try:
            values["input_shape"] = parse_shape(values["input_shape"])
        except UsageError:
            raise UsageError("input_shape is sizes, '*' for a dynamic one: [3, 224, 224]") from None
    try:
        return DeploySettings(**values)
    except TypeError as exc:
        raise UsageError(f"invalid settings: {exc}") from None


def with_overrides(settings: DeploySettings, **changes: Any) -> DeploySettings:
    return replace(settings, **changes)
