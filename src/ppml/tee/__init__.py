"""The attester side: workload manifests and measurements, the evidence channel, the runtime."""
