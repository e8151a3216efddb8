"""Load an encrypted model into memory and run it: ONNX Runtime or TorchScript, CPU only.

The model file is a ppml stream (`ppml encrypt model.onnx -o model.onnx.ppml --key models`).
It is decrypted into memory with keys from a `DataKeyProvider` (under `ppml run` the key broker
releases them after attestation) and handed to the runtime as bytes: plaintext model bytes
never touch the disk. `Model.validate` checks one client instance against the model's input
signature and is the place where bad client input becomes a `UsageError` (HTTP 400).
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ppml.crypto.envelope import DataKeyProvider
from ppml.crypto.stream import decrypt_stream
from ppml.data.files import annotate_errors
from ppml.errors import ConfigurationError, InputNotFound, NotEncrypted, UsageError
from ppml.serving.contract import format_shape

__all__ = [
    "RUNTIMES",
    "InputSignature",
    "Model",
    "Runtime",
    "default_model_name",
    "load_model",
    "load_model_bytes",
    "validate_instance",
]

_log = logging.getLogger(__name__)

Runtime = Literal["onnx", "torchscript"]
RUNTIMES: tuple[Runtime, ...] = ("onnx", "torchscript")

# ONNX Runtime's tensor type names -> numpy dtypes (the numeric ones serving accepts).
_ORT_TYPES: dict[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(bool)": np.dtype(np.bool_),
}
_MAX_THREADS = 256


@dataclass(frozen=True, slots=True)
class InputSignature:
    """The model's one input: `shape` includes the batch dimension; None marks a dynamic dim."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype[Any]

    @property
    def instance_shape(self) -> tuple[int | None, ...]:
        """The shape of one instance (without the batch dimension)."""
        return self.shape[1:]


class Model:
    """A loaded model: its signature, `validate` for one instance, `predict` for a batch.

    `predict` returns the output named `output_name` (the model's first output by default).
    Thread-safe for `predict` as far as the runtime is (ONNX Runtime sessions are).
    """

    def __init__(
        self,
        name: str,
        runtime: Runtime,
        signature: InputSignature,
        output_names: Sequence[str],
        run: Callable[[np.ndarray], np.ndarray],
        *,
        output_name: str | None = None,
        max_batch_size: int | None = None,
    ) -> None:
        self._name = name
        self._runtime: Runtime = runtime
        self._signature = signature
        self._output_names = tuple(output_names)
        self._output_name = output_name if output_name is not None else self._output_names[0]
        self._run = run
        self._max_batch_size = max_batch_size

    def __repr__(self) -> str:
        return (
            f"Model({self._name!r}, runtime={self._runtime}, input={self._signature.name}"
            f"{list(self._signature.shape)}:{self._signature.dtype})"
        )

    @property
    def name(self) -> str:
        return self._name

    @property
    def runtime(self) -> Runtime:
        return self._runtime

    @property
    def signature(self) -> InputSignature:
        return self._signature

    @property
    def input_name(self) -> str:
        return self._signature.name

    @property
    def input_shape(self) -> tuple[int | None, ...]:
        """The input shape with the batch dimension first (None: dynamic)."""
        return self._signature.shape

    @property
    def input_dtype(self) -> np.dtype[Any]:
        return self._signature.dtype

    @property
    def output_names(self) -> tuple[str, ...]:
        return self._output_names

    @property
    def output_name(self) -> str:
        """The output `predict` returns."""
        return self._output_name

    @property
    def max_batch_size(self) -> int | None:
        """None when the batch dimension is dynamic; 1 for a model exported with batch size 1
        (`predict` then runs the instances one by one)."""
        return self._max_batch_size

    def validate(self, array: Any) -> np.ndarray:
        """Check one instance (no batch dimension) against the input signature.

        Returns it as a contiguous array of the model's dtype. Safe conversions are allowed
        (JSON numbers arrive as float64 or int64 and become float32, say); a wrong rank, a
        wrong static dimension, a non-numeric input, a float for an integer input or a value
        out of the input type's range is a `UsageError` whose message a client may read (it
        names shapes and types, never values).
        """
        return validate_instance(self._signature, array)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Run the model on a batch (first dimension = instances); returns `output_name`."""
        if batch.ndim != len(self._signature.shape):
            raise UsageError(
                f"a batch must have rank {len(self._signature.shape)}, got rank {batch.ndim}"
            )
        batch = np.ascontiguousarray(batch, dtype=self._signature.dtype)
        if self._max_batch_size is not None and batch.shape[0] > self._max_batch_size:
            step = self._max_batch_size
            parts = [self._run(batch[i : i + step]) for i in range(0, batch.shape[0], step)]
            return np.concatenate(parts, axis=0)
        return self._run(batch)


def validate_instance(signature: InputSignature, array: Any) -> np.ndarray:
    """`Model.validate` for any signature (see there)."""
    try:
        value = np.asarray(array)
    except (ValueError, TypeError):
        raise UsageError("input must be a (rectangular) array of numbers") from None
    if value.dtype.kind not in "biuf":
        raise UsageError(f"input must be numeric, got {_kind_name(value.dtype)}")
    expected = signature.instance_shape
    if value.ndim != len(expected):
        raise UsageError(
            f"input {signature.name!r} must have shape {_shape_text(expected)} "
            f"(rank {len(expected)}), got shape {_shape_text(value.shape)}"
        )
    for got, want in zip(value.shape, expected, strict=True):
        if want is not None and got != want:
            raise UsageError(
                f"input {signature.name!r} must have shape {_shape_text(expected)}, "
                f"got shape {_shape_text(value.shape)}"
            )
    target = signature.dtype
    if value.dtype == target:
        return np.ascontiguousarray(value)
    if not np.can_cast(value.dtype, target, casting="same_kind"):
        raise UsageError(
            f"input {signature.name!r} must be {_kind_name(target)} ({target.name}), "
            f"got {_kind_name(value.dtype)}"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        cast = np.ascontiguousarray(value, dtype=target)
    if target.kind == "f":
        lost = bool(np.any(np.isfinite(value) & ~np.isfinite(cast)))
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            lost = not np.array_equal(cast.astype(value.dtype), value)
    if lost:
        raise UsageError(f"input {signature.name!r} has values out of range for {target.name}")
    return cast


def _kind_name(dtype: np.dtype[Any]) -> str:
    return {
        "b": "booleans",
        "i": "integers",
        "u": "integers",
        "f": "floating-point numbers",
        "c": "complex numbers",
        "U": "text",
        "S": "bytes",
        "O": "non-numeric values",
    }.get(dtype.kind, f"values of type {dtype.kind!r}")


def _shape_text(shape: Sequence[int | None]) -> str:
    return "[" + format_shape(shape, ", ") + "]"


def default_model_name(path: Path) -> str:
    """`models/resnet.onnx.ppml` -> `resnet`."""
    name = path.name
    if name.endswith(".ppml"):
        name = name[: -len(".ppml")]
    return Path(name).stem or name


def load_model(
    path: str | Path,
    provider: DataKeyProvider,
    *,
    runtime: Runtime = "onnx",
    name: str | None = None,
    intra_op_threads: int = 1,
    output_name: str | None = None,
    input_shape: Sequence[int | None] | None = None,
    input_dtype: str | np.dtype[Any] = "float32",
    insecure_allow_plaintext: bool = False,
) -> Model:
    """Decrypt the ppml-encrypted model at `path` in memory and load it.

    A file that is not ppml-encrypted is refused (`NotEncrypted`) unless
    `insecure_allow_plaintext` (development only: it logs a warning every time). A tampered
    or truncated file is an `IntegrityError`; a key the provider will not give is a
    `KeyAccessError`. ONNX models carry their input signature; a TorchScript file does not,
    so `input_shape` (per instance, without the batch dimension; None for a dynamic dim) and
    `input_dtype` describe it (without `input_shape` only the dtype is checked).
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFound("no such model file", path=path)
    with annotate_errors(path):
        data = _read_model_bytes(path, provider, insecure_allow_plaintext)
        return load_model_bytes(
            data,
            runtime=runtime,
            name=name if name is not None else default_model_name(path),
            intra_op_threads=intra_op_threads,
            output_name=output_name,
            input_shape=input_shape,
            input_dtype=input_dtype,
        )


def _read_model_bytes(path: Path, provider: DataKeyProvider, allow_plaintext: bool) -> bytes:
    with open(path, "rb") as fh:
        try:
            buf = io.BytesIO()
            decrypt_stream(fh, buf, provider)
            return buf.getvalue()
        except NotEncrypted:
            if not allow_plaintext:
                raise NotEncrypted(
                    "the model file is not ppml-encrypted: encrypt it with "
                    "`ppml encrypt MODEL -o MODEL.ppml --key KEY` (plaintext models are "
                    "refused outside development)",
                    path=path,
                ) from None
        _log.warning(
            "INSECURE: loading the plaintext model %s (insecure_allow_plaintext); "
            "its weights are not protected",
            path,
        )
        fh.seek(0)
        return fh.read()


def load_model_bytes(
    data: bytes,
    *,
    runtime: Runtime = "onnx",
    name: str = "model",
    intra_op_threads: int = 1,
    output_name: str | None = None,
    input_shape: Sequence[int | None] | None = None,
    input_dtype: str | np.dtype[Any] = "float32",
) -> Model:
    """Load a model from plaintext bytes already in memory (see `load_model`)."""
    if not 1 <= intra_op_threads <= _MAX_THREADS:
        raise UsageError(f"intra-op threads must be between 1 and {_MAX_THREADS}")
    if runtime == "onnx":
        return _load_onnx(data, name, intra_op_threads, output_name)
    if runtime == "torchscript":
        return _load_torchscript(
            data, name, intra_op_threads, output_name, input_shape, np.dtype(input_dtype)
        )
    raise UsageError(f"unknown model runtime {runtime!r} (expected one of: {', '.join(RUNTIMES)})")


def _load_onnx(data: bytes, name: str, threads: int, output_name: str | None) -> Model:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigurationError("ONNX models need onnxruntime: install ppml[serving]") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: ORT's warnings may describe the graph
    # optimized_model_filepath stays unset: ORT must never write the (plaintext) model out.
    try:
        session = ort.InferenceSession(
            data, sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # ORT raises its own pybind exception types
        _log.info("ONNX Runtime refused the model: %s", type(exc).__name__)
        raise UsageError("not a valid ONNX model (or one ONNX Runtime cannot run)") from None
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise UsageError(
            f"serving needs a model with exactly one input, this one has {len(inputs)}"
        )
    meta = inputs[0]
    dtype = _ORT_TYPES.get(meta.type)
    if dtype is None:
        raise UsageError(f"unsupported input type {meta.type} (serving takes numeric tensors)")
    shape: tuple[int | None, ...] = tuple(
        d if isinstance(d, int) and d >= 0 else None for d in meta.shape
    )
    if not shape:
        raise UsageError("the model's input is a scalar: serving needs a batch dimension")
    max_batch: int | None = None
    if shape[0] is not None:
        if shape[0] != 1:
            raise UsageError(
                f"the model's batch dimension is fixed at {shape[0]}: export it with a dynamic "
                "batch dimension (or batch size 1)"
            )
        max_batch = 1
        shape = (None, *shape[1:])
    outputs = [o.name for o in session.get_outputs()]
    if output_name is not None and output_name not in outputs:
        raise UsageError(f"the model has no output named {output_name!r}")
    chosen = output_name if output_name is not None else outputs[0]
    input_name = meta.name

    def run(batch: np.ndarray) -> np.ndarray:
        (result,) = session.run([chosen], {input_name: batch})
        return np.asarray(result)

    signature = InputSignature(input_name, shape, dtype)
    return Model(
        name, "onnx", signature, outputs, run, output_name=chosen, max_batch_size=max_batch
    )


def _load_torchscript(
    data: bytes,
    name: str,
    threads: int,
    output_name: str | None,
    input_shape: Sequence[int | None] | None,
    dtype: np.dtype[Any],
) -> Model:
    try:
        import torch
    except ImportError:
        raise ConfigurationError("TorchScript models need torch: install ppml[dl]") from None
    if dtype.kind not in "biuf":
        raise UsageError(f"unsupported input dtype {dtype.name} (serving takes numeric tensors)")
    # A process-wide setting: a worker process serves one model.
    torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings():
            # torch.jit.* is deprecated in favour of torch.export; TorchScript files still load.
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit")
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")  # type: ignore[no-untyped-call]
    except Exception as exc:
        _log.info("torch refused the model: %s", type(exc).__name__)
        raise UsageError("not a valid TorchScript model") from None
    module.eval()
    if input_shape is None:
        shape: tuple[int | None, ...] = (None,)
        free_rank = True
    else:
        shape = (None, *(None if d is None else int(d) for d in input_shape))
        free_rank = False
    outputs = (output_name or "output",)

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            result = module(torch.from_numpy(batch))
        if isinstance(result, (tuple, list)):
            result = result[0]
        return np.asarray(result.detach().cpu().numpy())

    signature = InputSignature("input", shape, dtype)
    if free_rank:
        return _FreeRankModel(name, "torchscript", signature, outputs, run)
    return Model(name, "torchscript", signature, outputs, run)


class _FreeRankModel(Model):
    """A TorchScript model whose input shape is unknown: only the dtype is checked."""

    def validate(self, array: Any) -> np.ndarray:
        try:
            value = np.asarray(array)
        except (ValueError, TypeError):
            raise UsageError("input must be a (rectangular) array of numbers") from None
        free = InputSignature(self.input_name, (None,) * (value.ndim + 1), self.input_dtype)
        return validate_instance(free, value)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self._run(np.ascontiguousarray(batch, dtype=self.input_dtype))
