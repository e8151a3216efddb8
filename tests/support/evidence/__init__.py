"""Synthetic hardware evidence for tests and benchmarks: byte-exact quotes and reports, and their
collateral, signed by test roots.

Never trusted by default: every key here is generated for tests and no verifier pins it. These
generators are test support, not part of the installed package.
"""
