"""The local platform: an MLflow tracking server and an S3-compatible object store on loopback, so the recipe
runs on one machine against the same kind of remote services it uses on a cluster (`make platform-up`).

```
moto server (S3)         127.0.0.1:<port>   buckets vlpipe-data, vlpipe-models, vlpipe-mlflow
mlflow server            127.0.0.1:<port>   sqlite backend under the platform directory, basic auth,
                                            proxied artifacts → s3://vlpipe-mlflow/artifacts (moto)
```

`up` starts both servers as background processes (own process groups, logs under
`<VLPIPE_HOME>/platform/`), waits until they answer, creates the buckets, and writes the environment a client
needs to `<VLPIPE_HOME>/platform/env` (mode 0600): `MLFLOW_TRACKING_URI`, `MLFLOW_TRACKING_USERNAME` /
`MLFLOW_TRACKING_PASSWORD` (the admin of the auth app), `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`. The credentials are random per `up` and live only in that
file and the servers' environments: never in code, logs or MLflow. `down` stops the servers (SIGTERM, then
SIGKILL after a grace period) and, with `purge`, deletes the platform directory.

Both servers bind 127.0.0.1 only. The MLflow server reaches moto through `MLFLOW_S3_ENDPOINT_URL`; clients
never talk to the artifact bucket for MLflow artifacts (proxied through `mlflow-artifacts:/`), but they do
for data and checkpoints (`s3://vlpipe-data`, `s3://vlpipe-models`), as pipeline steps do on a cluster.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlpipe.model.storage import vlpipe_home

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
DATA_BUCKET = "vlpipe-data"
MODELS_BUCKET = "vlpipe-models"
MLFLOW_BUCKET = "vlpipe-mlflow"
BUCKETS = (DATA_BUCKET, MODELS_BUCKET, MLFLOW_BUCKET)
REGION = "us-east-1"
ADMIN_USERNAME = "admin"
STATE_FILE = "state.json"
ENV_FILE = "env"
START_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0
CREDENTIAL_VARIABLES = ("MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID")
"""Variables of the platform's environment whose values are secrets (never printed by `status`)."""


class PlatformError(RuntimeError):
    """The platform could not be started, found or stopped (the message says what to do)."""


def platform_dir(home: Path | None = None) -> Path:
    """`<VLPIPE_HOME>/platform`: servers' state, logs, stores and the environment file."""
    return (home or vlpipe_home()) / "platform"


@dataclass(frozen=True)
class Platform:
    """A running local platform, as recorded in its state file."""

    directory: Path
    s3_port: int
    mlflow_port: int
    pids: dict[str, int]
    env: dict[str, str]

    @property
    def tracking_uri(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{HOST}:{self.s3_port}"

    def export_lines(self) -> str:
        """The environment as `export NAME=value` lines (what `up` writes to the env file)."""
        return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in sorted(self.env.items()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of this process still "exists"; reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == 0


def _bin(name: str) -> str:
    """An executable of this environment (the venv's `mlflow`, `moto_server`), else from PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise PlatformError(f"{name} is not installed; run `make install` (it comes with the dev extras)")
    return found


def _wait_http(url: str, *, pid: int, name: str, log_file: Path, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            raise PlatformError(f"{name} exited while starting; see {log_file}:\n{_tail(log_file)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.5)
    raise PlatformError(f"{name} did not answer {url} within {timeout:.0f} s; see {log_file}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _spawn(command: list[str], *, env: dict[str, str], log_file: Path, cwd: Path) -> int:
    with open(log_file, "ab") as out:
        process = subprocess.Popen(
            command,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            start_new_session=True,  # its own process group: `down` stops the server and its workers
        )
    return process.pid


def _server_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without any MLflow/AWS settings of another platform, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "AWS_")) and k not in ("VLPIPE_HOME",)
    }
    env.update(extra)
    return env


def load(home: Path | None = None) -> Platform | None:
    """The running platform recorded under `home`, or None when none is recorded or its servers are gone."""
    directory = platform_dir(home)
    state_file = directory / STATE_FILE
    if not state_file.exists():
        return None
    state = json.loads(state_file.read_text())
    platform = Platform(
        directory=directory,
        s3_port=state["s3_port"],
        mlflow_port=state["mlflow_port"],
        pids=state["pids"],
        env=_read_env(directory / ENV_FILE),
    )
    if not all(_alive(pid) for pid in platform.pids.values()):
        return None
    return platform


def _read_env(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").partition("=")
            env[name] = shlex.split(value)[0] if value else ""
    return env


def up(home: Path | None = None, *, auth: bool = True) -> Platform:
    """Start the local platform (or return the one already running under `home`).

    Args:
        home: the VLPIPE_HOME whose `platform/` directory holds state, logs and stores.
        auth: run the MLflow server with basic auth (its `basic-auth` app; the admin password is random).

    Raises:
        PlatformError: a server failed to start (its log's tail is in the message); nothing is left running.
    """
    running = load(home)
    if running is not None:
        log.info("the local platform is already running (%s)", running.tracking_uri)
        return running
    directory = platform_dir(home)
    directory.mkdir(parents=True, exist_ok=True)
    down(home)  # a stale state file (servers gone): clean up what is left
    s3_port, mlflow_port = _free_port(), _free_port()
    access_key = "vlpipe" + secrets.token_hex(6)
    secret_key = secrets.token_urlsafe(24)
    s3 = {
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_DEFAULT_REGION": REGION,
    }
    pids: dict[str, int] = {}
    try:
        moto_log = directory / "moto.log"
        pids["moto"] = _spawn(
            [_bin("moto_server"), "-H", HOST, "-p", str(s3_port)],
            env=_server_env(s3),
            log_file=moto_log,
            cwd=directory,
        )
        endpoint = f"http://{HOST}:{s3_port}"
        _wait_http(f"{endpoint}/moto-api/", pid=pids["moto"], name="moto server", log_file=moto_log)
        _create_buckets(endpoint, s3)

        mlflow_env = {**s3, "MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL": endpoint}
        command = [
            _bin("mlflow"),
            "server",
            "--host",
            HOST,
            "--port",
            str(mlflow_port),
            "--backend-store-uri",
            f"sqlite:///{directory / 'mlflow.db'}",
            "--serve-artifacts",
            "--artifacts-destination",
            f"s3://{MLFLOW_BUCKET}/artifacts",
            "--workers",
            "2",
        ]
        client_env: dict[str, str] = {}
        if auth:
            password = secrets.token_urlsafe(18)
            auth_ini = directory / "basic_auth.ini"
            auth_ini.write_text(
                "[mlflow]\n"
                "default_permission = READ\n"
                f"database_uri = sqlite:///{directory / 'auth.db'}\n"
                f"admin_username = {ADMIN_USERNAME}\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            )
            command += ["--app-name", "basic-auth"]
            mlflow_env.update(
                MLFLOW_AUTH_CONFIG_PATH=str(auth_ini),
                MLFLOW_AUTH_ADMIN_USERNAME=ADMIN_USERNAME,
                MLFLOW_AUTH_ADMIN_PASSWORD=password,
                # CSRF protection of the auth app's forms; one key per platform (random, server-side only).
                MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_urlsafe(32),
            )
            client_env = {"MLFLOW_TRACKING_USERNAME": ADMIN_USERNAME, "MLFLOW_TRACKING_PASSWORD": password}
        mlflow_log = directory / "mlflow.log"
        pids["mlflow"] = _spawn(command, env=_server_env(mlflow_env), log_file=mlflow_log, cwd=directory)
        tracking = f"http://{HOST}:{mlflow_port}"
        _wait_http(f"{tracking}/health", pid=pids["mlflow"], name="mlflow server", log_file=mlflow_log)
    except BaseException:
        _stop(pids)
        raise
    env = {
        "MLFLOW_TRACKING_URI": tracking,
        "AWS_ENDPOINT_URL": endpoint,
        **s3,
        **client_env,
    }
    env_file = directory / ENV_FILE
    env_file.touch(mode=0o600)
    os.chmod(env_file, 0o600)
    platform = Platform(directory, s3_port, mlflow_port, pids, env)
    env_file.write_text(platform.export_lines())
    (directory / STATE_FILE).write_text(
        json.dumps({"s3_port": s3_port, "mlflow_port": mlflow_port, "pids": pids, "auth": auth}, indent=2)
    )
    log.info("local platform up: MLflow %s, S3 %s", tracking, endpoint)
    return platform


def _create_buckets(endpoint: str, credentials: dict[str, str]) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"],
        region_name=credentials["AWS_DEFAULT_REGION"],
    )
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for bucket in BUCKETS:
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)


def _stop(pids: dict[str, int]) -> list[str]:
    """SIGTERM each server's process group, SIGKILL what is left after the grace period."""
    stopped = []
    for name, pid in pids.items():
        try:
            os.killpg(pid, signal.SIGTERM)
            stopped.append(name)
        except (ProcessLookupError, PermissionError):
            continue
    deadline = time.monotonic() + STOP_GRACE_S
    for pid in pids.values():
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    return stopped


def down(home: Path | None = None, *, purge: bool = False) -> list[str]:
    """Stop the platform recorded under `home`; returns the names of the servers stopped.

    Args:
        purge: also delete the platform directory (stores, logs, environment file).
    """
    directory = platform_dir(home)
    state_file = directory / STATE_FILE
    stopped: list[str] = []
    if state_file.exists():
        stopped = _stop(json.loads(state_file.read_text()).get("pids", {}))
        state_file.unlink()
    env_file = directory / ENV_FILE
    if env_file.exists():
        env_file.unlink()
    if purge and directory.exists():
        shutil.rmtree(directory)
    return stopped


def status(home: Path | None = None) -> dict[str, Any]:
    """What is running: URLs, pids and the environment with credentials masked."""
    platform = load(home)
    if platform is None:
        return {"running": False, "directory": str(platform_dir(home))}
    env = {k: ("***" if k in CREDENTIAL_VARIABLES else v) for k, v in platform.env.items()}
    return {
        "running": True,
        "directory": str(platform.directory),
        "tracking_uri": platform.tracking_uri,
        "s3_endpoint": platform.s3_endpoint,
        "pids": platform.pids,
        "env": env,
        "env_file": str(platform.directory / ENV_FILE),
    }
