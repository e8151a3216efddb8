"""Engines that run analytics over encrypted data: embedded SQL (DuckDB), later Spark and more."""
