"""ppml: privacy-preserving analytics and machine learning on encrypted data inside TEEs."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
