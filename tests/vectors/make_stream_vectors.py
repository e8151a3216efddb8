"""Regenerate tests/vectors/stream_v1.json: `python tests/vectors/make_stream_vectors.py`.

Inputs are fixed (key, salt, nonce prefix, wrapped key bytes, plaintext); outputs are what the
implementation writes. The tests check both directions and rebuild the expected bytes from the
specification in docs/format.md with raw primitives, so a vector cannot drift silently.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from ppml.crypto.envelope import DataKey, WrappedKey
from ppml.crypto.stream import ContentType, StreamHeader, encrypt_stream

CASES = [
    # name, segment size, content type, plaintext
    ("empty", 16, ContentType.BYTES, b""),
    ("short", 16, ContentType.TEXT, b"hello"),
    ("one-full-segment", 16, ContentType.BYTES, bytes(range(16))),
    ("three-segments", 16, ContentType.CSV, b"name,age\nMichael,29\nAndy,30\nJustin,19\n"),
    ("two-segments-64", 64, ContentType.JSON, b'{"name":"Michael"}\n' * 4),
]


def main() -> None:
    dek = bytes(range(32))
    salt = bytes(range(100, 132))
    prefix = bytes.fromhex("a0a1a2a3a4a5a6")
    wrapped = WrappedKey("sales", 3, bytes(range(200, 255)) + b"\x00" * 5)
    vectors = []
    for name, seg, ctype, plaintext in CASES:
        header = StreamHeader(ctype, seg, salt, prefix, wrapped)
        out = io.BytesIO()
        encrypt_stream(io.BytesIO(plaintext), out, DataKey(dek, wrapped), header=header)
        vectors.append(
            {
                "name": name,
                "data_key": dek.hex(),
                "salt": salt.hex(),
                "nonce_prefix": prefix.hex(),
                "key_name": wrapped.key_name,
                "key_version": wrapped.version,
                "wrapped_key": wrapped.blob.hex(),
                "segment_size": seg,
                "content_type": ctype.name.lower(),
                "plaintext": plaintext.hex(),
                "ciphertext": out.getvalue().hex(),
            }
        )
    dest = Path(__file__).with_name("stream_v1.json")
    dest.write_text(json.dumps({"format": "ppml stream v1", "vectors": vectors}, indent=2) + "\n")
    print(f"wrote {len(vectors)} vectors to {dest}")


if __name__ == "__main__":
    main()
