"""A numeric workload: ``ppml run --tee sim -- python examples/python/numpy_dot.py [N]``.

Multiplies two random N x N matrices (default 1024) and prints the time taken as
``numpy.dot: <seconds> sec``.
"""

from __future__ import annotations

import sys
import time

import numpy as np


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 1024
    if n < 1:
        print("N must be a positive integer", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    a = rng.random((n, n))
    b = rng.random((n, n))
    start = time.perf_counter()
    c = np.dot(a, b)
    elapsed = time.perf_counter() - start
    assert c.shape == (n, n)
    print(f"numpy.dot: {elapsed:.6f} sec")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
