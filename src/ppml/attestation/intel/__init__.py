"""Intel SGX and TDX evidence: ECDSA quotes (v3, v4, v5), PCK certificates, PCS collateral."""
