"""`ppml serving up|status|down`: one serving deployment of a workspace, as processes.

A deployment is redis-server (`start_redis`: TLS only, password, AOF), one HTTPS front end
(``python -m ppml.server.serving_frontend_main``, the HTTP side lives in `ppml.server`) and N
workers (``python -m ppml.serving.worker``), all on this machine, each in its own session,
logging to ``<workspace>/serving/logs/`` (0600). The state (pids with their start times, ports,
paths; nothing secret) is ``<workspace>/serving/deployment.json`` (0600, in a 0700 directory).
One deployment per workspace: `up` refuses while a recorded process still runs. A worker tells
`up` it serves by writing a line to the pipe it inherits as ``$PPML_SERVING_READY_FD``; the
front end is ready when its ``/healthz`` answers; `status` reads the queue's depth from the
front end's ``/queue``.

The modules: `settings` (flags and TOML), `plan` (the commands, the measurements, the secret
files), `supervise` (starting and stopping processes), `state` (the recorded deployment),
`lifecycle` (start, stop, status). What the processes share is `ppml.serving.contract`.

Keys
----
- **Payload key.** Queue payloads are sealed with a per-deployment 32-byte AES key
  (`PayloadCodec`). It lives in ``<workspace>/serving/<deployment>/payload.key.ppml``: a
  ppml-encrypted file under the KMS named key ``serving-<deployment>`` (created when missing),
  made once and kept across `down`/`up` so that requests kept in Redis's AOF stay readable.
  The file's header holds the wrapped data key; a process gets the payload key by unwrapping it
  through its key provider (`read_secret_file`).
- **Redis password.** The workspace secret ``redis-password`` (`redis_password`), copied into
  ``<workspace>/serving/<deployment>/redis-password.ppml``, encrypted under the same key.
- **Model key.** The model file is ppml-encrypted under whatever key its owner chose
  (``models`` typically); workers decrypt it in memory.

With ``--tee sim`` every front end and worker is an attested child exactly as under `ppml run
--tee sim`: the `up` process serves the attestation service and the KMS on loopback TLS and an
evidence channel per child; keys are released by the keys' policies only, so
``serving-<deployment>`` must allow the worker's and the front end's measurements and the model's
key the worker's. `ppml serving up --measure` prints both and the `ppml policy allow` lines. The
measured argv holds only what is stable for a deployment (model path, deployment name, the
secret files' paths, batch and front-end settings); what changes per start (the Redis port, the
listening socket the front end inherits) comes in environment variables whose *names* are
measured (``PPML_SERVING_REDIS_PORT``, ``PPML_SERVING_LISTEN_FD``). A detached deployment keeps
its keys in its processes' memory; the loopback KMS stops when `up` returns (a restarted worker
needs a new `up`).

Without ``--tee`` (development) no child gets the passphrase or the workspace: the `up` process
unwraps exactly the data keys each child needs (the model's, the payload key file's, the
password file's) and writes them to the child's stdin (a pipe, closed at once;
``--keys-from-stdin``). Nothing secret is ever on a command line, in an environment or a log.

The front end needs the model's signature (`ModelInfo`) without the model: the `up` process,
which holds the workspace (it is the KMS of the deployment), loads the model once in memory,
which also refuses a missing, plaintext or invalid model before anything starts, and passes the
signature on the front end's command line as one ``--model-info`` JSON (so it is measured too).
"""

from __future__ import annotations

from ppml.serving.contract import LISTEN_FD_ENV, StaticKeyProvider, read_key_bundle
from ppml.serving.deploy.lifecycle import (
    Deployment,
    deployment_status,
    start_deployment,
    stop_deployment,
)
from ppml.serving.deploy.plan import Plan, plan_deployment, serving_dir_of
from ppml.serving.deploy.settings import (
    CONFIG_KEYS,
    DeploySettings,
    load_settings,
    with_overrides,
)
from ppml.serving.deploy.state import DeploymentState, read_state
from ppml.serving.deploy.supervise import signals_to_event

__all__ = [
    "CONFIG_KEYS",
    "LISTEN_FD_ENV",
    "DeploySettings",
    "Deployment",
    "DeploymentState",
    "Plan",
    "StaticKeyProvider",
    "deployment_status",
    "load_settings",
    "plan_deployment",
    "read_key_bundle",
    "read_state",
    "serving_dir_of",
    "signals_to_event",
    "start_deployment",
    "stop_deployment",
    "with_overrides",
]
