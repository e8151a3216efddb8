"""The attested driver of a JVM application: ``python -m ppml.engines.spark.jvm_app``.

`ppml spark-submit --tee sim --class CLASS APP.jar ARGS` runs this module as the attested
process (sandboxed and measured like every attested driver, with the jar among the measured
files and on Spark's class path through ``PYSPARK_SUBMIT_ARGS``). It

1. starts Spark's JVM in the sandbox, with the workspace's security settings, as pyspark does
   for a Python driver;
2. for every ``--decrypt PATH`` (encrypted Parquet files or directories of them), unwraps the
   key-encryption keys of exactly those files through attestation (the KMS gates and audits each
   one) and puts them in the session's Hadoop configuration as the key access token of ppml's
   Parquet KMS client, so that the application's own ``spark.read().parquet(PATH)`` decrypts on
   the driver and the executors (the token travels to them inside Spark's authenticated,
   encrypted channels; Spark redacts options named like it);
3. calls ``CLASS.main(ARGS)`` in that JVM: the application's ``SparkSession.builder()
   .getOrCreate()`` returns this session.

It exits with 0 when ``main`` returns, 1 when it throws (the Java stack trace on stderr), and
with the JVM's status when the application calls ``System.exit``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["decrypt_files", "main", "release_parquet_keys"]


def _arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ppml.engines.spark.jvm_app",
        description="Run a JVM Spark application from an attested Python driver.",
    )
    parser.add_argument("--decrypt", action="append", default=[], metavar="PATH")
    parser.add_argument("main_class")
    parser.add_argument("jar")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    return parser.parse_args(list(argv))


def decrypt_files(paths: Sequence[Path]) -> list[Path]:
    """The files `--decrypt` names: each file, and the data files below each directory (hidden
    and ``_``-prefixed ones left out). A symbolic link is refused as a path and left out below a
    directory (the application can write links where it runs: one planted for a later run
    would name a file the measurement does not)."""
    from ppml.data.tree import data_files
    from ppml.errors import InputNotFound, UsageError

    files: list[Path] = []
    for path in paths:
        if path.is_symlink():
            raise UsageError("--decrypt names a symbolic link: name the file itself", path=path)
        if path.is_dir():
            files += data_files(path, skip_underscore=True).files
        elif path.is_file():
            files.append(path)
        else:
            raise InputNotFound("no such --decrypt file or directory", path=path)
    return files


def release_parquet_keys(paths: Sequence[Path], provider: Any) -> dict[tuple[str, str], bytes]:
    """The key-encryption keys of every encrypted Parquet file `decrypt_files(paths)` names,
    unwrapped by `provider` (the attested key provider inside a run): {(master key id, wrapped
    key): key}."""
    from ppml.data.files import annotate_errors
    from ppml.data.parquet import ParquetScanSession, is_encrypted_parquet
    from ppml.errors import UsageError

    encrypted = [f for f in decrypt_files(paths) if is_encrypted_parquet(f)]
    if not encrypted:
        raise UsageError(
            "--decrypt names no encrypted Parquet file: " + ", ".join(str(p) for p in paths)
        )
    with ParquetScanSession(provider) as session:
        for path in encrypted:
            with annotate_errors(path):
                session.inspect(path)
        return session.released_key_encryption_keys()


def _run_main(spark: Any, main_class: str, args: Sequence[str]) -> int:
    """``main_class.main(args)`` in the session's JVM, loaded by Spark's class loader (which has
    the application's jar)."""
    from py4j.protocol import Py4JError, Py4JJavaError, Py4JNetworkError

    sc = spark.sparkContext
    gateway, jvm = sc._gateway, sc._jvm
    loader = jvm.org.apache.spark.util.Utils.getContextOrSparkClassLoader()
    try:
        cls = jvm.java.lang.Class.forName(main_class, True, loader)
    except Py4JJavaError as exc:
        sys.stderr.write(f"ppml: cannot load {main_class}: {exc.java_exception}\n")
        return 1
    strings = gateway.new_array(jvm.java.lang.String, len(args))
    for i, arg in enumerate(args):
        strings[i] = arg
    types = gateway.new_array(jvm.java.lang.Class, 1)
    types[0] = strings.getClass()
    try:
        method = cls.getMethod("main", types)
    except Py4JJavaError:
        sys.stderr.write(f"ppml: {main_class} has no public static void main(String[])\n")
        return 1
    values = gateway.new_array(jvm.java.lang.Object, 1)
    values[0] = strings
    logging.disable(logging.CRITICAL)  # py4j logs a lost connection (System.exit) as an error
    try:
        method.invoke(None, values)
    except Py4JJavaError as exc:
        cause = exc.java_exception.getCause() or exc.java_exception
        trace = jvm.org.apache.spark.util.Utils.exceptionString(cause)
        sys.stderr.write(f'Exception in thread "main" {trace}')
        return 1
    except (Py4JNetworkError, Py4JError, OSError):  # System.exit: the JVM is gone
        proc = getattr(gateway, "proc", None)  # pyspark keeps the JVM's process there
        return int(proc.wait()) if proc is not None else 1
    finally:
        logging.disable(logging.NOTSET)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    options = _arguments(sys.argv[1:] if argv is None else argv)
    from ppml._internal.procs import keep_memory_private
    from ppml.errors import ConfigurationError

    # The application, and every process it starts, runs as this process's child: not
    # dumpable, none of them can read its memory or take its evidence channel (pidfd_getfd)
    # to ask for keys beyond the --decrypt files.
    if not keep_memory_private():
        raise ConfigurationError("cannot make the attested driver non-dumpable (prctl failed)")
    from pyspark.sql import SparkSession

    from ppml.engines.spark.jvm import load_kms_client, scan_options

    spark = SparkSession.builder.appName(options.main_class).getOrCreate()
    try:
        if options.decrypt:
            from ppml.api import key_provider

            keys = release_parquet_keys([Path(p) for p in options.decrypt], key_provider())
            if not load_kms_client(spark):
                sys.stderr.write("ppml: Spark's JVM cannot load ppml's Parquet KMS client\n")
                return 1
            conf = spark.sparkContext._jsc.hadoopConfiguration()
            for name, value in scan_options(keys).items():
                conf.set(name, value)
        return _run_main(spark, options.main_class, options.args)
    finally:
        with contextlib.suppress(Exception):  # the application stopped it, or the JVM is gone
            spark.stop()


if __name__ == "__main__":
    from ppml.errors import PPMLError

    try:
        code = main()
    except PPMLError as exc:  # one line, as ppml's commands print it, and their exit code
        sys.stderr.write(f"ppml: {exc.diagnostics()}\n")
        code = exc.exit_code
    raise SystemExit(code)
