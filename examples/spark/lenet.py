"""LeNet-5 trained on encrypted data with Spark's TorchDistributor: ``examples/spark/lenet.py``.

    ppml key create lenet
    ppml spark-submit --measure examples/spark/lenet.py --model-out lenet.pt.ppml
    ppml policy allow lenet --tee sim --measurement HEX     # the line the command above printed
    ppml spark-submit --tee sim examples/spark/lenet.py --model-out lenet.pt.ppml
    ppml spark-submit --tee sim examples/spark/lenet.py --data MNIST_DIR --model-out lenet.pt.ppml
    ppml decrypt lenet.pt.ppml -o lenet.pt                  # a state_dict for torch.load

(The measurement covers the arguments: measure the exact command line you will run, and let the
policy of every key involved name it — the key of encrypted MNIST files and ``--key``.)

Without ``--data`` the model learns scikit-learn's bundled digits (8x8, 1797 images), scaled to
28x28 like MNIST: the driver writes them as an encrypted Parquet table under ``--key`` (in
``--work-dir``, else a temporary directory removed at the end), then reads the table back
through `PPMLContext`, so what trains is what was decrypted from those files. With ``--data``
it learns MNIST from MNIST_DIR: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally gzipped (``.gz``) and
each either encrypted with ``ppml encrypt`` (also found as ``NAME.ppml`` / ``NAME.gz.ppml``) or
plain, detected per file; the driver reads and checks them before Spark starts.

Training runs in two processes (``TorchDistributor(num_processes=2, local_mode=True,
use_gpu=False)``, DistributedDataParallel over gloo, one thread each); rank 0 evaluates on the
test set after every epoch (``epoch N: test accuracy 0.xxx``) and hands back the accuracies and
the trained weights. Local mode starts those processes on this machine, as children of the
driver: TorchDistributor pickles the training function with its arguments (the decrypted
training tensors) into a private (0700) temporary directory, which it removes after training,
and they load them from there. So the training tensors live only in the driver's (attested)
process, its private temporary directory and the training processes it starts; they never
leave the machine. The trained weights (``torch.save`` of the ``state_dict``) are written with
ppml's streaming format under ``--key`` to ``--model-out`` (replaced if it exists): ``ppml
decrypt`` recovers a file ``torch.load`` reads. Default epochs: 10 on the digits (about 98%
test accuracy), 2 on MNIST.

Under ``ppml spark-submit --tee sim`` the keys are released to the attested driver by policy;
run as ``python examples/spark/lenet.py ...`` it uses the workspace ($PPML_HOME,
$PPML_PASSPHRASE). Bad input (a missing file, a file that is not IDX) ends with a one-line
message and a non-zero exit code (2; 3 for a damaged encrypted file, 4 for a key not released).
"""

from __future__ import annotations

import argparse
import gzip
import io
import shutil
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ppml.errors import InputNotFound, PPMLError, UsageError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from ppml.spark import PPMLContext

    U8 = npt.NDArray[np.uint8]
    I64 = npt.NDArray[np.int64]

NUM_PROCESSES = 2
SIDE = 28  # LeNet-5's input: 28x28 (MNIST), padded to 32x32 by the first convolution
DIGITS_EPOCHS = 10
MNIST_EPOCHS = 2
MNIST_FILES = {
    "train images": ("train-images-idx3-ubyte", 3),
    "train labels": ("train-labels-idx1-ubyte", 1),
    "test images": ("t10k-images-idx3-ubyte", 3),
    "test labels": ("t10k-labels-idx1-ubyte", 1),
}
_SUFFIXES = ("", ".gz", ".ppml", ".gz.ppml")
_MEAN, _STD = 0.1307, 0.3081  # MNIST's pixel statistics (on [0, 1])


class LeNet5(nn.Module):
    """LeNet-5 (ReLU and max pooling): 1x28x28 -> 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.features(x))
        return logits


def to_input(images: U8) -> torch.Tensor:
    """uint8 images (N, 28, 28) -> the normalized float batch (N, 1, 28, 28) LeNet5 takes."""
    x = torch.tensor(images, dtype=torch.float32).div_(255.0).unsqueeze(1)
    return (x - _MEAN) / _STD


def accuracy(model: nn.Module, images: U8, labels: I64) -> float:
    """The share of `images` that `model` labels correctly."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), 1024):
            logits = model(to_input(images[start : start + 1024]))
            target = torch.tensor(labels[start : start + 1024])
            correct += int((logits.argmax(dim=1) == target).sum())
    return correct / max(1, len(images))


def train(
    train_images: U8,
    train_labels: I64,
    test_images: U8,
    test_labels: I64,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> dict[str, Any]:
    """One training process (run by TorchDistributor under torchrun): DDP over gloo.

    Every rank returns the same result (rank 0's, broadcast): in local mode each process
    writes its return value to the same file, so the driver gets rank 0's whichever wrote last.
    """
    import gc

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        result = fit(
            train_images, train_labels, test_images, test_labels, epochs, batch_size, lr, seed
        )
    finally:
        # The DDP model must be gone before the process group: a DDP reducer destroyed at
        # interpreter exit, after the group, aborts the process now and then (torch 2.13, gloo).
        gc.collect()
        dist.destroy_process_group()
    return result


def fit(
    train_images: U8,
    train_labels: I64,
    test_images: U8,
    test_labels: I64,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> dict[str, Any]:
    """The training loop of one rank of an initialized process group."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    rank = dist.get_rank()
    torch.manual_seed(seed)
    net = LeNet5()
    model = DistributedDataParallel(net)  # broadcasts rank 0's initial weights
    dataset = TensorDataset(to_input(train_images), torch.tensor(train_labels))
    sampler: DistributedSampler[tuple[torch.Tensor, ...]] = DistributedSampler(
        dataset, shuffle=True, seed=seed
    )
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    accuracies: list[float] = []
    for epoch in range(1, epochs + 1):
        started = time.monotonic()
        sampler.set_epoch(epoch)
        net.train()  # (DDP itself stays in training mode: only `net` is ever switched)
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
        if rank == 0:
            acc = accuracy(net, test_images, test_labels)
            accuracies.append(acc)
            took = time.monotonic() - started
            print(f"epoch {epoch}: test accuracy {acc:.3f} ({took:.1f} s)", flush=True)
    result: list[Any] = [None]
    if rank == 0:
        buffer = io.BytesIO()
        torch.save(net.state_dict(), buffer)
        result[0] = {"accuracies": accuracies, "state_dict": buffer.getvalue()}
    dist.broadcast_object_list(result, src=0)
    return dict(result[0])


# -- data ----------------------------------------------------------------------------------------


def upscale_digits(images8: npt.NDArray[Any]) -> U8:
    """scikit-learn's 8x8 digits (0..16) as MNIST-like 28x28 uint8 images: the digit scaled to
    20x20 (bilinear) and centred in a 28x28 frame, as MNIST's digits are."""
    import numpy as np
    from torch.nn import functional as F

    x = torch.from_numpy(np.asarray(images8, dtype=np.float32)).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False)
    x = F.pad(x, (4, 4, 4, 4))
    return (x.squeeze(1).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def digits_arrays() -> tuple[U8, I64, npt.NDArray[np.bool_]]:
    """The digits as 28x28 images, their labels, and which are the test set (every fifth)."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = np.asarray(digits.target, dtype=np.int64)
    return upscale_digits(digits.images), labels, np.arange(len(labels)) % 5 == 4


def digits_data(ctx: PPMLContext, key: str, work: Path) -> tuple[U8, I64, U8, I64]:
    """Write the digits (28x28) as an encrypted Parquet table under `key`, read them back."""
    import numpy as np
    from pyspark.sql import functions as F

    images, labels, is_test = digits_arrays()
    split = np.where(is_test, "test", "train")
    rows = [(i, str(split[i]), int(labels[i]), images[i].tobytes()) for i in range(len(labels))]
    df = ctx.spark.createDataFrame(rows, "id INT, split STRING, label INT, image BINARY")
    table = work / "digits"
    ctx.write(df, key=key).mode("overwrite").parquet(table)

    read = ctx.read().parquet(table)

    def part(name: str) -> tuple[U8, I64]:
        got = read.where(F.col("split") == name).orderBy("id").select("label", "image").collect()
        x = np.frombuffer(b"".join(bytes(r["image"]) for r in got), dtype=np.uint8)
        y = np.array([r["label"] for r in got], dtype=np.int64)
        return x.reshape(len(got), SIDE, SIDE), y

    return (*part("train"), *part("test"))


def find_idx(directory: Path, base: str) -> Path:
    for suffix in _SUFFIXES:
        path = directory / (base + suffix)
        if path.is_file():
            return path
    names = ", ".join(base + s for s in _SUFFIXES)
    raise InputNotFound(f"no MNIST file {base} (looked for {names})", path=directory)


def load_bytes(path: Path) -> bytes:
    """A file's content: decrypted when it is a ppml encrypted file, gunzipped when gzipped."""
    from ppml.api import key_provider
    from ppml.crypto.stream import looks_encrypted
    from ppml.data import open_encrypted

    if looks_encrypted(path):
        with open_encrypted(path, key_provider()) as reader:
            data = reader.read()
    else:
        data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise UsageError(f"not a valid gzip file ({exc})", path=path) from None
    return data


def parse_idx(data: bytes, ndim: int, path: Path) -> npt.NDArray[np.uint8]:
    """An IDX array of unsigned bytes with `ndim` dimensions (magic 0x0000 0x08 ndim)."""
    import numpy as np

    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or data[3] != ndim:
        raise UsageError(
            f"bad IDX magic {data[:4].hex() or '(empty)'}: expected 000008{ndim:02x} "
            f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})",
            path=path,
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UsageError("truncated IDX header", path=path)
    dims = struct.unpack(f">{ndim}I", data[4:header])
    count = 1
    for d in dims:
        count *= d
    if len(data) - header != count:
        raise UsageError(
            f"IDX size mismatch: dimensions {'x'.join(map(str, dims))} need {count} bytes, "
            f"the file holds {len(data) - header}",
            path=path,
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def mnist_data(directory: Path) -> tuple[U8, I64, U8, I64]:
    """The four MNIST IDX files of `directory` (each encrypted or plain, gzipped or not)."""
    import numpy as np

    if not directory.is_dir():
        raise InputNotFound("no such directory (--data takes the MNIST directory)", path=directory)
    arrays: dict[str, tuple[npt.NDArray[np.uint8], Path]] = {}
    for what, (base, ndim) in MNIST_FILES.items():
        path = find_idx(directory, base)
        arrays[what] = (parse_idx(load_bytes(path), ndim, path), path)
    out: list[Any] = []
    for kind in ("train", "test"):
        images, ipath = arrays[f"{kind} images"]
        labels, lpath = arrays[f"{kind} labels"]
        if images.shape[1:] != (SIDE, SIDE):
            shape = "x".join(map(str, images.shape[1:]))
            raise UsageError(f"images are {shape}, LeNet-5 here takes {SIDE}x{SIDE}", path=ipath)
        if len(images) != len(labels) or len(images) == 0:
            raise UsageError(
                f"{len(images)} {kind} images but {len(labels)} labels ({lpath.name})", path=ipath
            )
        if int(labels.max()) > 9:
            raise UsageError(f"label {int(labels.max())} outside 0..9", path=lpath)
        out += [np.ascontiguousarray(images), labels.astype(np.int64)]
    return out[0], out[1], out[2], out[3]


# -- the driver ----------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lenet.py", description="LeNet-5 on encrypted data with Spark's TorchDistributor."
    )
    parser.add_argument("--data", metavar="MNIST_DIR", type=Path, help="the MNIST IDX files")
    parser.add_argument(
        "--key", default="lenet", help="key for the digits table and the model (default: lenet)"
    )
    parser.add_argument("--model-out", metavar="PATH", type=Path, help="the encrypted model")
    parser.add_argument(
        "--work-dir", metavar="DIR", type=Path, help="keep the encrypted digits table here"
    )
    parser.add_argument(
        "--epochs",
        type=int,
        help=f"default: {DIGITS_EPOCHS} on the digits, {MNIST_EPOCHS} on MNIST",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.model_out is not None and not args.model_out.absolute().parent.is_dir():
        parser.error(f"--model-out: no such directory {args.model_out.absolute().parent}")
    return args


def run(args: argparse.Namespace) -> None:
    from pyspark.ml.torch.distributor import TorchDistributor

    from ppml.crypto.envelope import validate_key_name
    from ppml.data import create_encrypted
    from ppml.spark import PPMLContext

    validate_key_name(args.key)
    torch.set_num_threads(1)
    # MNIST is read (and checked) before Spark starts; its keys come from the same provider.
    mnist = mnist_data(args.data) if args.data is not None else None
    ctx = PPMLContext(app_name="lenet")
    scratch: Path | None = None  # the digits table's temporary directory
    try:
        if mnist is not None:
            data = mnist
            source, epochs = f"MNIST ({args.data})", args.epochs or MNIST_EPOCHS
        else:
            if args.work_dir is None:
                work = scratch = Path(tempfile.mkdtemp(prefix="lenet-"))
            else:
                work = args.work_dir
                work.mkdir(parents=True, exist_ok=True)
            data = digits_data(ctx, args.key, work)
            source, epochs = "digits (encrypted table)", args.epochs or DIGITS_EPOCHS
        print(
            f"LeNet-5 on {source}: {len(data[0])} training, {len(data[2])} test images, "
            f"{epochs} epoch{'s' if epochs != 1 else ''}, {NUM_PROCESSES} processes",
            flush=True,
        )
        started = time.monotonic()
        distributor = TorchDistributor(num_processes=NUM_PROCESSES, local_mode=True, use_gpu=False)
        result = distributor.run(train, *data, epochs, args.batch_size, args.lr, args.seed)
        if not isinstance(result, dict):
            raise RuntimeError("the training processes returned no result")
        took = time.monotonic() - started
        accuracies = result["accuracies"]
        print(f"final test accuracy {accuracies[-1]:.3f} (training {took:.1f} s)", flush=True)
        if args.model_out is not None:
            with create_encrypted(args.model_out, ctx.keys, args.key) as out:
                out.write(result["state_dict"])
            print(f"model written encrypted under key {args.key!r}: {args.model_out}")
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        ctx.stop()


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except PPMLError as exc:
        print(f"lenet.py: {exc.diagnostics()}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
