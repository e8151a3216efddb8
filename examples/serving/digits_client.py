"""Send digit images to a serving deployment: ``examples/serving/digits_client.py``.

    python examples/serving/digits_client.py https://127.0.0.1:8500 digits/

Enqueues every ``digit-*.png`` of the directory as an image (``InputQueue.enqueue(id,
image=PATH)``; the first one in BigDL's form, ``user_define_key={"path": PATH}``), fetches the
results with ``OutputQueue``, and prints each predicted digit. With the plaintext model next to
the images (``cnn.onnx``, as ``digits_cnn.py`` writes it), it also runs that model locally with
ONNX Runtime on the same preprocessing -- the image settings the front end publishes on
``/models``, applied by ``ppml.serving.image.ImageSpec`` -- and checks that the served logits
equal the local ones. The client authenticates with the workspace's CA and client certificate
($PPML_HOME, key opened with $PPML_PASSPHRASE); pass ``--ca``/``--cert``/``--key`` for a
certificate made by ``ppml serving client issue NAME``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from ppml.serving import InputQueue, OutputQueue
from ppml.serving.image import ImageSpec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url", help="the front end's URL, as `ppml serving up` printed it")
    p.add_argument("images", type=Path, help="the directory of digit-*.png (and cnn.onnx)")
    p.add_argument("--ca", type=Path, help="the workspace CA (default: $PPML_HOME's)")
    p.add_argument("--cert", type=Path, help="a client certificate (with --key)")
    p.add_argument("--key", type=Path, help="its private key")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for results")
    args = p.parse_args(argv)
    files = sorted(args.images.glob("digit-*.png"))
    if not files:
        p.error(f"no digit-*.png in {args.images}")
    options: dict[str, object] = {"ca": args.ca}
    if args.cert is not None or args.key is not None:
        if args.cert is None or args.key is None:
            p.error("--cert and --key go together")
        options["cert"] = (args.cert, args.key)

    with InputQueue(args.url, **options) as inputs:  # type: ignore[arg-type]
        (model,) = inputs.models()
        ids = {}
        for n, path in enumerate(files):
            request_id = f"{path.stem}-{time.time_ns()}"
            if n == 0:
                inputs.enqueue(request_id, user_define_key={"path": str(path)})
            else:
                inputs.enqueue(request_id, image=path)
            ids[request_id] = path
    served: dict[str, np.ndarray] = {}
    with OutputQueue(args.url, **options) as outputs:  # type: ignore[arg-type]
        deadline = time.monotonic() + args.timeout
        while len(served) < len(ids):
            for request_id, result in outputs.dequeue().items():
                if isinstance(result, Exception):
                    print(f"{ids[request_id].name}: failed: {result.reason}", file=sys.stderr)
                    return 1
                served[request_id] = result
            if len(served) < len(ids):
                if time.monotonic() > deadline:
                    print("no results in time", file=sys.stderr)
                    return 1
                time.sleep(0.05)

    local = None
    plain_model = args.images / "cnn.onnx"
    if plain_model.is_file():
        import onnxruntime as ort

        spec = ImageSpec.from_dict(model["image"])
        session = ort.InferenceSession(str(plain_model), providers=["CPUExecutionProvider"])
        batch = np.stack([spec.preprocess(path.read_bytes()) for path in ids.values()])
        local = dict(zip(ids, session.run(None, {"image": batch})[0], strict=True))
    mismatches = 0
    for request_id, path in ids.items():
        logits = served[request_id]
        label = path.stem.rsplit("-", 1)[-1]
        line = f"{path.name}: predicted {int(np.argmax(logits))} (label {label})"
        if local is not None:
            same = np.allclose(logits, local[request_id], rtol=1e-5, atol=1e-5)
            mismatches += not same
            line += ", same logits as local onnxruntime" if same else ", DIFFERS from local"
        print(line)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
