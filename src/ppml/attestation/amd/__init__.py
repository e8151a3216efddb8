"""AMD SEV-SNP evidence: attestation reports, the VCEK / VLEK -> ASK -> ARK chain."""
