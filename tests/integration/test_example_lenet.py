"""examples/spark/lenet.py end to end: `ppml spark-submit --tee sim`, keys released by policy.

LeNet-5 on the digits (an encrypted table written and read back through PPMLContext), the model
written encrypted; on a small MNIST-format IDX set, some files encrypted, some plain, some
gzipped; bad inputs refused with one line and a non-zero exit code.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import re
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cli_support import PASSPHRASE, Result, run_ppml

pytest.importorskip("pyspark")
pytest.importorskip("sklearn")
pytest.importorskip("torch")

import numpy as np
import numpy.typing as npt
import torch
from tests.support import dev_workspace_with_keys

from ppml.crypto.stream import looks_encrypted
from ppml.data import encrypt_file
from ppml.data.parquet import is_encrypted_parquet
from ppml.workspace import Workspace

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "spark" / "lenet.py"
EPOCH_LINE = re.compile(r"^epoch (\d+): test accuracy (\d\.\d{3})\b", re.MULTILINE)
FINAL_LINE = re.compile(r"^final test accuracy (\d\.\d{3})\b", re.MULTILINE)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dev_workspace_with_keys(
        tmp_path_factory.mktemp("lenet") / "ws", PASSPHRASE, "lenet", "mnist"
    )


@pytest.fixture(scope="module")
def lenet() -> ModuleType:
    """The example as a module (its LeNet5, digits and accuracy helpers), not run."""
    spec = importlib.util.spec_from_file_location("lenet_example", APP)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def submit(home: Path, data: Path, *args: str | Path, allow: tuple[str, ...] = ()) -> Result:
    """`ppml spark-submit --tee sim --data DATA APP ARGS`, after letting the keys `allow` go to
    exactly this command line (the measurement covers the arguments); the attested driver
    reads and writes under DATA."""
    argv = [str(APP), *map(str, args)]
    if allow:
        measured = run_ppml("spark-submit", "--measure", *argv, home=home)
        assert measured.code == 0, measured.err
        measurement = measured.out.splitlines()[0]
        for key in allow:
            r = run_ppml(
                "policy", "allow", key, "--tee", "sim", "--measurement", measurement, home=home
            )
            assert r.code == 0, r.err
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPML_")}
    env.update(PPML_HOME=str(home), PPML_PASSPHRASE=PASSPHRASE)
    proc = subprocess.run(
        [sys.executable, "-m", "ppml", "spark-submit", "--tee", "sim", "--data", str(data), *argv],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=300,
        check=False,
        cwd=ROOT,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def epochs_and_final(out: str) -> tuple[list[int], list[float], float]:
    epochs = EPOCH_LINE.findall(out)
    final = FINAL_LINE.search(out)
    assert epochs and final, out
    return [int(e) for e, _ in epochs], [float(a) for _, a in epochs], float(final[1])


def idx_bytes(array: npt.NDArray[Any]) -> bytes:
    """An IDX file of unsigned bytes: magic 0x00 0x00 0x08 NDIM, big-endian sizes, the data."""
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + bytes(array.astype(np.uint8).tobytes())


def test_digits_trains_to_95_percent_and_writes_the_model_encrypted(
    home: Path, lenet: ModuleType, tmp_path: Path
) -> None:
    model_out = tmp_path / "lenet.pt.ppml"
    work = tmp_path / "work"
    r = submit(home, tmp_path, "--model-out", model_out, "--work-dir", work, allow=("lenet",))
    assert r.code == 0, r.err[-3000:]
    assert r.err.count("SIMULATED TEE") == 1
    assert "1438 training, 359 test images" in r.out
    epochs, accuracies, final = epochs_and_final(r.out)
    assert epochs == list(range(1, lenet.DIGITS_EPOCHS + 1))
    assert accuracies[-1] == final >= 0.95

    # The training data came from an encrypted table.
    parts = sorted((work / "digits").glob("*.parquet"))
    assert parts and all(is_encrypted_parquet(p) for p in parts)

    # The model is encrypted: torch cannot read it; `ppml decrypt` gives a state_dict.
    assert looks_encrypted(model_out)
    with pytest.raises((pickle.UnpicklingError, RuntimeError)):
        torch.load(model_out, weights_only=True)
    plain = tmp_path / "lenet.pt"
    d = run_ppml("decrypt", model_out, "-o", plain, home=home)
    assert d.code == 0, d.err
    model = lenet.LeNet5()
    model.load_state_dict(torch.load(plain, weights_only=True))
    images, labels, is_test = lenet.digits_arrays()
    accuracy = lenet.accuracy(model, images[is_test], labels[is_test])
    assert round(accuracy, 3) == final


def test_mnist_idx_files_encrypted_plain_and_gzipped(
    home: Path, lenet: ModuleType, tmp_path: Path
) -> None:
    # A small MNIST look-alike (the digits at 28x28), each file stored a different way.
    images, labels, is_test = lenet.digits_arrays()
    data = tmp_path / "mnist"
    data.mkdir()
    plain = tmp_path / "plain"
    plain.mkdir()
    with Workspace.open(home, PASSPHRASE.encode()).key_service() as keys:
        # train images: gzipped, then encrypted (the name says only .gz)
        (plain / "ti.gz").write_bytes(gzip.compress(idx_bytes(images[~is_test])))
        encrypt_file(plain / "ti.gz", data / "train-images-idx3-ubyte.gz", keys, "mnist")
        # test images: encrypted, not gzipped
        (plain / "t10k").write_bytes(idx_bytes(images[is_test]))
        encrypt_file(plain / "t10k", data / "t10k-images-idx3-ubyte.ppml", keys, "mnist")
    # labels: plain, one gzipped
    (data / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels[~is_test])))
    (data / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels[is_test]))

    r = submit(home, tmp_path, "--data", data, "--epochs", "3", allow=("mnist",))
    assert r.code == 0, r.err[-3000:]
    assert "LeNet-5 on MNIST" in r.out and "1438 training, 359 test images" in r.out
    epochs, _, final = epochs_and_final(r.out)
    assert epochs == [1, 2, 3]
    assert final >= 0.8


def test_bad_inputs_fail_with_one_clear_line(home: Path, tmp_path: Path) -> None:
    data = tmp_path / "bad"
    data.mkdir()
    (data / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((4, 28, 28))))

    r = submit(home, tmp_path, "--data", data)
    assert r.code == 2, r.err[-3000:]
    assert "no MNIST file train-labels-idx1-ubyte" in r.err

    labels = data / "train-labels-idx1-ubyte"
    labels.write_bytes(b"\x00\x00\x08\x03" + bytes(8))  # an images header on the labels
    r = submit(home, tmp_path, "--data", data)
    assert r.code == 2, r.err[-3000:]
    line = next(x for x in r.err.splitlines() if "bad IDX magic" in x)
    assert str(labels) in line and "expected 00000801" in line
    assert "Traceback" not in r.err

    r = submit(home, tmp_path, "--data", tmp_path / "nowhere")
    assert r.code == 2 and "no such directory" in r.err
