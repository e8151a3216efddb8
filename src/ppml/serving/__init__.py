"""Trusted Cluster Serving: encrypted models served from a Redis-streams queue.

Clients push inputs through the HTTPS front end; workers (attested processes) run the model and
answer by request id. The queue holds only AES-GCM encrypted payloads.
"""

from __future__ import annotations
