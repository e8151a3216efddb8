"""The front end's process entry: ``python -m ppml.server.serving_frontend_main ...``.

Started by `ppml serving up` (attested under ``--tee sim``): opens the deployment's queue with
the payload key and the Redis password read from their (ppml-encrypted) files through this
process's key provider, and serves `ppml.server.serving_frontend.create_app` over HTTPS with
the given certificate. The model's signature comes on the command line as one ``--model-info`` JSON
(`ppml.serving.contract.ModelInfo`; the front end never sees the model). It listens on the
socket inherited as ``$PPML_SERVING_LISTEN_FD`` when set (so that the port, chosen at start-up,
is not part of the measured command line), else on --host/--port.
SIGTERM and SIGINT stop it gracefully.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path

from ppml.errors import PPMLError, UsageError
from ppml.serving.contract import (
    LISTEN_FD_ENV,
    ModelInfo,
    add_queue_arguments,
    child_key_provider,
    open_async_client,
    open_queue,
    queue_config,
    read_secret_file,
)

__all__ = ["build_parser", "main"]

_log = logging.getLogger("ppml.serving")


def _model_info(text: str) -> ModelInfo:
    try:
        return ModelInfo.from_json(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ppml.server.serving_frontend_main",
        description="The HTTPS front end of a ppml serving deployment (started by "
        "`ppml serving up`).",
    )
    add_queue_arguments(p)
    p.add_argument(
        "--model-info",
        type=_model_info,
        required=True,
        help='the served model: {"name", "input_shape", "dtype", "output_names"} as JSON',
    )
    p.add_argument("--redis-ca", type=Path, required=True)
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
    from ppml.server.serving_frontend import FrontendSettings, create_app
    from ppml.server.tls import TlsFiles, run_https

    info: ModelInfo = args.model_info
    settings = FrontendSettings(
        sync_timeout_s=args.sync_timeout_s,
        max_body_bytes=args.max_body_bytes,
        max_instances=args.max_instances,
    )
    provider = child_key_provider(args.keys_from_stdin)
    for path in (args.tls_cert, args.tls_key):
        if not path.is_file():
            raise UsageError("TLS file missing", path=path)
    tls_password = None
    if args.tls_key_password_file is not None:
        tls_password = read_secret_file(args.tls_key_password_file, provider).decode().strip()
    config = queue_config(args)
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
