"""Local paths and `s3://` (or any fsspec URL) through one small interface.

Credentials and endpoints come from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_ENDPOINT_URL`, ...) or from `storage_options`; nothing here hard-codes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import fsspec
from fsspec.core import url_to_fs


def vlpipe_home() -> Path:
    """Where local state lives: `$VLPIPE_HOME`, default `./.vlpipe`."""
    return Path(os.environ.get("VLPIPE_HOME", ".vlpipe")).resolve()


def is_remote(uri: str) -> bool:
    """True for URLs with a non-local protocol (`s3://...`)."""
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path for `uri`."""
    return url_to_fs(uri, **(storage_options or {}))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or URL."""
    if is_remote(uri):
        return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(uri, *parts))


def localize(uri: str, *, storage_options: dict | None = None, cache_dir: Path | None = None) -> str:
    """Return a local directory or file for `uri`, downloading remote content into a cache once.

    Args:
        uri: a local path or a remote URL such as `s3://bucket/models/qwen2.5-0.5b`.
        storage_options: fsspec options for the remote filesystem.
        cache_dir: where downloads go; default `$VLPIPE_HOME/cache`.

    Raises:
        FileNotFoundError: when the path or object does not exist.
    """
    if not is_remote(uri):
        path = Path(uri.removeprefix("file://"))
        if not path.exists():
            raise FileNotFoundError(f"{uri} does not exist")
        return str(path)
    fs, path = filesystem(uri, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"{uri} does not exist (check the bucket, the prefix and AWS_ENDPOINT_URL)")
    is_dir = fs.isdir(path)
    # The cache key covers the content listing (names, sizes, ETags), so an overwritten object is fetched anew.
    listing = fs.find(path, detail=True) if is_dir else {path: fs.info(path)}
    fingerprint = sorted(
        (k, v.get("size"), str(v.get("ETag", v.get("mtime", "")))) for k, v in listing.items()
    )
    key = hashlib.sha256(json.dumps([uri, fingerprint], default=str).encode()).hexdigest()[:16]
    target = (cache_dir or vlpipe_home() / "cache") / key
    result = target if is_dir else target / Path(path).name
    if target.exists():
        return str(result)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Download next to the target, then rename: a killed download never looks complete.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{key}-"))
    try:
        if is_dir:
            fs.get(path.rstrip("/") + "/", str(tmp) + "/", recursive=True)
        else:
            fs.get(path, str(tmp / Path(path).name))
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(result)


def upload_dir(local_dir: str | Path, uri: str, *, storage_options: dict | None = None) -> str:
    """Copy a local directory to `uri` (local or remote). Returns `uri`."""
    if not is_remote(uri):
        shutil.copytree(local_dir, uri, dirs_exist_ok=True)
        return uri
    fs, path = filesystem(uri, storage_options)
    fs.put(str(local_dir).rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)
    return uri
