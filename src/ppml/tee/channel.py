"""The evidence channel between an attested workload and its launcher: an inherited socket.

The workload asks for evidence over report data of its choosing; the launcher answers with
evidence for the workload's measurement (which the launcher computed, not the workload) signed
by a key the workload never holds. One JSON object per line each way.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable

from ppml.errors import AttestationFailed, PPMLError

__all__ = ["CHANNEL_ENV", "EvidenceChannelServer", "request_evidence"]

CHANNEL_ENV = "PPML_TEE_CHANNEL"
_MAX_LINE = 64 * 1024
_log = logging.getLogger("ppml.tee")
_request_lock = threading.Lock()  # one request at a time on the shared socket

Quote = Callable[[bytes], bytes]


class EvidenceChannelServer:
    """The launcher's end: serves quote requests on one end of a socket pair in a thread.

    `child_fd` is the descriptor to hand to the child (with `pass_fds`); the child finds its
    number in the `PPML_TEE_CHANNEL` environment variable.
    """

    def __init__(self, quote: Quote, tee: str) -> None:
        self._quote = quote
        self._tee = tee
        self._ours, self._theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._theirs.set_inheritable(True)
        self._thread = threading.Thread(target=self._serve, name="ppml-evidence", daemon=True)

    @property
    def child_fd(self) -> int:
        return self._theirs.fileno()

    def start(self) -> None:
        self._thread.start()

    def child_started(self) -> None:
        """Close the launcher's copy of the child's end (so EOF arrives when the child exits)."""
        self._theirs.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._ours.shutdown(socket.SHUT_RDWR)
        self._ours.close()
        with contextlib.suppress(OSError):
            self._theirs.close()
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        with contextlib.suppress(OSError), self._ours.makefile("rwb") as stream:
            while line := stream.readline(_MAX_LINE + 1):
                stream.write(self._answer(line) + b"\n")
                stream.flush()

    def _answer(self, line: bytes) -> bytes:
        try:
            if len(line) > _MAX_LINE:
                raise ValueError("request too long")
            request = json.loads(line)
            if not isinstance(request, dict) or request.get("op") != "quote":
                raise ValueError("unknown request")
            report_data = bytes.fromhex(str(request["report_data"]))
            if len(report_data) != 64:
                raise ValueError("report data must be 64 bytes")
            evidence = self._quote(report_data)
        except (ValueError, KeyError, TypeError) as exc:
            _log.warning("evidence channel: refused a request: %s", exc)
            return json.dumps({"ok": False, "error": "bad request"}).encode()
        except (PPMLError, OSError) as exc:
            # The TEE could not produce evidence (a hardware backend): the workload is told so
            # and the channel keeps serving.
            _log.warning("evidence channel: no evidence: %s", exc)
            return json.dumps({"ok": False, "error": "no evidence"}).encode()
        return json.dumps(
            {"ok": True, "tee": self._tee, "evidence": base64.b64encode(evidence).decode()}
        ).encode()


def request_evidence(report_data: bytes, *, fd: int | None = None) -> tuple[str, bytes]:
    """The workload's end: ask the launcher for evidence over `report_data` (64 bytes).

    Returns (tee type, evidence bytes). Outside an attested run there is no channel.
    """
    if fd is None:
        value = os.environ.get(CHANNEL_ENV)
        if value is None or not value.isdigit():
            raise AttestationFailed("not running under `ppml run`: no evidence channel")
        fd = int(value)
    with _request_lock:
        return _request(report_data, fd)


def _request(report_data: bytes, fd: int) -> tuple[str, bytes]:
    sock = socket.socket(fileno=os.dup(fd))
    try:
        with sock.makefile("rwb") as stream:
            stream.write(json.dumps({"op": "quote", "report_data": report_data.hex()}).encode())
            stream.write(b"\n")
            stream.flush()
            reply = json.loads(stream.readline(_MAX_LINE + 1) or b"null")
    except (OSError, ValueError) as exc:
        raise AttestationFailed(f"evidence channel failed: {exc}") from None
    finally:
        sock.close()
    if not isinstance(reply, dict) or not reply.get("ok"):
        raise AttestationFailed("the launcher refused to produce evidence")
    return str(reply["tee"]), base64.b64decode(reply["evidence"])
