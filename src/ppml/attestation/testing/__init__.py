"""Synthetic hardware evidence for tests: byte-exact quotes and reports signed by test roots.

Never trusted by default: every key here is generated for tests and no verifier pins it.
"""
