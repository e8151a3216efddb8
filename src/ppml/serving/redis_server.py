"""Running the serving queue's Redis for a workspace: TLS only, password, AOF, loopback.

`start_redis(ws)` starts ``redis-server`` with a configuration file that ppml writes, mode 0600,
in a private (0700) directory (default ``<workspace>/serving/redis/``), which also holds the
data (AOF) and the log::

    port 0                          # no plaintext listener
    tls-port <port>                 # TLS 1.2/1.3 only
    tls-cert-file / tls-key-file    # the workspace's server certificate and key
    tls-ca-cert-file                # the workspace CA
    tls-auth-clients no             # clients authenticate with the password, not a certificate
    requirepass <redis-password>    # a sealed workspace secret, made on first use
    bind 127.0.0.1, protected-mode yes
    appendonly yes, appendfsync everysec, save ""   # AOF in the private directory
    maxmemory-policy noeviction     # never evict accepted requests; writes fail when full

The password is never on a command line (``ps`` shows only the configuration file's path), in
the environment, in logs or in exception texts. Clients (`RedisServer.client`) verify the
server's certificate against the workspace CA and its host name, and send the password.

The server is restartable on the same directory (and port): accepted requests survive a restart,
up to the last second of writes (``appendfsync everysec``) after a crash, none after a clean
stop (SIGTERM makes Redis flush the AOF).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from ppml._internal.fs import ensure_private_dir, write_private
from ppml.errors import ConfigurationError, SecretNotFound, UsageError

if TYPE_CHECKING:
    import redis

    from ppml.workspace import Workspace

__all__ = [
    "REDIS_PASSWORD_SECRET",
    "RedisServer",
    "redis_password",
    "start_redis",
]

REDIS_PASSWORD_SECRET: Final = "redis-password"  # noqa: S105 -- a secret's name, not its value
_HOST: Final = "127.0.0.1"
_PASSWORD = re.compile(r"[A-Za-z0-9_.~+/=-]{16,512}")
_BAD_PATH_CHARS = frozenset('"\\\n\r\0')
_INSTALL_HINT: Final = "install it (e.g. `apt-get install redis-server`)"


def redis_password(ws: Workspace, *, create: bool = True) -> str:
    """The workspace's ``redis-password`` secret; made (random, 256 bits) if missing and
    `create` is true."""
    try:
        return ws.secret(REDIS_PASSWORD_SECRET)
    except SecretNotFound:
        if not create:
            raise
    password = secrets.token_urlsafe(32)
    ws.set_secret(REDIS_PASSWORD_SECRET, password)
    return password


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((_HOST, 0))
        return int(s.getsockname()[1])


def _quoted_path(path: Path) -> str:
    text = str(path)
    if any(c in _BAD_PATH_CHARS for c in text):
        raise ConfigurationError("a path for redis-server holds quotes or control characters")
    return f'"{text}"'


def _check_private_key(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigurationError("the workspace's TLS server key is missing", path=path) from None
    if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigurationError(
            "the TLS server key must be owned by this user and readable by nobody else (chmod 600)",
            path=path,
        )


def _config_text(
    ws: Workspace,
    data_dir: Path,
    log_file: Path,
    port: int,
    password: str,
    maxmemory: str | None,
    tls_password: str,
) -> str:
    lines = [
        "# Written by ppml; holds the Redis password and the TLS key's: keep private (0600).",
        "daemonize no",
        f"bind {_HOST}",
        "protected-mode yes",
        "port 0",
        f"tls-port {port}",
        f"tls-cert-file {_quoted_path(ws.server_cert)}",
        f"tls-key-file {_quoted_path(ws.server_key)}",
        f'tls-key-file-pass "{tls_password}"',
        f"tls-ca-cert-file {_quoted_path(ws.ca_cert)}",
        "tls-auth-clients no",
        'tls-protocols "TLSv1.2 TLSv1.3"',
        "tls-prefer-server-ciphers yes",
        f'requirepass "{password}"',
        f"dir {_quoted_path(data_dir)}",
        f"logfile {_quoted_path(log_file)}",
        "appendonly yes",
        "appendfsync everysec",
        'save ""',
        "maxmemory-policy noeviction",
    ]
    if maxmemory is not None:
        if not re.fullmatch(r"[0-9]+(?:[kKmMgG][bB]?)?", maxmemory):
            raise UsageError(f"invalid maxmemory {maxmemory!r}: use e.g. 256mb")
        lines.append(f"maxmemory {maxmemory}")
    return "\n".join(lines) + "\n"


@dataclass
class RedisServer:
    """A running (or stopped) redis-server of one workspace. Use `client()` to connect."""

    host: str
    port: int
    directory: Path
    executable: str
    _ca_cert: Path
    _password: str = field(repr=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def config_file(self) -> Path:
        return self.directory / "redis.conf"

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def log_file(self) -> Path:
        return self.directory / "redis.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("a RedisServer holds the Redis password and cannot be pickled")

    def client(self, **kwargs: Any) -> redis.Redis:
        """A client over TLS (server certificate checked against the workspace CA, host name
        included) that sends the password. `decode_responses` stays False (payloads are
        binary); other keyword arguments (not the TLS ones) go to ``redis.Redis``."""
        import redis

        if any(k == "ssl" or k.startswith(("ssl_", "host", "port")) for k in kwargs):
            raise UsageError("the TLS settings, host and port of a Redis client are fixed")
        options: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "password": self._password,
            "ssl": True,
            "ssl_ca_certs": str(self._ca_cert),
            "ssl_cert_reqs": "required",
            "ssl_check_hostname": True,
            "socket_timeout": 30.0,
            "socket_connect_timeout": 10.0,
            "health_check_interval": 30,
            **kwargs,
        }
        return redis.Redis(**options)

    # -- life cycle ----------------------------------------------------------------------------

    def start(self, *, timeout: float = 15.0) -> None:
        """Start redis-server (if not running) and wait until it answers PING over TLS."""
        if self.running:
            return
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TZ")}
        self._process = subprocess.Popen(  # noqa: S603 -- fixed argv, no shell
            [self.executable, str(self.config_file)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            cwd=self.directory,
            start_new_session=True,  # a Ctrl-C in the terminal does not kill it half-way
        )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        deadline = time.monotonic() + timeout
        client = self.client(
            socket_timeout=2.0, socket_connect_timeout=2.0, retry=Retry(NoBackoff(), 0)
        )
        try:
            while True:
                assert self._process is not None
                if self._process.poll() is not None:
                    details = self._diagnostics()
                    self.stop()
                    raise ConfigurationError("redis-server exited while starting" + details)
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    details = self._diagnostics()
                    raise ConfigurationError(
                        f"redis-server did not answer within {timeout:g}s" + details
                    )
                time.sleep(0.05)
        finally:
            client.close()

    def _diagnostics(self) -> str:
        """The last lines of redis's log and stderr, with the password masked."""
        text = ""
        with contextlib.suppress(OSError):
            text += self.log_file.read_text(errors="replace")[-4000:]
        if self._process is not None and self._process.stderr is not None:
            with contextlib.suppress(OSError, ValueError):
                if self._process.poll() is not None:
                    text += self._process.stderr.read(4000).decode(errors="replace")
        lines = [
            ln.replace(self._password, "***")
            for ln in text.splitlines()
            if ln.strip() and "requirepass" not in ln
        ][-8:]
        return (": " + " | ".join(lines)) if lines else ""

    def stop(self, *, timeout: float = 15.0) -> None:
        """Stop redis-server (SIGTERM: it flushes the AOF; SIGKILL after `timeout`)."""
        proc, self._process = self._process, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def kill(self) -> None:
        """Kill redis-server at once (SIGKILL), as a crash would: for tests."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self.stop()

    def restart(self, *, timeout: float = 15.0) -> None:
        """Stop and start again on the same directory and port."""
        self.stop(timeout=timeout)
        self.start(timeout=timeout)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_redis(
    ws: Workspace,
    *,
    directory: Path | None = None,
    port: int | None = None,
    maxmemory: str | None = None,
    timeout: float = 15.0,
) -> RedisServer:
    """Start the workspace's Redis and return it once it answers PING over TLS.

    `directory` (default ``<workspace>/serving/redis``) is made private (0700) and holds the
    configuration (0600), the AOF (``data/``) and the log; start again on the same directory to
    find the accepted requests. `port` defaults to a free loopback port. `maxmemory` (e.g.
    ``"256mb"``) bounds Redis's memory (writes fail beyond it: noeviction).
    """
    executable = shutil.which("redis-server")
    if executable is None:
        raise ConfigurationError(f"redis-server was not found on PATH; {_INSTALL_HINT}")
    _check_private_key(ws.server_key)
    directory = Path(directory) if directory is not None else ws.path / "serving" / "redis"
    directory = directory.absolute()
    ensure_private_dir(directory)
    data_dir = directory / "data"
    ensure_private_dir(data_dir)
    password = redis_password(ws)
    if not _PASSWORD.fullmatch(password):
        raise ConfigurationError(
            f"the workspace secret {REDIS_PASSWORD_SECRET!r} must be 16-512 URL-safe characters"
        )
    if port is None:
        port = _free_port()
    if not 0 < port < 65536:
        raise UsageError(f"invalid port {port}")
    server = RedisServer(
        host=_HOST,
        port=port,
        directory=directory,
        executable=executable,
        _ca_cert=ws.ca_cert,
        _password=password,
    )
    tls_password = ws.tls_key_password()
    if not _PASSWORD.fullmatch(tls_password):
        raise ConfigurationError("the workspace's TLS key password must be URL-safe characters")
    text = _config_text(ws, data_dir, server.log_file, port, password, maxmemory, tls_password)
    write_private(server.config_file, text.encode())
    server.start(timeout=timeout)
    return server
