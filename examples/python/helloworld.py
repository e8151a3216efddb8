"""The smallest attested workload: ``ppml run --tee sim -- python examples/python/helloworld.py``.

It says hello and reports whether it runs attested (under `ppml run`) and on which TEE.
"""

from __future__ import annotations

import os

from ppml.tee.runtime import in_attested_run

if __name__ == "__main__":
    where = (
        f"attested, TEE {os.environ.get('PPML_TEE', '?')}" if in_attested_run() else "not attested"
    )
    print(f"Hello World from ppml ({where})")
