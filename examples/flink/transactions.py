"""Card transactions from a sealed Redis stream, summed per card in event-time windows, into
encrypted files.

    ppml flink run examples/flink/transactions.py OUTPUT --stream S --deployment D \\
        --payload-key-file KEY.enc [--redis-port P] [--redis-ca CA] [--window 10] \\
        [--seconds S] [--key flink-output] [--out-stream NAME]

Each record of the stream is a JSON object ``{"card": "...", "amount_cents": 1250, "ts": MS}``
sealed with the serving queue's codec (``ppml.flink.append_records`` writes them). Records are
timestamped by their ``ts`` (event time, watermarks allowing ``--lateness`` seconds of disorder);
every ``--window`` seconds of event time, each card's transactions are counted and summed, and
``{"card", "window_start", "window_end", "count", "total_cents"}`` is written as a JSON line to
encrypted part files in OUTPUT (under fresh data keys of ``--key``) and, with ``--out-stream``,
sealed into that Redis stream too (same Redis, deployment and payload key; at least once). With
``--seconds S`` the
stream is polled for S seconds, then the input ends (the last windows fire); without it the job
runs until cancelled.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from pyflink.common import Duration, Time, Types, WatermarkStrategy
from pyflink.common.watermark_strategy import TimestampAssigner
from pyflink.datastream import StreamExecutionEnvironment
from pyflink.datastream.functions import ProcessWindowFunction
from pyflink.datastream.window import TumblingEventTimeWindows

from ppml.flink import RedisStream, read_redis_stream, write_encrypted_files, write_redis_stream

TRANSACTION = Types.TUPLE([Types.STRING(), Types.LONG(), Types.LONG()])  # card, cents, ts


def parse(text: str) -> tuple[str, int, int]:
    record = json.loads(text)
    return str(record["card"]), int(record["amount_cents"]), int(record["ts"])


class EventTime(TimestampAssigner):
    def extract_timestamp(self, value: tuple[str, int, int], record_timestamp: int) -> int:
        return value[2]


class Totals(ProcessWindowFunction):
    """One card's transactions in one window -> a JSON line."""

    def process(
        self,
        key: str,
        context: ProcessWindowFunction.Context,
        elements: Iterable[tuple[str, int, int]],
    ) -> Iterator[str]:
        amounts = [amount for _card, amount, _ts in elements]
        window = context.window()
        yield json.dumps(
            {
                "card": key,
                "window_start": window.start,
                "window_end": window.end,
                "count": len(amounts),
                "total_cents": sum(amounts),
            },
            sort_keys=True,
        )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="transactions.py")
    parser.add_argument("output")
    parser.add_argument("--stream", required=True)
    parser.add_argument("--deployment", required=True)
    parser.add_argument("--payload-key-file", type=Path, required=True)
    parser.add_argument("--redis-host", default="127.0.0.1")
    parser.add_argument("--redis-port", type=int, default=6379)
    parser.add_argument("--redis-ca", type=Path)
    parser.add_argument("--redis-password-file", type=Path)
    parser.add_argument("--window", type=float, default=10.0, metavar="SECONDS")
    parser.add_argument("--lateness", type=float, default=2.0, metavar="SECONDS")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--polls", type=float, default=20.0, help="polls per second")
    parser.add_argument("--batch", type=int, default=1000, help="records per poll, at most")
    parser.add_argument("--checkpoint", type=float, default=None, metavar="SECONDS")
    parser.add_argument("--key", default="flink-output")
    parser.add_argument("--out-stream", default=None)
    args = parser.parse_args(argv)

    env = StreamExecutionEnvironment.get_execution_environment()
    if args.checkpoint is not None:
        env.enable_checkpointing(int(args.checkpoint * 1000))
    source = RedisStream(
        stream=args.stream,
        deployment=args.deployment,
        payload_key_file=args.payload_key_file.absolute(),
        host=args.redis_host,
        port=args.redis_port,
        ca=args.redis_ca.absolute() if args.redis_ca else None,
        password_file=args.redis_password_file.absolute() if args.redis_password_file else None,
    )
    watermarks = WatermarkStrategy.for_bounded_out_of_orderness(
        Duration.of_millis(int(args.lateness * 1000))
    ).with_timestamp_assigner(EventTime())
    totals = (
        read_redis_stream(
            env, source, stop_after=args.seconds, polls_per_second=args.polls, batch=args.batch
        )
        .map(parse, output_type=TRANSACTION)
        .assign_timestamps_and_watermarks(watermarks)
        .key_by(lambda t: t[0], key_type=Types.STRING())
        .window(TumblingEventTimeWindows.of(Time.milliseconds(int(args.window * 1000))))
        .process(Totals(), output_type=Types.STRING())
    )
    write_encrypted_files(
        totals, args.output, key=args.key, content="json", roll_interval=5.0, suffix=".jsonl.enc"
    )
    if args.out_stream:
        write_redis_stream(totals, dataclasses.replace(source, stream=args.out_stream))
    env.execute("ppml card transactions")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
