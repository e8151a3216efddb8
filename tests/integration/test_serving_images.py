"""Image inputs end to end: examples/serving/digits_cnn.py trains and exports the CNN and writes
digit PNGs, `ppml serving up --image-*` serves the encrypted model (real redis-server, real TLS,
worker processes), clients send PNG files, and the predictions equal local ONNX Runtime on the
same preprocessing; malformed, oversized and bomb images are refused with a reason."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cli_support import PASSPHRASE, client_cert, run_ppml
from redis_support import require_redis_server

from ppml.serving import InputQueue, OutputQueue
from ppml.serving.client import InvalidInput, PredictionFailed
from ppml.serving.image import ImageSpec

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("PIL")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "serving"
IMAGE_FLAGS = ("--image-mode", "L", "--image-resize", "8,8", "--image-mean", "0.5")
IMAGE_FLAGS += ("--image-std", "0.5")


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPML_")}
    env.update(PPML_HOME=str(home), PPML_PASSPHRASE=PASSPHRASE)
    return env


@dataclass(frozen=True)
class Deployment:
    home: Path
    digits: Path  # the example's output: cnn.onnx, cnn.onnx.ppml, digit-NN-L.png
    url: str

    def inputs(self) -> InputQueue:
        return InputQueue(self.url, ca=self.home / "tls" / "ca.pem", cert=client_cert(self.home))

    def outputs(self) -> OutputQueue:
        return OutputQueue(self.url, ca=self.home / "tls" / "ca.pem", cert=client_cert(self.home))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    require_redis_server()
    root = tmp_path_factory.mktemp("serving-images")
    home = root / "ws"
    assert run_ppml("init", "--dev", "--workspace", home).code == 0
    assert run_ppml("key", "create", "models", home=home).code == 0
    digits = root / "digits"
    # As the README shows it, with every warning an error: nothing may reach the terminal.
    trained = subprocess.run(
        [sys.executable, "-W", "error", EXAMPLES / "digits_cnn.py", "--out", digits],
        capture_output=True,
        text=True,
        env=_env(home),
        cwd=root,
        timeout=240,
        check=False,
    )
    assert trained.returncode == 0 and trained.stderr == "", trained.stderr
    assert "test accuracy 0.9" in trained.stdout
    r = run_ppml(
        "encrypt", digits / "cnn.onnx", "-o", digits / "cnn.onnx.ppml", "--key", "models", home=home
    )
    assert r.code == 0, r.err
    up = run_ppml(
        "serving", "up", "--model", digits / "cnn.onnx.ppml", "--workers", "2", "--port", "0",
        "--detach", *IMAGE_FLAGS, home=home,
    )  # fmt: skip
    assert up.code == 0, up.err
    assert "Traceback" not in up.err and "Warning" not in up.err
    try:
        yield Deployment(home, digits, up.out.strip().splitlines()[-1])
    finally:
        run_ppml("serving", "down", home=home, passphrase=None)


def _local(deployment: Deployment, images: list[bytes]) -> np.ndarray:
    """The plaintext model on ONNX Runtime, on the preprocessing the front end publishes."""
    import onnxruntime as ort

    with deployment.inputs() as q:
        (model,) = q.models()
    spec = ImageSpec.from_dict(model["image"])
    assert spec == ImageSpec("L", resize=(8, 8), mean=(0.5,), std=(0.5,))
    session = ort.InferenceSession(
        str(deployment.digits / "cnn.onnx"), providers=["CPUExecutionProvider"]
    )
    batch = np.stack([spec.preprocess(data) for data in images])
    return np.asarray(session.run(None, {"image": batch})[0])


def _pngs(deployment: Deployment) -> list[Path]:
    files = sorted(deployment.digits.glob("digit-*.png"))
    assert len(files) == 6
    return files


def _wait_all(out: OutputQueue, ids: list[str]) -> dict[str, object]:
    results: dict[str, object] = {}
    deadline = time.monotonic() + 30
    while len(results) < len(ids):
        assert time.monotonic() < deadline, f"missing {set(ids) - set(results)}"
        results.update(out.dequeue())
        time.sleep(0.02)  # polling the service as a client does
    return results


def test_served_predictions_equal_local_onnxruntime(deployment: Deployment) -> None:
    files = _pngs(deployment)
    want = _local(deployment, [f.read_bytes() for f in files])
    labels = [int(f.stem.rsplit("-", 1)[1]) for f in files]
    assert np.mean(np.argmax(want, axis=1) == labels) >= 0.8
    with deployment.inputs() as q:
        ids = [q.enqueue("bigdl-0", user_define_key={"path": str(files[0])})]
        ids += [q.enqueue(f"img-{n}", image=f) for n, f in enumerate(files[1:], 1)]
        synchronous = q.predict(image=files[2].read_bytes(), timeout=20)
        several = q.predict_batch([files[3], files[4].read_bytes()], timeout=20)
        numeric = q.predict(np.zeros((1, 8, 8), np.float32), timeout=20)  # still accepted
    np.testing.assert_allclose(synchronous, want[2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.stack(several), want[3:5], rtol=1e-5, atol=1e-5)
    assert numeric.shape == (10,)
    with deployment.outputs() as out:
        results = _wait_all(out, ids)
    for n, request_id in enumerate(ids):
        np.testing.assert_allclose(results[request_id], want[n], rtol=1e-5, atol=1e-5)


def _bomb(width: int, height: int) -> bytes:
    """A valid grey PNG of width x height zeros: a few kilobytes that decode to many pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    rows = zlib.compressobj(9)
    body = b"".join(rows.compress(bytes(width + 1)) for _ in range(height)) + rows.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def test_bad_images_are_refused_with_a_reason_and_the_workers_keep_serving(
    deployment: Deployment,
) -> None:
    png = _pngs(deployment)[0].read_bytes()
    truncated, bomb = png[: len(png) // 2], _bomb(5000, 5000)
    assert len(bomb) < 512 * 1024
    with deployment.inputs() as q:
        with pytest.raises(InvalidInput, match="not an image file of a supported format") as e:
            q.predict(image=b"%PDF-1.7 not an image")
        assert e.value.status == 400
        with pytest.raises(InvalidInput, match="over 524288 bytes") as e:
            q.predict(image=b"\x89PNG\r\n\x1a\n" + bytes(600_000))
        assert e.value.status == 413
        # decoded by a worker (inside the TEE when attested): a per-request error result
        with pytest.raises(InvalidInput, match="could not be decoded as PNG: damaged or trunc"):
            q.predict(image=truncated, timeout=20)
        with pytest.raises(InvalidInput, match="5000x5000 pixels, over the limit"):
            q.predict(image=bomb, timeout=20)
        q.enqueue("truncated", image=truncated)
        q.enqueue("fine", image=png)
    with deployment.outputs() as out:
        results = _wait_all(out, ["truncated", "fine"])
    assert isinstance(results["truncated"], PredictionFailed)
    assert "damaged or truncated" in results["truncated"].reason
    np.testing.assert_allclose(results["fine"], _local(deployment, [png])[0], atol=1e-5)


def test_the_example_client_checks_against_local_onnxruntime(deployment: Deployment) -> None:
    r = subprocess.run(
        [sys.executable, "-W", "error", EXAMPLES / "digits_client.py", deployment.url,
         deployment.digits],
        capture_output=True, text=True, env=_env(deployment.home), timeout=120, check=False,
    )  # fmt: skip
    assert r.returncode == 0 and r.stderr == "", r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 6 and all("same logits as local onnxruntime" in x for x in lines)


def test_image_settings_are_checked_at_up_and_measured(deployment: Deployment) -> None:
    home, model = deployment.home, deployment.digits / "cnn.onnx.ppml"

    def measure(*flags: str) -> tuple[int, str, str]:
        r = run_ppml("serving", "up", "--model", model, "--measure", *flags, home=home)
        return r.code, r.out, r.err

    code, out, _ = measure(*IMAGE_FLAGS)
    assert code == 0
    with_images = out.splitlines()[:2]
    code, out, _ = measure()
    assert code == 0 and out.splitlines()[:2] != with_images  # worker and front end both differ
    assert all(a != b for a, b in zip(out.splitlines()[:2], with_images, strict=True))
    code, _, err = measure("--image-mode", "RGB", "--image-resize", "8,8")
    assert code == 2 and "give instances of shape (3, 8, 8) but the model takes (1, 8, 8)" in err
    code, _, err = measure("--image-resize", "8,8")
    assert code == 2 and "image inputs need a mode" in err
    code, _, err = measure("--image-mode", "L")
    assert code == 2 and "set image resize" in err
    code, _, err = measure("--image-mode", "L", "--image-resize", "8,8", "--image-std", "0")
    assert code == 2 and "std values must be positive" in err
    assert "Traceback" not in err
    config = home.parent / "images.toml"
    config.write_text(
        f'[serving]\nmodel = "{model}"\n[serving.image]\nmode = "L"\nresize = [8, 8]\n'
        "mean = 0.5\nstd = 0.5\n"
    )
    r = run_ppml("serving", "up", "--config", config, "--measure", home=home)
    assert r.code == 0 and r.out.splitlines()[:2] == with_images  # the same settings


def test_images_served_attested_on_sim_equal_local_onnxruntime(
    deployment: Deployment, tmp_path: Path
) -> None:
    """The same model and settings with --tee sim in a workspace of its own: the workers and
    the front end get their keys by policy only, and an image's logits equal local ONNX
    Runtime's on the published preprocessing."""
    home = tmp_path / "ws"
    assert run_ppml("init", "--dev", "--workspace", home).code == 0
    assert run_ppml("key", "create", "models", home=home).code == 0
    model = tmp_path / "cnn.onnx.ppml"
    r = run_ppml("encrypt", deployment.digits / "cnn.onnx", "-o", model, "--key", "models",
                 home=home)  # fmt: skip
    assert r.code == 0, r.err
    flags = ("--model", model, "--workers", "1", "--port", "0", *IMAGE_FLAGS)
    measured = run_ppml("serving", "up", *flags, "--measure", home=home)
    assert measured.code == 0, measured.err
    worker, frontend = (line.split()[1] for line in measured.out.splitlines()[:2])
    for key, m in (("models", worker), ("serving-default", worker), ("serving-default", frontend)):
        r = run_ppml("policy", "allow", key, "--tee", "sim", "--measurement", m, home=home)
        assert r.code == 0, r.err
    up = run_ppml("serving", "up", *flags, "--tee", "sim", "--detach", home=home)
    assert up.code == 0, up.err
    try:
        url = up.out.strip().splitlines()[-1]
        files = _pngs(deployment)
        want = _local(deployment, [files[0].read_bytes()])
        with InputQueue(url, ca=home / "tls" / "ca.pem", cert=client_cert(home)) as q:
            got = q.predict(image=files[0], timeout=30)
            with pytest.raises(InvalidInput):
                q.predict(image=b"not an image at all", timeout=30)
        np.testing.assert_allclose(got, want[0], rtol=1e-5, atol=1e-5)
    finally:
        down = run_ppml("serving", "down", home=home, passphrase=None)
        assert down.code == 0, down.err
