"""`ppml serving up|status|down`: Trusted Cluster Serving on this machine.

See `ppml.serving.deploy` for what runs, where the keys come from and what the state holds.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ppml.cli._common import (
    FormatOption,
    PassphraseFileOption,
    WorkspaceOption,
    open_workspace,
    print_json,
)
from ppml.errors import ConfigurationError

if TYPE_CHECKING:
    from ppml.kms import KeyService
    from ppml.serving.deploy import DeploySettings, Plan
    from ppml.workspace import Workspace

serving_app = typer.Typer(
    help="Serve an encrypted model: redis-server (TLS, password, AOF), an HTTPS front end and "
    "worker processes on this machine; attested with --tee sim.",
    no_args_is_help=True,
)

_CONFIG_HELP = (
    "Settings in a TOML file (keys at the top level or under [serving]; flags win): model, "
    "deployment, workers, tee, host, port, runtime, model_name, input_shape, input_dtype, "
    "max_batch_size, max_wait_ms, intra_op_threads, sync_timeout_s, max_body_bytes, "
    "max_instances, redis_maxmemory, start_timeout_s, and an [serving.image] table (mode, "
    "resize, crop, layout, scale, mean, std, resample, max_bytes, max_pixels: the --image-* "
    "flags). A relative model path is relative to the file."
)


def register(app: typer.Typer) -> None:
    app.add_typer(serving_app, name="serving")


@serving_app.command("up")
def up(
    model: Annotated[
        Path | None,
        typer.Option("--model", metavar="PATH", help="The ppml-encrypted model (ONNX default)."),
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, max=64, help="Worker processes. (default: 1)")
    ] = None,
    tee: Annotated[
        str | None,
        typer.Option(
            "--tee",
            help="Run the front end and the workers attested on this TEE backend (sim): keys "
            "are released to them only by the keys' policies (see --measure).",
        ),
    ] = None,
    host: Annotated[
        str | None,
        typer.Option("--host", help="Address the front end listens on. (default: 127.0.0.1)"),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            "--port", help="HTTPS port of the front end; 0: any free port. (default: 8500)"
        ),
    ] = None,
    deployment: Annotated[
        str | None,
        typer.Option("--deployment", help="Deployment (queue) name. (default: default)"),
    ] = None,
    runtime: Annotated[
        str | None, typer.Option("--runtime", help="onnx or torchscript. (default: onnx)")
    ] = None,
    model_name: Annotated[
        str | None,
        typer.Option("--model-name", help="Name clients use. Default: from the file name."),
    ] = None,
    detach: Annotated[
        bool,
        typer.Option("--detach", help="Return once everything is ready (stop with `down`)."),
    ] = False,
    measure: Annotated[
        bool,
        typer.Option(
            "--measure",
            help="Print the workers' and the front end's measurements and the `ppml policy "
            "allow` commands --tee sim needs (same settings, same measurements); start nothing.",
        ),
    ] = False,
    config: Annotated[
        Path | None, typer.Option("--config", metavar="FILE.toml", help=_CONFIG_HELP)
    ] = None,
    image_mode: Annotated[
        str | None,
        typer.Option(
            "--image-mode",
            help="Take image files (PNG, JPEG, GIF, BMP, WebP) as inputs, decoded by the workers "
            "to L (grey, one channel), RGB or BGR. The other --image-* flags need it.",
        ),
    ] = None,
    image_resize: Annotated[
        str | None,
        typer.Option(
            "--image-resize",
            metavar="H,W|S",
            help="Resize to H,W; or the shorter side to S, keeping the aspect ratio.",
        ),
    ] = None,
    image_crop: Annotated[
        str | None,
        typer.Option(
            "--image-crop",
            metavar="H,W",
            help="Center crop to H,W (after resizing).",
        ),
    ] = None,
    image_layout: Annotated[
        str | None,
        typer.Option(
            "--image-layout",
            help="NCHW (channels first) or NHWC. (default: NCHW)",
        ),
    ] = None,
    image_scale: Annotated[
        str | None,
        typer.Option(
            "--image-scale",
            metavar="X",
            help="Multiply the pixels (0-255) by X, before mean and std; 1/255 is accepted. "
            "(default: 1/255)",
        ),
    ] = None,
    image_mean: Annotated[
        str | None,
        typer.Option(
            "--image-mean",
            metavar="M[,M,M]",
            help="Subtract, per channel (after scaling). (default: 0)",
        ),
    ] = None,
    image_std: Annotated[
        str | None,
        typer.Option(
            "--image-std",
            metavar="S[,S,S]",
            help="Then divide by, per channel. (default: 1)",
        ),
    ] = None,
    image_resample: Annotated[
        str | None,
        typer.Option(
            "--image-resample",
            help="nearest, bilinear, bicubic, lanczos or box. (default: bilinear)",
        ),
    ] = None,
    image_max_bytes: Annotated[
        int | None,
        typer.Option(
            "--image-max-bytes",
            help="Larger image files are refused (413). (default: 524288)",
        ),
    ] = None,
    image_max_pixels: Annotated[
        int | None,
        typer.Option(
            "--image-max-pixels",
            help="Images of more pixels are refused before they are decoded. (default: 16777216)",
        ),
    ] = None,
    workspace: WorkspaceOption = None,
    passphrase_file: PassphraseFileOption = None,
) -> None:
    """Start a serving deployment: redis-server, N workers and the HTTPS front end; print the
    front end's URL once all are ready.

    In the foreground until Ctrl-C or SIGTERM, then everything is stopped; with --detach it
    returns after readiness. State, logs and the deployment's encrypted secrets are under
    <workspace>/serving/ (private). The payload key and the Redis password are never on a
    command line, in an environment or a log. Clients: `ppml.serving.InputQueue(URL)`.
    """
    from ppml.serving.deploy import load_settings

    overrides = {
        "model": model,
        "workers": workers,
        "tee": tee,
        "host": host,
        "port": port,
        "deployment": deployment,
        "runtime": runtime,
        "model_name": model_name,
        "image": {
            "mode": image_mode,
            "resize": image_resize,
            "crop": image_crop,
            "layout": image_layout,
            "scale": image_scale,
            "mean": image_mean,
            "std": image_std,
            "resample": image_resample,
            "max_bytes": image_max_bytes,
            "max_pixels": image_max_pixels,
        },
    }
    settings = load_settings(config, overrides)
    raise typer.Exit(_plan_and_start(settings, detach, measure, workspace, passphrase_file))


def _plan_and_start(
    settings: DeploySettings,
    detach: bool,
    measure: bool,
    workspace: Path | None,
    passphrase_file: Path | None,
) -> int:
    """`up` after its settings: `--measure` prints the measurements, else the deployment runs.
    Returns the exit code."""
    from ppml.serving.deploy import plan_deployment, with_overrides

    if measure:  # the measurements of attested processes
        settings = with_overrides(settings, tee=settings.tee or "sim")
    ws = open_workspace(workspace, passphrase_file)
    if settings.tee is not None and not measure:
        from ppml.tee.launcher import harden_launcher

        harden_launcher()
    if (settings.tee is not None or measure) and not ws.dev:
        raise ConfigurationError(
            "the sim TEE runs only with a development workspace (`ppml init --dev`)",
            path=ws.path,
        )
    with ws.key_service(actor=f"serving-{settings.deployment}") as keys:
        plan = plan_deployment(ws, keys, settings)
        if measure:
            for line in plan.allow_lines():
                typer.echo(line)
            return 0
        return _up(ws, keys, plan, detach)


def _up(ws: Workspace, keys: KeyService, plan: Plan, detach: bool) -> int:
    import contextlib

    from ppml.cli._attested import SIM_NOTICE, loopback_services
    from ppml.serving.deploy import signals_to_event, start_deployment

    def echo(text: str) -> None:
        typer.echo(f"ppml serving: {text}", err=True)

    stop = threading.Event()
    with contextlib.ExitStack() as stack:
        kms_url = None
        if plan.settings.tee is not None:
            typer.echo(SIM_NOTICE, err=True)
            actor = f"sim:serving-{plan.settings.deployment}"
            kms_url = stack.enter_context(loopback_services(ws, actor, None))
        # Signals during start-up stop it too (start_deployment cleans up on any exception).
        stack.enter_context(signals_to_event(stop))
        dep = start_deployment(ws, keys, plan, kms_url=kms_url, echo=echo)
        typer.echo(dep.url)
        if detach:
            dep.close_channels()
            echo("detached; `ppml serving status` to watch, `ppml serving down` to stop")
            return 0
        echo("serving in the foreground; Ctrl-C (or SIGTERM) stops everything")
        try:
            problem = dep.wait(stop)
        finally:
            dep.stop()
        if problem is not None:
            echo(f"{problem}; stopped everything")
            return 0 if problem.startswith("stopped by") else 1
        echo("stopped")
        return 0
    return 0  # pragma: no cover -- ExitStack does not swallow exceptions


@serving_app.command("status")
def status(fmt: FormatOption = "text", workspace: WorkspaceOption = None) -> None:
    """Show the deployment: URL, processes (alive or not), health and queue depth (needs no
    passphrase). Exits 1 when no deployment is recorded."""
    from ppml.cli._common import check_format, workspace_dir
    from ppml.serving.deploy import deployment_status, serving_dir_of

    check_format(fmt)
    info = deployment_status(serving_dir_of(workspace_dir(workspace)))
    if info is None:
        if fmt == "json":
            print_json({"running": False})
        else:
            typer.echo("no serving deployment")
        raise typer.Exit(1)
    info["running"] = True
    if fmt == "json":
        print_json(info)
        return

    def state(p: dict[str, Any] | None) -> str:
        return "missing" if p is None else ("up" if p["alive"] else "DOWN")

    typer.echo(
        f"deployment {info['deployment']}  {info['url']}  {info['status']}  "
        f"tee {info['tee'] or 'none'}  {'healthy' if info['healthy'] else 'UNHEALTHY'}  "
        f"queue depth {info['queue_depth'] if info['queue_depth'] is not None else '?'}"
    )
    redis = info["redis"]
    typer.echo(
        f"redis     pid {redis and redis['pid']}  {state(redis)}  port {redis and redis['port']}"
    )
    front = info["frontend"]
    typer.echo(
        f"front end pid {front and front['pid']}  {state(front)}  log {front and front['log']}"
    )
    for n, w in enumerate(info["workers"]):
        typer.echo(f"worker {n}  pid {w and w['pid']}  {state(w)}  log {w and w['log']}")


@serving_app.command("down")
def down(workspace: WorkspaceOption = None) -> None:
    """Stop the front end, the workers (each finishes its batch) and redis-server (it flushes
    its AOF); needs no passphrase. Accepted requests stay in Redis for the next `up`."""
    from ppml.cli._common import workspace_dir
    from ppml.serving.deploy import serving_dir_of, stop_deployment

    stopped = stop_deployment(serving_dir_of(workspace_dir(workspace)))
    typer.echo(f"stopped {stopped} process(es)")


client_app = typer.Typer(
    help="Clients of the serving front ends: certificates of the workspace CA (mutual TLS).",
    no_args_is_help=True,
)
serving_app.add_typer(client_app, name="client")


@client_app.command("issue")
def client_issue(
    name: Annotated[
        str,
        typer.Argument(help="The client's name (its results are its own): 1-64 of a-z 0-9 . _ -"),
    ],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Directory to write NAME.pem and NAME-key.pem into."),
    ] = Path("."),
    days: Annotated[int, typer.Option("--days", help="Validity in days.")] = 365,
    key_password_file: Annotated[
        Path | None,
        typer.Option(
            "--key-password-file",
            help="Encrypt the private key (PKCS#8) with the password in this file (first line). "
            "Without it the key is written unencrypted, mode 0600, for the client to keep.",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing files.")] = False,
    workspace: WorkspaceOption = None,
    passphrase_file: PassphraseFileOption = None,
) -> None:
    """Issue a client certificate for the serving front ends, signed by the workspace CA.

    The front ends accept a client that presents it (mutual TLS): its request ids and results
    are its own. Hand NAME.pem and NAME-key.pem to the client; with the Python client,
    `InputQueue(url, ca="ca.pem", cert=("NAME.pem", "NAME-key.pem"))`.
    """
    import datetime as dt

    from cryptography.hazmat.primitives import serialization

    from ppml import names
    from ppml._internal.fs import write_private
    from ppml.errors import OutputExists, UsageError
    from ppml.workspace import pki

    names.CLIENT.check(name)
    if not 1 <= days <= 3650:
        raise UsageError("--days must be 1 to 3650")
    password: str | None = None
    if key_password_file is not None:
        try:
            password = key_password_file.read_text().splitlines()[0]
        except (OSError, IndexError):
            raise UsageError("cannot read a password from it", path=key_password_file) from None
        if len(password) < 8:
            raise UsageError("the key password must be 8 characters or more")
    if not out.is_dir():
        raise UsageError("not a directory", path=out)
    cert_path, key_path = out / f"{name}.pem", out / f"{name}-key.pem"
    for path in (cert_path, key_path):
        if path.exists() and not force:
            raise OutputExists("output exists (use --force to replace it)", path=path)
    ws = open_workspace(workspace, passphrase_file)
    now = dt.datetime.now(dt.UTC)
    issued = pki.issue_serving_client(
        ws.certificate_authority(), name, now, dt.timedelta(days=days)
    )
    key_pem = (
        pki.encrypted_key_pem(issued.key, password)
        if password is not None
        else pki.private_key_pem(issued.key)
    )
    write_private(key_path, key_pem)
    write_private(cert_path, issued.cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    typer.echo(f"certificate  {cert_path}")
    typer.echo(f"private key  {key_path} (0600{', encrypted' if password else ''})")
    typer.echo(f"CA           {ws.ca_cert}")
    typer.echo(f"valid until  {issued.cert.not_valid_after_utc.isoformat()}")
