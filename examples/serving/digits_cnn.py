"""A small CNN for serving image inputs: ``examples/serving/digits_cnn.py``.

    python examples/serving/digits_cnn.py --out digits
    # digits/cnn.onnx (the model, plaintext: encrypt it, then delete it or keep it for checks)
    # digits/digit-NN-L.png (a few test digits, label L, as 28x28 grey PNG files)

Trains a convolutional network on scikit-learn's bundled digits (1797 images of 8x8) for a few
seconds on the CPU and exports it to ONNX with one input ``image`` of shape ``(N, 1, 8, 8)``
(float32) and one output ``logits`` of shape ``(N, 10)``. The training images go through the
very preprocessing the deployment applies to a served image: each digit is drawn as a 28x28 grey
picture (as the PNG files are) and turned into the model's input by
``ppml.serving.image.ImageSpec(mode="L", resize=(8, 8), mean=(0.5,), std=(0.5,))`` -- the
settings ``ppml serving up --image-mode L --image-resize 8,8 --image-mean 0.5 --image-std 0.5``
gives the workers (see ``digits_client.py`` and the README's "Serving an encrypted model").
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch import nn

from ppml.serving.image import ImageSpec

SIDE = 28  # the PNG files' size; the deployment resizes to the model's 8x8
SPEC = ImageSpec(mode="L", resize=(8, 8), mean=(0.5,), std=(0.5,))


def picture(digit: np.ndarray) -> Image.Image:
    """A digit of scikit-learn (8x8, values 0-16) as a 28x28 grey picture (0-255)."""
    pixels = np.rint(digit * (255.0 / 16.0)).astype(np.uint8)
    return Image.fromarray(pixels, mode="L").resize((SIDE, SIDE), Image.Resampling.BILINEAR)


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16 x 4 x 4
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def train(x: torch.Tensor, y: torch.Tensor, epochs: int) -> DigitsCNN:
    torch.manual_seed(0)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    order = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(x), generator=order).split(64):
            optimizer.zero_grad()
            loss_fn(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.eval()


def export_onnx(model: DigitsCNN, path: Path) -> None:
    """The model as ONNX (opset 17, dynamic batch) through torch's TorchScript-based exporter,
    which needs the onnx package only; torch marks it deprecated in favour of the torch.export-based
    one (which needs onnxscript), hence the silenced DeprecationWarning."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, 8, 8),),
            buf,
            dynamo=False,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}},
            opset_version=17,
        )
    path.write_bytes(buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("digits"), help="output directory")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--images", type=int, default=6, help="test digits to write as PNG files")
    args = p.parse_args(argv)
    if args.epochs < 1 or not 0 <= args.images <= 100:
        p.error("--epochs must be at least 1 and --images 0 to 100")
    if importlib.util.find_spec("onnx") is None:
        print(
            "the ONNX export needs the onnx package: pip install 'onnx>=1.16,<2'", file=sys.stderr
        )
        return 2
    started = time.perf_counter()
    torch.set_num_threads(1)
    digits = load_digits()
    inputs = np.stack([SPEC.transform(picture(d)) for d in digits.images])
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(labels))
    test, fit = order[:300], order[300:]
    model = train(torch.from_numpy(inputs[fit]), torch.from_numpy(labels[fit]), args.epochs)
    with torch.inference_mode():
        predicted = model(torch.from_numpy(inputs[test])).argmax(1).numpy()
    accuracy = float(np.mean(predicted == labels[test]))
    args.out.mkdir(parents=True, exist_ok=True)
    export_onnx(model, args.out / "cnn.onnx")
    for n, i in enumerate(test[: args.images]):
        picture(digits.images[i]).save(args.out / f"digit-{n:02d}-{labels[i]}.png")
    print(
        f"test accuracy {accuracy:.3f} ({len(test)} digits), {time.perf_counter() - started:.1f} s"
    )
    print(f"model   {args.out / 'cnn.onnx'}  (input image (N, 1, 8, 8) float32, output logits)")
    print(f"images  {args.images} x {args.out}/digit-NN-LABEL.png ({SIDE}x{SIDE} grey)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
