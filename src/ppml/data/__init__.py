"""Encrypted datasets: files encrypted at rest, read and written as Arrow, pandas or polars."""
