"""The local platform's S3 store: moto's S3 server on loopback that refuses unknown keys and keeps its objects
on disk across restarts (`python -m vlpipe.infra.s3_store`, started by `vlpipe platform up`).

A plain `moto_server` keeps everything in memory and accepts any access key. This wrapper runs moto's own WSGI
application, with two changes:

- **Authentication is enforced.** moto checks a request's SigV4 signature against its IAM users once its
  no-auth allowance (`INITIAL_NO_AUTH_ACTION_COUNT`) is 0. At start one IAM user is given the platform's key
  (read from the environment, `VLPIPE_S3_ACCESS_KEY_ID` / `VLPIPE_S3_SECRET_ACCESS_KEY`, never from the
  command line) with an S3-only policy, so an unknown key gets `InvalidAccessKeyId` and a wrong secret
  `SignatureDoesNotMatch` (both 403). moto cannot check a presigned URL (query-string SigV4, which MLflow's
  proxied artifact downloads hand to clients) once authentication is on, so the gate here checks those itself
  (key, signature, expiry) and lets moto serve a verified one without checking it again. Unsigned requests
  are refused (403 `AccessDenied`: moto would let an anonymous GET through), and so is moto's unauthenticated
  control API under `/moto-api/` (it can reset the store, switch authentication off and dump the whole state,
  keys included). The request log leaves out query strings (a presigned URL's carries the access key id).
- **Writes go through to disk.** After every successful request that may write (anything but GET and HEAD),
  before its response is sent, the buckets and the latest version of every object are mirrored into the data
  directory: each new or changed object to a file under `objects/`, then `manifest.json` (bucket → key →
  file, ETag, Last-Modified, metadata) replaced atomically, then the files nothing refers to any more removed.
  At start the directory is loaded back into moto before the port is published. So a write that was
  acknowledged survives `down`, SIGKILL or a crash of the server; only a request whose response had not been
  sent is lost. A crash of the machine itself may lose what the page cache had not yet written (no fsync).
  Not kept: old object versions, ACLs, tags, bucket policies and multipart uploads not yet completed.

The server binds the port it is given (0: any free one) and then writes the port it got to `--port-file`, so
the platform never races another process for a port. Everything it creates is private (umask 077).
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

log = logging.getLogger(__name__)

ACCOUNT_ID = "123456789012"  # moto's default account; pinned so a request cannot pick another one
PARTITION = "aws"
USER_NAME = "vlpipe-platform"
ACCESS_KEY_VARIABLE = "VLPIPE_S3_ACCESS_KEY_ID"
SECRET_KEY_VARIABLE = "VLPIPE_S3_SECRET_ACCESS_KEY"
MANIFEST = "manifest.json"
OBJECTS = "objects"
OBJECT_FILE = re.compile(r"[0-9a-f]{32}")
READ_METHODS = frozenset({"GET", "HEAD"})
CLOCK_SKEW = timedelta(minutes=15)  # what S3 allows between a signature's time and its own
S3_ONLY_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
}


class StoreError(RuntimeError):
    """The data directory cannot be loaded (the message names the file)."""


class DiskMirror:
    """Mirrors a moto S3 backend's buckets and latest object versions into a directory, and loads them back.

    Args:
        directory: the data directory (`manifest.json` and `objects/`).
        backend: moto's `S3Backend` of the store's account.
    """

    def __init__(self, directory: Path, backend: Any) -> None:
        self.directory = directory
        self.objects = directory / OBJECTS
        self.backend = backend
        self.lock = threading.Lock()
        self._manifest: dict[str, Any] = {"buckets": {}}

    def restore(self) -> int:
        """Load the directory into the backend (before serving); returns the number of objects loaded.

        Raises:
            StoreError: the manifest is not readable JSON of the expected shape.
        """
        self.objects.mkdir(parents=True, exist_ok=True)
        path = self.directory / MANIFEST
        if path.exists():
            try:
                manifest = json.loads(path.read_text())
                buckets = manifest["buckets"]
            except (ValueError, KeyError, TypeError) as exc:
                raise StoreError(
                    f"{path} is not a store manifest ({exc}); move the directory away to start empty"
                ) from exc
        else:
            manifest, buckets = {"buckets": {}}, {}
        loaded, missing = 0, 0
        try:
            for name, bucket in buckets.items():
                self.backend.create_bucket(name, bucket["region"])
                for key_name, entry in list(bucket["objects"].items()):
                    if not OBJECT_FILE.fullmatch(entry["file"]):  # a file name of ours, never a path
                        raise ValueError(f"object file name {entry['file']!r}")
                    try:
                        value = (self.objects / entry["file"]).read_bytes()
                    except FileNotFoundError:
                        missing += 1
                        del bucket["objects"][key_name]
                        continue
                    fake = self.backend.put_object(
                        name, key_name, value, etag=entry["etag"], disable_notification=True
                    )
                    fake.set_metadata(dict(entry["metadata"]))
                    fake.last_modified = datetime.fromisoformat(entry["last_modified"])
                    loaded += 1
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise StoreError(
                f"{path} has an entry of the wrong shape ({exc!r}); move the directory away"
            ) from exc
        if missing:
            log.warning("%d objects of %s had no data file and were dropped", missing, path)
        self._manifest = manifest
        referenced = self._files(manifest)
        for file in self.objects.iterdir():  # left by a write that was cut off, or no longer referenced
            if file.name not in referenced:
                file.unlink(missing_ok=True)
        return loaded

    def sync(self) -> None:
        """Write what changed since the last sync: new object files, the manifest, then remove stale files."""
        with self.lock:
            old_buckets = self._manifest["buckets"]
            buckets: dict[str, Any] = {}
            for name, bucket in list(self.backend.buckets.items()):
                old = old_buckets.get(name, {}).get("objects", {})
                objects: dict[str, Any] = {}
                for key_name, versions in list(dict.items(bucket.keys)):
                    entry = self._entry(versions[-1] if versions else None, old.get(key_name))
                    if entry is not None:
                        objects[key_name] = entry
                buckets[name] = {"region": bucket.region_name, "objects": objects}
            if buckets == old_buckets:
                return
            manifest = {"buckets": buckets}
            tmp = self.directory / f".{MANIFEST}.tmp"
            tmp.write_text(json.dumps(manifest))
            os.replace(tmp, self.directory / MANIFEST)
            stale = self._files(self._manifest) - self._files(manifest)
            self._manifest = manifest
            for file in stale:
                (self.objects / file).unlink(missing_ok=True)

    def _entry(self, fake: Any, old: dict[str, Any] | None) -> dict[str, Any] | None:
        """The manifest entry of one object: the old one when unchanged, else one for a freshly written file."""
        if fake is None or not hasattr(fake, "etag"):  # a delete marker: no current object
            return None
        try:
            with fake.lock:
                etag = fake.etag.strip('"')  # computed from the buffer on first use
                stamp = fake.last_modified.isoformat()
                if old is not None and old["etag"] == etag and old["last_modified"] == stamp:
                    return old
                file = self._write_value(fake)
        except ValueError:
            # Its buffer was closed: a concurrent request replaced or deleted the object, and that request
            # syncs again once it holds the lock. Keep what was there until then.
            return old
        return {"file": file, "etag": etag, "last_modified": stamp, "metadata": dict(fake.metadata)}

    def _write_value(self, fake: Any) -> str:
        name = uuid.uuid4().hex
        tmp = self.objects / f".{name}.tmp"
        try:
            with open(tmp, "wb") as out:
                # moto keeps the bytes in a spooled temporary file; stream it rather than copying it into memory
                # (`fake.value`), which matters for multi-GB checkpoints. The caller holds `fake.lock`.
                buffer = fake._value_buffer
                buffer.seek(0)
                shutil.copyfileobj(buffer, out, 1 << 20)
            os.replace(tmp, self.objects / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return name

    @staticmethod
    def _files(manifest: dict[str, Any]) -> set[str]:
        return {
            entry["file"] for bucket in manifest["buckets"].values() for entry in bucket["objects"].values()
        }


def _error(start_response: Callable[..., Any], status: str, code: str, message: str) -> list[bytes]:
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>'
    ).encode()
    start_response(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
    return [body]


_presigned = threading.local()
"""`verified` is True while this thread serves a presigned request that the gate has checked."""


def _let_verified_presigned_requests_through() -> None:
    """moto's own check reads the `Authorization` header, which a presigned request has none of: skip it for a
    request the gate has verified (its one IAM user may do anything in S3, so authenticated is authorized)."""
    from moto.core.authorization import ActionAuthenticatorMixin

    check = ActionAuthenticatorMixin._authenticate_and_authorize_action
    if getattr(check, "vlpipe_presigned", False):
        return

    def authenticate_unless_verified(self: Any, iam_request_cls: type, resource: str = "*") -> None:
        if getattr(_presigned, "verified", False):
            return
        check(self, iam_request_cls, resource)

    authenticate_unless_verified.vlpipe_presigned = True  # type: ignore[attr-defined]
    ActionAuthenticatorMixin._authenticate_and_authorize_action = authenticate_unless_verified  # type: ignore[method-assign]


def presigned_error(environ: dict[str, Any], access_key_id: str, secret_access_key: str) -> str | None:
    """Check a presigned (query-string SigV4) request; returns None when it is valid, else the S3 error code.

    Args:
        environ: the WSGI environ (werkzeug's `REQUEST_URI` is the path and query as sent).
        access_key_id, secret_access_key: the platform's key, the only one that may sign.
    """
    from botocore.auth import S3SigV4QueryAuth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    raw_path, _, query = (environ.get("REQUEST_URI") or environ.get("RAW_URI") or "").partition("?")
    pairs = parse_qsl(query, keep_blank_values=True)
    params = dict(pairs)
    try:
        key_id, date, region, service, terminator = params["X-Amz-Credential"].split("/")
        issued = datetime.strptime(params["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        expires = int(params["X-Amz-Expires"])
        signed_headers = params["X-Amz-SignedHeaders"].split(";")
        signature = params["X-Amz-Signature"]
    except (KeyError, ValueError):
        return "AuthorizationQueryParametersError"
    if params.get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256" or service != "s3" or terminator != "aws4_request":
        return "AuthorizationQueryParametersError"
    if not hmac.compare_digest(key_id, access_key_id):
        return "InvalidAccessKeyId"
    now = datetime.now(UTC)
    if not issued - CLOCK_SKEW <= now <= issued + timedelta(seconds=expires):
        return "AccessDenied"  # S3 says "Request has expired"
    headers = {}
    for name in signed_headers:
        key = {"content-type": "CONTENT_TYPE", "content-length": "CONTENT_LENGTH"}.get(name)
        headers[name] = environ.get(key or "HTTP_" + name.upper().replace("-", "_"), "")
    request = AWSRequest(
        method=environ.get("REQUEST_METHOD", "GET"),
        # S3's canonical path is the key encoded once, as botocore encodes it; decoding first makes a client's
        # own (equivalent) escaping irrelevant.
        url=f"http://{headers.get('host', 'localhost')}{quote(unquote(raw_path), safe='/~')}",
        headers=headers,
        params=[(k, v) for k, v in pairs if k != "X-Amz-Signature"],
    )
    request.context["timestamp"] = params["X-Amz-Date"]
    auth = S3SigV4QueryAuth(Credentials(access_key_id, secret_access_key), "s3", region, expires=expires)
    expected = auth.signature(auth.string_to_sign(request, auth.canonical_request(request)), request)
    return None if hmac.compare_digest(expected, signature) else "SignatureDoesNotMatch"


class Gate:
    """WSGI middleware in front of moto: refuses what moto would let through, checks presigned requests, and
    mirrors writes to disk."""

    def __init__(
        self,
        app: Callable[..., Iterable[bytes]],
        mirror: DiskMirror,
        access_key_id: str,
        secret_access_key: str,
    ) -> None:
        self.app = app
        self.mirror = mirror
        self._key = (access_key_id, secret_access_key)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/moto-api" or path.startswith("/moto-api/"):
            return _error(start_response, "404 Not Found", "NotFound", "moto's control API is disabled here")
        presigned = "X-Amz-Signature=" in environ.get("QUERY_STRING", "")
        if presigned and "HTTP_AUTHORIZATION" not in environ:
            code = presigned_error(environ, *self._key)
            if code is not None:
                return _error(start_response, "403 Forbidden", code, "the presigned URL is not valid")
            _presigned.verified = True
            try:
                return self._serve(environ, start_response)
            finally:
                _presigned.verified = False
        if not environ.get("HTTP_AUTHORIZATION", "").startswith("AWS4-HMAC-SHA256 "):
            return _error(
                start_response,
                "403 Forbidden",
                "AccessDenied",
                "requests must be signed (AWS Signature Version 4) with the platform's key",
            )
        return self._serve(environ, start_response)

    def _serve(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        statuses: list[str] = []

        def recording_start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
            statuses.append(status)
            return start_response(status, headers, exc_info)

        # The whole response is produced here, in this thread (the presigned flag is thread-local), and a write
        # is synced before the body is returned: the headers go out with the first body chunk, so a client sees
        # success only once the write is on disk.
        result = self.app(environ, recording_start_response)
        try:
            body = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        if (
            environ.get("REQUEST_METHOD", "GET") not in READ_METHODS
            and statuses
            and statuses[-1].startswith("2")
        ):
            self.mirror.sync()
        return [body]


def _handler() -> type:
    from moto.moto_server.werkzeug_app import MotoRequestHandler

    class QuietQueryHandler(MotoRequestHandler):
        """moto's request handler, logging each request without its query string."""

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            self.log("info", '"%s %s" %s %s', self.command, self.path.split("?", 1)[0], code, size)

    return QuietQueryHandler


def _grant_key(access_key_id: str, secret: str) -> None:
    """Make the platform's key moto's only IAM credential, allowed S3 and nothing else."""
    from moto.iam.models import iam_backends

    iam = iam_backends[ACCOUNT_ID][PARTITION]
    iam.create_user("us-east-1", USER_NAME)
    iam.put_user_policy(USER_NAME, "s3-only", json.dumps(S3_ONLY_POLICY))
    key = iam.create_access_key(USER_NAME)
    # moto draws its own random key; the platform's must survive restarts, so it replaces the drawn one.
    del iam.access_keys[key.physical_resource_id]
    key.access_key_id = access_key_id
    key.secret_access_key = secret
    iam.access_keys[key.physical_resource_id] = key


def build_server(host: str, port: int, data_dir: Path, access_key_id: str, secret_access_key: str) -> Any:
    """moto's S3 server with the key enforced and the data directory loaded, bound but not yet serving.

    Returns:
        the werkzeug server (`server.server_port` is the port bound; `server.mirror` the `DiskMirror`).
    """
    # Both are read by moto at request time: no anonymous allowance, and one account whatever a request says.
    os.environ["MOTO_ACCOUNT_ID"] = ACCOUNT_ID
    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    from moto import settings
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from moto.s3.models import s3_backends
    from werkzeug.serving import make_server

    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    _let_verified_presigned_requests_through()
    _grant_key(access_key_id, secret_access_key)
    mirror = DiskMirror(data_dir, s3_backends[ACCOUNT_ID][PARTITION])
    loaded = mirror.restore()
    log.info("S3 store: %d objects loaded from %s", loaded, data_dir)
    app = Gate(DomainDispatcherApplication(create_backend_app), mirror, access_key_id, secret_access_key)
    server = make_server(host, port, app, threaded=True, request_handler=_handler())
    server.mirror = mirror
    return server


def main(argv: list[str] | None = None) -> None:
    """Run the store until SIGTERM/SIGINT (an in-flight write finishes its sync before the process exits)."""
    parser = argparse.ArgumentParser(
        prog="python -m vlpipe.infra.s3_store", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (see --port-file)")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--port-file", type=Path, required=True, help="written with the port once serving")
    args = parser.parse_args(argv)
    access_key_id = os.environ.pop(ACCESS_KEY_VARIABLE, "")
    secret_access_key = os.environ.pop(SECRET_KEY_VARIABLE, "")
    if not access_key_id or not secret_access_key:
        parser.error(f"set {ACCESS_KEY_VARIABLE} and {SECRET_KEY_VARIABLE} in the environment")
    os.umask(0o077)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        server = build_server(args.host, args.port, args.data_dir, access_key_id, secret_access_key)
    except StoreError as exc:
        log.error("%s", exc)
        sys.exit(2)

    def stop(signum: int, frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    tmp = args.port_file.with_name(f".{args.port_file.name}.tmp")
    tmp.write_text(str(server.server_port))
    os.replace(tmp, args.port_file)
    log.info("S3 store serving on %s:%d", args.host, server.server_port)
    server.serve_forever()
    with server.mirror.lock:  # let a sync in flight finish
        server.server_close()


if __name__ == "__main__":
    main()
