"""Small deterministic models for the serving tests, with numpy references to compare against.

`mlp_onnx_bytes()` is an ONNX graph built with onnx.helper: input "x" float32 [N, 16],
Gemm(16->32) + Relu, Gemm(32->4) + Relu, output "y" float32 [N, 4]; the weights come from a
seed, and `mlp_reference(x)` computes the same function in numpy. `torchscript_mlp_bytes()` is
the same MLP as a TorchScript file. `write_encrypted` puts model bytes into a ppml stream file
without a plaintext copy on disk.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ppml.crypto.envelope import DataKeyProvider
from ppml.data.files import create_encrypted

INPUT_DIM = 16
HIDDEN_DIM = 32
OUTPUT_DIM = 4
INPUT_NAME = "x"
OUTPUT_NAME = "y"


@dataclass(frozen=True)
class MLPWeights:
    w1: np.ndarray  # [16, 32]
    b1: np.ndarray  # [32]
    w2: np.ndarray  # [32, 4]
    b2: np.ndarray  # [4]


def mlp_weights(seed: int = 0) -> MLPWeights:
    rng = np.random.default_rng(seed)
    f32 = np.float32
    return MLPWeights(
        w1=rng.normal(0.0, 0.5, (INPUT_DIM, HIDDEN_DIM)).astype(f32),
        b1=rng.normal(0.0, 0.1, HIDDEN_DIM).astype(f32),
        w2=rng.normal(0.0, 0.5, (HIDDEN_DIM, OUTPUT_DIM)).astype(f32),
        # A positive offset keeps most outputs above zero, so that Relu hides little.
        b2=(rng.normal(0.0, 0.1, OUTPUT_DIM) + 2.0).astype(f32),
    )


def mlp_reference(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """The MLP in numpy: relu(relu(x @ w1 + b1) @ w2 + b2), float32."""
    w = mlp_weights(seed)
    h = np.maximum(np.asarray(x, dtype=np.float32) @ w.w1 + w.b1, 0.0)
    return np.asarray(np.maximum(h @ w.w2 + w.b2, 0.0), dtype=np.float32)


def mlp_onnx_bytes(seed: int = 0, *, batch: int | str = "N", opset: int = 17) -> bytes:
    """The MLP as a serialized ONNX model; `batch` is the batch dim (a name: dynamic)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = mlp_weights(seed)
    inits = [
        numpy_helper.from_array(w.w1, "w1"),
        numpy_helper.from_array(w.b1, "b1"),
        numpy_helper.from_array(w.w2, "w2"),
        numpy_helper.from_array(w.b2, "b2"),
    ]
    nodes = [
        helper.make_node("Gemm", [INPUT_NAME, "w1", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("Gemm", ["a1", "w2", "b2"], ["h2"]),
        helper.make_node("Relu", ["h2"], [OUTPUT_NAME]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [batch, INPUT_DIM])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [batch, OUTPUT_DIM])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="ppml-tests"
    )
    model.ir_version = 8  # readable by every onnxruntime the project supports
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def two_input_onnx_bytes() -> bytes:
    """A model with two inputs (serving refuses it)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"])],
        "add",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 2]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 2]),
        ],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def torchscript_mlp_bytes(seed: int = 0) -> bytes:
    """The same MLP as a TorchScript file (traced on the CPU)."""
    import torch

    w = mlp_weights(seed)

    class MLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(INPUT_DIM, HIDDEN_DIM)
            self.fc2 = torch.nn.Linear(HIDDEN_DIM, OUTPUT_DIM)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.fc2(torch.relu(self.fc1(x))))

    module = MLP().eval()
    with torch.no_grad():
        module.fc1.weight.copy_(torch.from_numpy(w.w1.T.copy()))
        module.fc1.bias.copy_(torch.from_numpy(w.b1))
        module.fc2.weight.copy_(torch.from_numpy(w.w2.T.copy()))
        module.fc2.bias.copy_(torch.from_numpy(w.b2))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit")
        traced = torch.jit.trace(module, torch.zeros(1, INPUT_DIM))  # type: ignore[no-untyped-call]
        torch.jit.save(traced, buf)
    return buf.getvalue()


def write_encrypted(data: bytes, path: Path, provider: DataKeyProvider, key_name: str) -> Path:
    """Write `data` to `path` in the ppml stream format (as `ppml encrypt` would)."""
    with create_encrypted(path, provider, key_name) as out:
        out.write(data)
    return path
