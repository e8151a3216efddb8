"""Streaming word count over encrypted files, into encrypted files.

    ppml flink run examples/flink/wordcount.py INPUT OUTPUT [--key NAME] [--watch SECONDS]

INPUT is a directory (or file) of text files encrypted with `ppml encrypt`; OUTPUT receives
encrypted part files of ``word<TAB>count`` lines (read them with `ppml decrypt`), each under a
fresh data key of the named key ``--key`` (default ``flink-output``). Without ``--watch`` the
input is read once and the job ends with the final counts; with ``--watch S`` the directory is
watched for new files every S seconds, and every ``--report`` seconds each word whose count
changed is written with its count so far (the job runs until cancelled).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

from pyflink.common import Types
from pyflink.datastream import StreamExecutionEnvironment
from pyflink.datastream.functions import KeyedProcessFunction, RuntimeContext
from pyflink.datastream.state import ValueStateDescriptor

from ppml.flink import read_encrypted_files, write_encrypted_files

END_OF_INPUT = 2**63 - 1  # the last watermark of a bounded input


class CountWords(KeyedProcessFunction):
    """Counts one word (the key); writes the count at the end of the input, and every
    `report_ms` while the input goes on, when it changed."""

    def __init__(self, report_ms: int) -> None:
        self.report_ms = report_ms

    def open(self, runtime_context: RuntimeContext) -> None:
        self.count = runtime_context.get_state(ValueStateDescriptor("count", Types.LONG()))
        self.reported = runtime_context.get_state(ValueStateDescriptor("reported", Types.LONG()))

    def process_element(self, word: str, ctx: KeyedProcessFunction.Context) -> None:
        count = (self.count.value() or 0) + 1
        self.count.update(count)
        if count == 1:
            ctx.timer_service().register_event_time_timer(END_OF_INPUT)
            self._schedule(ctx)

    def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext) -> Iterator[str]:
        count = self.count.value() or 0
        if count != (self.reported.value() or 0):
            self.reported.update(count)
            yield f"{ctx.get_current_key()}\t{count}"
        if timestamp != END_OF_INPUT:
            self._schedule(ctx)

    def _schedule(self, ctx: KeyedProcessFunction.Context) -> None:
        timers = ctx.timer_service()
        timers.register_processing_time_timer(timers.current_processing_time() + self.report_ms)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="wordcount.py")
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--key", default="flink-output")
    parser.add_argument("--watch", type=float, default=None, metavar="SECONDS")
    parser.add_argument("--report", type=float, default=10.0, metavar="SECONDS")
    args = parser.parse_args(argv)

    env = StreamExecutionEnvironment.get_execution_environment()
    lines = read_encrypted_files(env, args.input, monitor_interval=args.watch)
    counts = (
        lines.flat_map(lambda line: line.split(), output_type=Types.STRING())
        .key_by(lambda word: word, key_type=Types.STRING())
        .process(CountWords(int(args.report * 1000)), output_type=Types.STRING())
    )
    write_encrypted_files(
        counts,
        args.output,
        key=args.key,
        records_per_part=100_000,
        roll_interval=5.0,
        suffix=".tsv.enc",
    )
    env.execute("ppml wordcount")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
