"""Real-time scoring with an encrypted ONNX model inside a Flink operator.

    ppml flink run examples/flink/scoring.py MODEL.onnx.enc INPUT OUTPUT [--key flink-output]
        [--watch SECONDS]

MODEL.onnx.enc is an ONNX model encrypted with `ppml encrypt` (one float32 input of shape
[N, features], one output). INPUT holds encrypted JSON-lines files of records ``{"id": ...,
"features": [...]}``; each record is scored and ``{"id": ..., "scores": [...]}`` is written to
encrypted part files in OUTPUT. The model is decrypted inside the operator (its key comes from
the job's key relay; under ``--tee sim``, only if the key's policy names the job's
measurement) and loaded by onnxruntime from memory: its plaintext never touches a disk.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from pyflink.common import Types
from pyflink.datastream import StreamExecutionEnvironment
from pyflink.datastream.functions import FlatMapFunction, RuntimeContext

from ppml.flink import job_keys, read_encrypted_files, write_encrypted_files


class Score(FlatMapFunction):
    """A record -> its scores, with the model decrypted in `open`."""

    def __init__(self, model: str, ticket: object) -> None:
        self.model = model
        self.ticket = ticket

    def open(self, runtime_context: RuntimeContext) -> None:
        import onnxruntime

        from ppml.crypto.stream import decrypt_stream

        plain = io.BytesIO()
        with open(self.model, "rb") as fh:
            decrypt_stream(fh, plain, self.ticket.provider())  # type: ignore[attr-defined]
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(plain.getvalue(), options)
        self.input = self.session.get_inputs()[0].name

    def flat_map(self, value: str) -> Iterator[str]:
        import numpy as np

        record = json.loads(value)
        features = np.asarray([record["features"]], dtype=np.float32)
        scores = self.session.run(None, {self.input: features})[0][0]
        yield json.dumps({"id": record["id"], "scores": [float(x) for x in scores]})


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scoring.py")
    parser.add_argument("model")
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--key", default="flink-output")
    parser.add_argument("--watch", type=float, default=None, metavar="SECONDS")
    args = parser.parse_args(argv)

    env = StreamExecutionEnvironment.get_execution_environment()
    lines = read_encrypted_files(env, args.input, monitor_interval=args.watch)
    scored = lines.flat_map(
        Score(str(Path(args.model).absolute()), job_keys()), output_type=Types.STRING()
    )
    write_encrypted_files(scored, args.output, key=args.key, content="json", suffix=".jsonl.enc")
    env.execute("ppml scoring")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
