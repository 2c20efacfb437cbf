"""The local platform: an MLflow tracking server and an S3-compatible object store on loopback, so the recipe
runs on one machine against the same kind of remote services it uses on a cluster (`make platform-up`).

```
S3 store (moto)          127.0.0.1:<port>   buckets vlpipe-data, vlpipe-models, vlpipe-mlflow; SigV4 with the
                                            platform's key only; objects written through to platform/s3/
mlflow server            127.0.0.1:<port>   sqlite backend under the platform directory, basic auth,
                                            proxied artifacts → s3://vlpipe-mlflow/artifacts
```

`up` starts both servers as background processes (own process groups, logs under `<VLPIPE_HOME>/platform/`),
waits until they answer, creates the buckets, and writes the environment a client needs to
`<VLPIPE_HOME>/platform/env`: `MLFLOW_TRACKING_URI`, `MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD`
(the admin of the auth app), `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_DEFAULT_REGION`. `down` stops the servers (SIGTERM, then SIGKILL after a grace period) and removes the
env file; with `purge` it deletes the whole platform directory.

What survives `down` → `up` (and a killed server):

- **Credentials.** Drawn once, on the first `up`, into `platform/credentials.json` and reused by every later
  `up` until `down --purge`: the S3 key, the MLflow admin password (whose hash the auth app keeps in
  `auth.db`, so a new password would lock every client out) and the auth app's session key. They reach the
  servers through their environments only (never a command line, log or MLflow param).
- **Runs and artifacts.** MLflow's sqlite stores, and the S3 store's objects, which `infra/s3_store.py`
  writes through to `platform/s3/` before acknowledging a write and loads back at start.

Every file that holds a credential or its hash (`credentials.json`, `env`, `auth.db`, `basic_auth.ini`) is
created 0600 (written through `os.open(..., 0o600)`, and the servers run with umask 077), inside a 0700
directory; `up` also tightens such files left by older versions. Ports are new at every `up` (`source` the
env file again): the S3 store binds a free port itself and reports it, and the MLflow server's port counts
as taken only once a process of its own process group listens on it, so two platforms started at once (say
from two checkouts) cannot end up talking to each other's servers.
"""

from __future__ import annotations

import base64
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
CREDENTIALS_FILE = "credentials.json"
AUTH_DB = "auth.db"
AUTH_INI = "basic_auth.ini"
S3_DATA_DIR = "s3"
PRIVATE_FILES = (CREDENTIALS_FILE, ENV_FILE, AUTH_DB, AUTH_INI, "mlflow.db")
"""Files of the platform directory that hold a credential, its hash or the runs: mode 0600."""
MLFLOW_START_ATTEMPTS = 3
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


def _listener_in_group(port: int, group: int) -> bool | None:
    """Whether a process of process group `group` holds the TCP socket listening on `port`.

    None where /proc cannot tell (not Linux). Another server on the same port (a platform started at the same
    moment that was handed the same free port) answers HTTP just as well; this is what tells them apart.
    """
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not tables[0].exists():
        return None
    inodes = set()
    for table in tables:
        with contextlib.suppress(OSError):
            for line in table.read_text().splitlines()[1:]:
                fields = line.split()
                # local_address is HEXIP:HEXPORT; state 0A is LISTEN; field 9 the socket's inode
                if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return False
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) != group:  # fields after the command: state ppid pgrp
                continue
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                return True
        except (OSError, ValueError, IndexError):
            continue
    return False


def _wait_http(
    url: str,
    *,
    pid: int,
    name: str,
    log_file: Path,
    port: int | None = None,
    timeout: float = START_TIMEOUT_S,
) -> None:
    """Poll `url` until the server answers (below 500); with `port`, only an answer from a socket that the
    process group of `pid` listens on counts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            raise PlatformError(f"{name} exited while starting; see {log_file}:\n{_tail(log_file)}")
        if port is None or _listener_in_group(port, pid) is not False:
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


def _tail(path: Path, lines: int = 20, offset: int = 0) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` (replaced atomically) through a file created 0600: never readable by others,
    not even for a moment."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _private_directory(directory: Path) -> None:
    """Create the platform directory 0700 and make the credential files an older version left 0600."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    for name in PRIVATE_FILES:
        for path in directory.glob(f"{name}*"):  # sqlite's -journal/-wal/-shm beside a database too
            if path.is_file() and path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)


def _credentials(directory: Path) -> tuple[dict[str, str], bool]:
    """The platform's credentials from `credentials.json`, drawn (and written 0600) on the first `up`.

    Returns:
        the credentials and whether they were drawn just now.
    """
    path = directory / CREDENTIALS_FILE
    stored: dict[str, str] = {}
    if path.exists():
        try:
            stored = json.loads(path.read_text())
        except ValueError:
            stored = None  # type: ignore[assignment]
        if not isinstance(stored, dict):
            raise PlatformError(
                f"{path} is not a JSON object; restore it, or run `vlpipe platform down --purge` to start "
                "afresh (this deletes the platform's runs and objects)"
            )
    fresh = {
        # AWS's key format (AKIA + 16 base32 characters); the secret is as long as AWS's.
        "aws_access_key_id": "AKIA" + base64.b32encode(secrets.token_bytes(10)).decode(),
        "aws_secret_access_key": secrets.token_urlsafe(30),
        "mlflow_admin_password": secrets.token_urlsafe(18),
        # Signs the auth app's sessions and CSRF tokens; kept so they stay valid across restarts.
        "flask_secret_key": secrets.token_urlsafe(32),
    }
    credentials = {**fresh, **{k: v for k, v in stored.items() if k in fresh and isinstance(v, str) and v}}
    if credentials != stored:
        _write_private(path, json.dumps(credentials, indent=2) + "\n")
    return credentials, not stored


def _spawn(command: list[str], *, env: dict[str, str], log_file: Path, cwd: Path) -> int:
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab") as out:
        process = subprocess.Popen(
            command,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            start_new_session=True,  # its own process group: `down` stops the server and its workers
            umask=0o077,  # what the servers create (auth.db, mlflow.db, stored objects) is private
        )
    return process.pid


def _server_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without any MLflow/AWS settings of another platform, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "AWS_", "VLPIPE_S3_")) and k not in ("VLPIPE_HOME",)
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

    The credentials, runs and S3 objects of an earlier `up` under the same `home` are kept (see the module's
    docstring); ports are new.

    Args:
        home: the VLPIPE_HOME whose `platform/` directory holds state, logs and stores.
        auth: run the MLflow server with basic auth (its `basic-auth` app; admin password in credentials.json).

    Raises:
        PlatformError: a server failed to start (its log's tail is in the message); nothing is left running.
    """
    running = load(home)
    if running is not None:
        log.info("the local platform is already running (%s)", running.tracking_uri)
        return running
    directory = platform_dir(home)
    _private_directory(directory)
    down(home)  # a stale state file (servers gone): clean up what is left
    credentials, drawn = _credentials(directory)
    s3 = {
        "AWS_ACCESS_KEY_ID": credentials["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": credentials["aws_secret_access_key"],
        "AWS_DEFAULT_REGION": REGION,
    }
    pids: dict[str, int] = {}
    try:
        pids["moto"], s3_port = _start_s3_store(directory, s3)
        endpoint = f"http://{HOST}:{s3_port}"
        _create_buckets(endpoint, s3)
        client_env: dict[str, str] = {}
        mlflow_env = {**s3, "MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL": endpoint}
        if auth:
            password = credentials["mlflow_admin_password"]
            auth_db = directory / AUTH_DB
            if drawn and auth_db.exists():
                # auth.db of a platform whose password is lost (an older version drew one per `up`).
                _reset_admin_password(auth_db, password)
            _write_private(
                directory / AUTH_INI,
                "[mlflow]\n"
                "default_permission = READ\n"
                f"database_uri = sqlite:///{auth_db}\n"
                f"admin_username = {ADMIN_USERNAME}\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
            )
            mlflow_env.update(
                MLFLOW_AUTH_CONFIG_PATH=str(directory / AUTH_INI),
                MLFLOW_AUTH_ADMIN_USERNAME=ADMIN_USERNAME,
                MLFLOW_AUTH_ADMIN_PASSWORD=password,
                # CSRF protection of the auth app's forms (server-side only).
                MLFLOW_FLASK_SERVER_SECRET_KEY=credentials["flask_secret_key"],
            )
            client_env = {"MLFLOW_TRACKING_USERNAME": ADMIN_USERNAME, "MLFLOW_TRACKING_PASSWORD": password}
        pids["mlflow"], mlflow_port = _start_mlflow(directory, mlflow_env, auth=auth)
        tracking = f"http://{HOST}:{mlflow_port}"
        if auth:
            _check_admin_login(tracking, directory, client_env)
    except BaseException:
        _stop(pids)
        raise
    env = {
        "MLFLOW_TRACKING_URI": tracking,
        "AWS_ENDPOINT_URL": endpoint,
        **s3,
        **client_env,
    }
    platform = Platform(directory, s3_port, mlflow_port, pids, env)
    _write_private(directory / ENV_FILE, platform.export_lines())
    (directory / STATE_FILE).write_text(
        json.dumps({"s3_port": s3_port, "mlflow_port": mlflow_port, "pids": pids, "auth": auth}, indent=2)
    )
    log.info("local platform up: MLflow %s, S3 %s", tracking, endpoint)
    return platform


def _start_s3_store(directory: Path, s3: dict[str, str]) -> tuple[int, int]:
    """Start `infra/s3_store.py` on a port it picks itself; returns its pid and port."""
    log_file = directory / "moto.log"
    port_file = directory / "s3.port"
    port_file.unlink(missing_ok=True)
    pid = _spawn(
        [
            sys.executable,
            "-m",
            "vlpipe.infra.s3_store",
            "--host",
            HOST,
            "--port",
            "0",
            "--data-dir",
            str(directory / S3_DATA_DIR),
            "--port-file",
            str(port_file),
        ],
        env=_server_env(
            {
                "VLPIPE_S3_ACCESS_KEY_ID": s3["AWS_ACCESS_KEY_ID"],
                "VLPIPE_S3_SECRET_ACCESS_KEY": s3["AWS_SECRET_ACCESS_KEY"],
            }
        ),
        log_file=log_file,
        cwd=directory,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while not port_file.exists():  # written once the stored objects are loaded and the port is bound
        if not _alive(pid):
            raise PlatformError(f"the S3 store exited while starting; see {log_file}:\n{_tail(log_file)}")
        if time.monotonic() > deadline:
            _stop({"moto": pid})
            raise PlatformError(f"the S3 store did not start within {START_TIMEOUT_S:.0f} s; see {log_file}")
        time.sleep(0.1)
    port = int(port_file.read_text())
    _wait_http(f"http://{HOST}:{port}/", pid=pid, name="S3 store", log_file=log_file)
    return pid, port


def _start_mlflow(directory: Path, mlflow_env: dict[str, str], *, auth: bool) -> tuple[int, int]:
    """Start the MLflow server on a free port, again on another one if that was taken meanwhile."""
    log_file = directory / "mlflow.log"
    for attempt in range(1, MLFLOW_START_ATTEMPTS + 1):
        port = _free_port()
        command = [
            _bin("mlflow"),
            "server",
            "--host",
            HOST,
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{directory / 'mlflow.db'}",
            "--serve-artifacts",
            "--artifacts-destination",
            f"s3://{MLFLOW_BUCKET}/artifacts",
            "--workers",
            "2",
        ]
        if auth:
            command += ["--app-name", "basic-auth"]
        offset = log_file.stat().st_size if log_file.exists() else 0
        pid = _spawn(command, env=_server_env(mlflow_env), log_file=log_file, cwd=directory)
        try:
            _wait_http(
                f"http://{HOST}:{port}/health", pid=pid, name="mlflow server", log_file=log_file, port=port
            )
        except PlatformError:
            _stop({"mlflow": pid})
            taken = "address already in use" in _tail(log_file, lines=200, offset=offset).lower()
            if taken and attempt < MLFLOW_START_ATTEMPTS:
                log.info("port %d was taken before the MLflow server bound it; trying another", port)
                continue
            raise
        return pid, port
    raise AssertionError("unreachable")


def _reset_admin_password(auth_db: Path, password: str) -> None:
    """Set the admin's password in an existing auth.db (with MLflow's own auth store)."""
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore()
    store.init_db(f"sqlite:///{auth_db}")
    try:
        if store.has_user(ADMIN_USERNAME, use_primary=True):
            store.update_user(ADMIN_USERNAME, password=password)
            log.info("the admin password in %s was reset to the one in %s", auth_db, CREDENTIALS_FILE)
    finally:
        store.engine.dispose()


def _check_admin_login(tracking: str, directory: Path, client_env: dict[str, str]) -> None:
    """Fail now, not at the first client call, when the server refuses the admin password of credentials.json."""
    token = base64.b64encode(
        f"{client_env['MLFLOW_TRACKING_USERNAME']}:{client_env['MLFLOW_TRACKING_PASSWORD']}".encode()
    ).decode()
    request = urllib.request.Request(
        f"{tracking}/api/2.0/mlflow/experiments/search?max_results=1",
        headers={"Authorization": f"Basic {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30):
            return
    except urllib.error.HTTPError as exc:
        if exc.code != 401:
            raise PlatformError(
                f"the MLflow server answered {exc.code} to the admin; see {directory / 'mlflow.log'}"
            ) from None
    raise PlatformError(
        f"the MLflow server refuses the admin password of {directory / CREDENTIALS_FILE}: {directory / AUTH_DB} "
        "holds another one (changed through MLflow?). Put that password into credentials.json as "
        "mlflow_admin_password, or delete auth.db to recreate the users (the runs stay)."
    )


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

    The credentials, MLflow's stores and the S3 store's objects stay for the next `up`; the env file goes (it
    names ports that are no longer served).

    Args:
        purge: also delete the platform directory (credentials, stores, logs, environment file).
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
