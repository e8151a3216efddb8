"""Loading encrypted models (through a real workspace KMS), predicting, validating instances."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from tests.support import MemoryKeyProvider, dev_workspace_with_keys
from tests.support.serving_models import (
    INPUT_DIM,
    OUTPUT_DIM,
    mlp_onnx_bytes,
    mlp_reference,
    torchscript_mlp_bytes,
    two_input_onnx_bytes,
    write_encrypted,
)

from ppml.errors import (
    AccessDenied,
    InputNotFound,
    IntegrityError,
    KeyAccessError,
    NotEncrypted,
    UsageError,
)
from ppml.kms import KeyService
from ppml.serving.model import Model, load_model, load_model_bytes
from ppml.workspace import Workspace

PASSPHRASE = "serving-test-passphrase"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyService]:
    home = dev_workspace_with_keys(tmp_path_factory.mktemp("ws") / "ws", PASSPHRASE, "models")
    with Workspace.open(home, PASSPHRASE.encode()).key_service() as service:
        yield service


@pytest.fixture
def encrypted_mlp(tmp_path: Path, keys: KeyService) -> Path:
    return write_encrypted(mlp_onnx_bytes(), tmp_path / "mlp.onnx.ppml", keys, "models")


def _inputs(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, INPUT_DIM)).astype(np.float32)


# -- loading ----------------------------------------------------------------------------------


def test_encrypted_onnx_model_predicts_like_the_reference(
    encrypted_mlp: Path, keys: KeyService
) -> None:
    model = load_model(encrypted_mlp, keys)
    x = _inputs(7)
    np.testing.assert_allclose(model.predict(x), mlp_reference(x), rtol=1e-5, atol=1e-5)
    assert model.name == "mlp"
    assert model.runtime == "onnx"
    assert model.input_name == "x"
    assert model.input_shape == (None, INPUT_DIM)
    assert model.input_dtype == np.float32
    assert model.output_names == ("y",)
    assert model.max_batch_size is None


def test_load_writes_no_plaintext_beside_the_model(encrypted_mlp: Path, keys: KeyService) -> None:
    before = sorted(p.name for p in encrypted_mlp.parent.iterdir())
    load_model(encrypted_mlp, keys, name="m", intra_op_threads=2)
    assert sorted(p.name for p in encrypted_mlp.parent.iterdir()) == before


def test_tampered_model_is_an_integrity_error(encrypted_mlp: Path, keys: KeyService) -> None:
    data = bytearray(encrypted_mlp.read_bytes())
    data[-40] ^= 0x01
    encrypted_mlp.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as info:
        load_model(encrypted_mlp, keys)
    assert info.value.message == "integrity check failed"
    assert info.value.path == str(encrypted_mlp)


def test_truncated_model_is_an_integrity_error(encrypted_mlp: Path, keys: KeyService) -> None:
    encrypted_mlp.write_bytes(encrypted_mlp.read_bytes()[:-1])
    with pytest.raises(IntegrityError):
        load_model(encrypted_mlp, keys)


def test_model_under_another_workspace_key_is_a_key_access_error(
    tmp_path: Path, encrypted_mlp: Path
) -> None:
    other = dev_workspace_with_keys(tmp_path / "other", PASSPHRASE, "sales")
    with (
        Workspace.open(other, PASSPHRASE.encode()).key_service() as service,
        pytest.raises(KeyAccessError),
    ):
        load_model(encrypted_mlp, service)


def test_refused_key_release_is_a_key_access_error(encrypted_mlp: Path) -> None:
    refusing = MemoryKeyProvider(refused=["models"])  # as a broker refuses an unattested run
    with pytest.raises(AccessDenied):
        load_model(encrypted_mlp, refusing)


def test_plaintext_model_is_refused(tmp_path: Path, keys: KeyService) -> None:
    plain = tmp_path / "mlp.onnx"
    plain.write_bytes(mlp_onnx_bytes())
    with pytest.raises(NotEncrypted, match="not ppml-encrypted") as info:
        load_model(plain, keys)
    assert "ppml encrypt" in str(info.value)


def test_plaintext_model_only_with_the_insecure_flag_and_a_warning(
    tmp_path: Path, keys: KeyService, caplog: pytest.LogCaptureFixture
) -> None:
    plain = tmp_path / "mlp.onnx"
    plain.write_bytes(mlp_onnx_bytes())
    with caplog.at_level(logging.WARNING, logger="ppml.serving.model"):
        model = load_model(plain, keys, insecure_allow_plaintext=True)
    assert any("INSECURE" in r.getMessage() for r in caplog.records)
    x = _inputs(3)
    np.testing.assert_allclose(model.predict(x), mlp_reference(x), rtol=1e-5, atol=1e-5)


def test_missing_model_file(tmp_path: Path, keys: KeyService) -> None:
    with pytest.raises(InputNotFound):
        load_model(tmp_path / "absent.onnx.ppml", keys)


def test_encrypted_garbage_is_not_a_valid_model(tmp_path: Path, keys: KeyService) -> None:
    path = write_encrypted(b"definitely not onnx", tmp_path / "junk.ppml", keys, "models")
    with pytest.raises(UsageError, match="not a valid ONNX model"):
        load_model(path, keys)


def test_unknown_runtime_and_bad_thread_count() -> None:
    with pytest.raises(UsageError, match="unknown model runtime"):
        load_model_bytes(mlp_onnx_bytes(), runtime="tensorflow")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="intra-op threads"):
        load_model_bytes(mlp_onnx_bytes(), intra_op_threads=0)


def test_two_input_models_are_refused() -> None:
    with pytest.raises(UsageError, match="exactly one input"):
        load_model_bytes(two_input_onnx_bytes())


def test_fixed_batch_of_one_runs_instance_by_instance() -> None:
    model = load_model_bytes(mlp_onnx_bytes(batch=1))
    assert model.max_batch_size == 1
    assert model.input_shape == (None, INPUT_DIM)
    x = _inputs(5)
    np.testing.assert_allclose(model.predict(x), mlp_reference(x), rtol=1e-5, atol=1e-5)


def test_fixed_batch_larger_than_one_is_refused() -> None:
    with pytest.raises(UsageError, match="dynamic batch dimension"):
        load_model_bytes(mlp_onnx_bytes(batch=8))


def test_unknown_output_name_is_refused() -> None:
    with pytest.raises(UsageError, match="no output named"):
        load_model_bytes(mlp_onnx_bytes(), output_name="z")


# -- TorchScript --------------------------------------------------------------------------------


def test_encrypted_torchscript_model_predicts_like_the_reference(
    tmp_path: Path, keys: KeyService
) -> None:
    pytest.importorskip("torch")
    path = write_encrypted(torchscript_mlp_bytes(), tmp_path / "mlp.pt.ppml", keys, "models")
    model = load_model(path, keys, runtime="torchscript", input_shape=[INPUT_DIM])
    x = _inputs(6)
    out = model.predict(model.validate(x[0])[None, :])
    np.testing.assert_allclose(out, mlp_reference(x[:1]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.predict(x), mlp_reference(x), rtol=1e-5, atol=1e-5)
    assert model.input_shape == (None, INPUT_DIM)
    with pytest.raises(UsageError, match="must have shape"):
        model.validate(np.zeros(3))


def test_torchscript_without_a_shape_checks_only_the_dtype() -> None:
    pytest.importorskip("torch")
    model = load_model_bytes(torchscript_mlp_bytes(), runtime="torchscript")
    assert model.validate(np.zeros(INPUT_DIM, dtype=np.float64)).dtype == np.float32
    with pytest.raises(UsageError, match="numeric"):
        model.validate(np.array(["a"] * INPUT_DIM))
    x = _inputs(2)
    np.testing.assert_allclose(model.predict(x), mlp_reference(x), rtol=1e-5, atol=1e-5)


def test_invalid_torchscript_bytes() -> None:
    pytest.importorskip("torch")
    with pytest.raises(UsageError, match="not a valid TorchScript model"):
        load_model_bytes(b"not a zip file", runtime="torchscript")


# -- validation ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp() -> Model:
    return load_model_bytes(mlp_onnx_bytes(), name="mlp")


def test_validate_accepts_float64_and_ints_as_float32(mlp: Model) -> None:
    out = mlp.validate(np.arange(INPUT_DIM, dtype=np.float64))
    assert out.dtype == np.float32 and out.shape == (INPUT_DIM,)
    assert mlp.validate(list(range(INPUT_DIM))).dtype == np.float32
    assert mlp.validate(np.ones(INPUT_DIM, dtype=np.float32)).flags["C_CONTIGUOUS"]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (np.zeros((1, INPUT_DIM)), r"must have shape \[16\] \(rank 1\), got shape \[1, 16\]"),
        (np.zeros(INPUT_DIM + 1), r"must have shape \[16\], got shape \[17\]"),
        (np.float64(1.0), r"rank 1"),
        (np.array(["x"] * INPUT_DIM), "must be numeric, got text"),
        (np.array([None] * INPUT_DIM), "must be numeric, got non-numeric values"),
        (np.zeros(INPUT_DIM, dtype=complex), "must be numeric, got complex numbers"),
        (np.full(INPUT_DIM, 1e300), "out of range for float32"),
        ([[1.0, 2.0], [3.0]], "rectangular"),
    ],
)
def test_validate_refuses_with_a_readable_reason(mlp: Model, value: object, reason: str) -> None:
    with pytest.raises(UsageError, match=reason):
        mlp.validate(value)


def test_validation_messages_never_contain_values(mlp: Model) -> None:
    secret = np.full(INPUT_DIM + 1, 123456.789)
    with pytest.raises(UsageError) as info:
        mlp.validate(secret)
    assert "123456" not in str(info.value)


def test_validate_integer_inputs_refuse_floats_and_overflow() -> None:
    from ppml.serving.model import InputSignature, validate_instance

    sig = InputSignature("ids", (None, 3), np.dtype(np.int32))
    assert validate_instance(sig, np.array([1, 2, 3], dtype=np.int64)).dtype == np.int32
    with pytest.raises(UsageError, match="must be integers"):
        validate_instance(sig, np.array([1.0, 2.0, 3.0]))
    with pytest.raises(UsageError, match="out of range for int32"):
        validate_instance(sig, np.array([1, 2, 2**40]))


def test_predict_checks_the_batch_rank(mlp: Model) -> None:
    with pytest.raises(UsageError, match="rank 2"):
        mlp.predict(np.zeros(INPUT_DIM, dtype=np.float32))
    assert mlp.predict(np.zeros((0, INPUT_DIM), dtype=np.float32)).shape == (0, OUTPUT_DIM)
