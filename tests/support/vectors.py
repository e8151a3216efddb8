"""Real SGX and TDX quotes, public test data (sources: tests/data/vectors/README.md)."""

from pathlib import Path

VECTORS = Path(__file__).resolve().parents[1] / "data" / "vectors"
