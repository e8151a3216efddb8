"""Trusted Spark: Spark jobs over encrypted data, with Spark's own security switched on.

`PPMLContext` reads and writes encrypted files as Spark DataFrames. Importing this package
starts no Java: a SparkSession is made only when a `PPMLContext` is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ppml.engines.spark.context import PPMLContext

__all__ = ["PPMLContext"]


def __getattr__(name: str) -> Any:
    if name == "PPMLContext":
        from ppml.engines.spark.context import PPMLContext

        return PPMLContext
    raise AttributeError(name)
