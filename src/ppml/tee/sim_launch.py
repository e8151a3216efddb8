"""Starting a workload on the simulated TEE: evidence signed by the workspace's sim platform key
for the measurement the launcher computed, served on the workload's evidence channel.

One home for what `ppml run --tee sim` and `ppml serving up --tee sim` both do with
`ppml.tee.launcher.start`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ppml.attestation.sim import SimPlatform

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from ppml.tee.launcher import LaunchedWorkload, RunDirectory
    from ppml.tee.manifest import WorkloadManifest

__all__ = ["sim_quote_for", "start_sim"]

Quote = Callable[[bytes], bytes]


def sim_quote_for(platform_key: Ed25519PrivateKey) -> Callable[[str], Quote]:
    """For a measurement, the function that makes sim evidence binding report data."""
    platform = SimPlatform(platform_key)
    return lambda measurement: lambda report_data: platform.quote(measurement, report_data)


def start_sim(
    manifest: WorkloadManifest,
    run: RunDirectory,
    *,
    platform_key: Ed25519PrivateKey,
    **options: Any,
) -> LaunchedWorkload:
    """`ppml.tee.launcher.start` on the sim TEE (`options` are its keyword arguments but `tee`
    and `quote`)."""
    from ppml.tee import launcher

    quote = sim_quote_for(platform_key)(manifest.measurement())
    return launcher.start(manifest, run, tee="sim", quote=quote, **options)
