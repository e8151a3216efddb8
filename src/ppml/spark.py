"""PySpark over encrypted data: ``from ppml.spark import PPMLContext``."""

from __future__ import annotations

from ppml.engines.spark.context import PPMLContext

__all__ = ["PPMLContext"]
