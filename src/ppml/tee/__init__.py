"""The attester side: workload manifests and measurements, the sim TEE, `ppml run`, the in-TEE runtime."""
