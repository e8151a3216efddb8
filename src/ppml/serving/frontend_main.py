"""The front end's process entry: ``python -m ppml.serving.frontend_main ...``.

Started by `ppml serving up` (attested under ``--tee sim``): opens the deployment's queue with
the payload key and the Redis password read from their (ppml-encrypted) files through this
process's key provider, and serves `ppml.serving.frontend.create_app` over HTTPS with the given
certificate. The model's signature comes on the command line (the front end never sees the
model). It listens on the socket inherited as ``$PPML_SERVING_LISTEN_FD`` when set (so that the
port, chosen at start-up, is not part of the measured command line), else on --host/--port.
SIGTERM and SIGINT stop it gracefully.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from ppml.errors import PPMLError, UsageError

__all__ = ["build_parser", "main"]

_log = logging.getLogger("ppml.serving")
LISTEN_FD_ENV = "PPML_SERVING_LISTEN_FD"


def _shape(text: str) -> tuple[int | None, ...]:
    if text in ("", "-"):
        return ()
    try:
        return tuple(None if d.strip() in ("*", "?", "-1") else int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("a shape is comma-separated sizes, '*' for any") from None


def build_parser() -> argparse.ArgumentParser:
    from ppml.serving.worker import REDIS_PORT_ENV

    p = argparse.ArgumentParser(
        prog="python -m ppml.serving.frontend_main",
        description="The HTTPS front end of a ppml serving deployment (started by "
        "`ppml serving up`).",
    )
    p.add_argument("--deployment", required=True, help="the deployment (queue) name")
    p.add_argument("--model-name", required=True)
    p.add_argument("--input-shape", type=_shape, required=True, help="one instance: 16 or 3,*,*")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--output-names", default="output", help="comma-separated")
    p.add_argument("--redis-host", default="127.0.0.1")
    p.add_argument("--redis-port", type=int, default=int(os.environ.get(REDIS_PORT_ENV) or 6379))
    p.add_argument("--redis-ca", type=Path, required=True)
    p.add_argument("--redis-password-file", type=Path)
    p.add_argument("--payload-key-file", type=Path, required=True)
    p.add_argument("--tls-cert", type=Path, required=True)
    p.add_argument("--tls-key", type=Path, required=True, help="encrypted PKCS#8 PEM")
    p.add_argument(
        "--client-ca",
        type=Path,
        help="the CA that client certificates must chain to (default: --redis-ca, the "
        "workspace CA)",
    )
    p.add_argument(
        "--tls-key-password-file",
        type=Path,
        help="the TLS key's password, a ppml-encrypted file (read through the key provider)",
    )
    p.add_argument("--host", default="127.0.0.1", help="when no socket is inherited")
    p.add_argument("--port", type=int, default=8500, help="when no socket is inherited")
    p.add_argument("--sync-timeout-s", type=float, default=10.0)
    p.add_argument("--max-body-bytes", type=int, default=1024 * 1024)
    p.add_argument("--max-instances", type=int, default=256)
    p.add_argument(
        "--keys-from-stdin",
        action="store_true",
        help="development, no TEE: read the data keys from stdin (see ppml.serving.deploy)",
    )
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return _serve(args)
    except PPMLError as exc:
        _log.error("%s", exc.diagnostics())
        return exc.exit_code


def _listening_socket(args: argparse.Namespace) -> socket.socket:
    fd_text = os.environ.get(LISTEN_FD_ENV)
    if fd_text:
        try:
            return socket.socket(fileno=int(fd_text))
        except (ValueError, OSError):
            raise UsageError(f"${LISTEN_FD_ENV} is not an inherited socket") from None
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    return sock


def _serve(args: argparse.Namespace) -> int:
    from ppml.server.tls import TlsFiles, run_https
    from ppml.serving.frontend import FrontendSettings, ModelInfo, create_app
    from ppml.serving.worker import QueueConfig, open_async_client, open_queue

    info = ModelInfo(
        name=args.model_name,
        input_shape=args.input_shape,
        dtype=args.dtype,
        output_names=tuple(n for n in args.output_names.split(",") if n),
    )
    settings = FrontendSettings(
        sync_timeout_s=args.sync_timeout_s,
        max_body_bytes=args.max_body_bytes,
        max_instances=args.max_instances,
    )
    if args.keys_from_stdin:
        from ppml.serving.deploy import read_key_bundle

        provider = read_key_bundle(sys.stdin.buffer)
    else:
        from ppml.api import key_provider

        provider = key_provider()  # type: ignore[assignment]
    for path in (args.tls_cert, args.tls_key):
        if not path.is_file():
            raise UsageError("TLS file missing", path=path)
    tls_password = None
    if args.tls_key_password_file is not None:
        from ppml.serving.worker import read_secret_file

        tls_password = read_secret_file(args.tls_key_password_file, provider).decode().strip()
    config = QueueConfig(
        deployment=args.deployment,
        redis_host=args.redis_host,
        redis_port=args.redis_port,
        redis_ca=args.redis_ca,
        redis_password_file=args.redis_password_file,
        payload_key_file=args.payload_key_file,
    )
    queue = open_queue(config, provider)
    aio = queue.asynchronous(open_async_client(config, provider))
    sock = _listening_socket(args)
    app = create_app(
        queue, models={info.name: info}, settings=settings, waiter=aio.result_notifier(), aio=aio
    )
    host, port = sock.getsockname()[:2]
    _log.info("front end of %s serving %s on https://%s:%d", args.deployment, info.name, host, port)
    tls = TlsFiles(
        cert=args.tls_cert,
        key=args.tls_key,
        ca=args.client_ca or args.redis_ca,
        password=tls_password,
    )
    run_https(app, tls, sock=sock)
    _log.info("front end of %s stopped", args.deployment)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
