"""The Flink job `flink_stream.py` times: card transactions from a Redis stream, a running total
per card, each result line written to files. Run by `ppml flink run`.

    flink_job.py ppml|plain OUTPUT --stream S --redis-port P --redis-ca CA --seconds S
        [--payload-key-file KEY.enc --redis-password-file PW.enc]   (ppml)
        [--password-file PW]                                          (plain: a 0600 file)

``ppml``: the stream's records are sealed (ppml.flink's Redis source opens them) and the results
go to encrypted part files. ``plain``: the same pipeline over plaintext records, with PyFlink's
own pieces (a Python poller on the same tick source, Flink's file sink with a string encoder):
the baseline. Each result line carries the record's production time and the time the result
reached the sink's input (``produced_ms``, ``at_ms``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from pyflink.common import Encoder, Types, WatermarkStrategy
from pyflink.datastream import StreamExecutionEnvironment
from pyflink.datastream.connectors import Source
from pyflink.datastream.connectors.file_system import FileSink
from pyflink.datastream.functions import KeyedProcessFunction, RuntimeContext
from pyflink.datastream.state import ValueStateDescriptor
from pyflink.java_gateway import get_gateway

from ppml.flink import RedisStream, read_redis_stream, write_encrypted_files

POLLS_PER_SECOND = 50.0
BATCH = 500


class PlainPoll(KeyedProcessFunction):
    """The baseline's source: XREAD of plaintext JSON records, position in Flink state."""

    def __init__(self, stream: str, port: int, ca: str, password_file: str) -> None:
        self.stream, self.port, self.ca, self.password_file = stream, port, ca, password_file

    def open(self, runtime_context: RuntimeContext) -> None:
        import redis

        password = Path(self.password_file).read_text().strip()
        self.client = redis.Redis(
            host="127.0.0.1", port=self.port, password=password, ssl=True,
            ssl_ca_certs=self.ca, ssl_cert_reqs="required",
        )  # fmt: skip
        self.last = runtime_context.get_state(ValueStateDescriptor("last", Types.STRING()))

    def process_element(self, value: int, ctx: KeyedProcessFunction.Context) -> Iterator[str]:
        last = self.last.value() or "0"
        for _name, entries in self.client.xread({self.stream: last}, count=BATCH) or []:
            for entry_id, fields in entries:
                yield fields[b"payload"].decode()
                last = entry_id.decode()
        self.last.update(last)


class RunningTotal(KeyedProcessFunction):
    def open(self, runtime_context: RuntimeContext) -> None:
        self.total = runtime_context.get_state(ValueStateDescriptor("total", Types.LONG()))

    def process_element(self, value: str, ctx: KeyedProcessFunction.Context) -> Iterator[str]:
        record = json.loads(value)
        total = (self.total.value() or 0) + int(record["amount_cents"])
        self.total.update(total)
        yield json.dumps(
            {"card": record["card"], "total": total, "phase": record["phase"],
             "produced_ms": record["produced_ms"], "at_ms": int(time.time() * 1000)}
        )  # fmt: skip


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="flink_job.py")
    parser.add_argument("mode", choices=["ppml", "plain"])
    parser.add_argument("output")
    parser.add_argument("--stream", required=True)
    parser.add_argument("--redis-port", type=int, required=True)
    parser.add_argument("--redis-ca", required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--payload-key-file")
    parser.add_argument("--redis-password-file")
    parser.add_argument("--password-file")
    args = parser.parse_args(argv)

    env = StreamExecutionEnvironment.get_execution_environment()
    env.set_parallelism(1)
    if args.mode == "ppml":
        source = RedisStream(
            stream=args.stream, deployment="bench", payload_key_file=Path(args.payload_key_file),
            port=args.redis_port, ca=Path(args.redis_ca),
            password_file=Path(args.redis_password_file),
        )  # fmt: skip
        records = read_redis_stream(
            env, source, stop_after=args.seconds, polls_per_second=POLLS_PER_SECOND, batch=BATCH
        )
    else:
        ticks = get_gateway().jvm.org.ppml.flink.Ticks.source(
            POLLS_PER_SECOND, int(args.seconds * POLLS_PER_SECOND)
        )
        records = (
            env.from_source(Source(ticks), WatermarkStrategy.no_watermarks(), "ticks")
            .key_by(lambda _t: 0, key_type=Types.INT())
            .process(
                PlainPoll(args.stream, args.redis_port, args.redis_ca, args.password_file),
                output_type=Types.STRING(),
            )
        )
    results = records.key_by(lambda r: json.loads(r)["card"], key_type=Types.STRING()).process(
        RunningTotal(), output_type=Types.STRING()
    )
    if args.mode == "ppml":
        write_encrypted_files(results, args.output, key="bench", roll_interval=5.0)
    else:
        results.sink_to(
            FileSink.for_row_format(args.output, Encoder.simple_string_encoder()).build()
        )
    env.execute(f"flink_stream {args.mode}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
