"""Engines that run users' analytics over encrypted data: embedded SQL (DuckDB), later Spark and more."""
