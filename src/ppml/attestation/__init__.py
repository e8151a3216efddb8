"""The attestation layer (RATS Verifier): evidence verification per TEE type, appraisal, tokens."""
