"""PySpark over encrypted data: ``from ppml.spark import PPMLContext``.

A session made by `PPMLContext` (or `ppml spark-submit`) has ppml's jar on its class path, so
encrypted Parquet is read by Spark's own reader; for a session built elsewhere `PPMLContext`
adds the jar at run time (``.config("spark.jars", str(kms_client_jar()))`` does it up front).
"""

from __future__ import annotations

from ppml.engines.spark.context import PPMLContext
from ppml.engines.spark.jvm import kms_client_jar

__all__ = ["PPMLContext", "kms_client_jar"]
