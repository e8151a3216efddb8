"""Small secrets kept in files (a payload key, a Redis password): ppml-encrypted, opened through
the key provider (so released by the KMS after attestation), or plain files only their owner may
read. Never argv or environment."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Final

from ppml.crypto.envelope import DataKeyProvider
from ppml.crypto.stream import looks_encrypted
from ppml.errors import UsageError

__all__ = ["MAX_SECRET_FILE", "read_secret_file"]

MAX_SECRET_FILE: Final = 4096


def read_secret_file(path: Path, provider: DataKeyProvider) -> bytes:
    """A secret from a file: decrypted through `provider` when ppml-encrypted, else a plain
    file that must not be readable by group or others."""
    import io

    from ppml.crypto.stream import decrypt_stream
    from ppml.data.files import annotate_errors

    path = Path(path)
    with annotate_errors(path):
        if looks_encrypted(path):
            buf = io.BytesIO()
            with open(path, "rb") as fh:
                decrypt_stream(fh, buf, provider)
            data = buf.getvalue()
        else:
            if stat.S_IMODE(path.stat().st_mode) & 0o077:
                raise UsageError(
                    "a secret file must be readable by its owner only (chmod 600)", path=path
                )
            data = path.read_bytes()
    if not 0 < len(data) <= MAX_SECRET_FILE:
        raise UsageError("the secret file is empty or too large", path=path)
    return data
