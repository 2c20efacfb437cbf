"""Checkpoints handed between pipeline tasks, directly or through a model store (`cluster.model_store`).

Without a model store a step copies its checkpoint into its `Model` artifact, and Kubeflow moves the artifact
(to the pipeline root on a cluster, a local directory under `kfp.local`). With one (`VLPIPE_MODEL_STORE`,
set on every step from the recipe's `cluster.model_store`, e.g. `s3://vlpipe-models/checkpoints`), the step
uploads the checkpoint to `<store>/<pipeline run>/<task>/<output>` (the last three parts of the artifact's
own URI, unique per run and step) and the artifact holds only a pointer file, `vlpipe-pointer.json`, plus
the URI in its metadata (`checkpoint_uri`). Steps reading the artifact call `checkpoint_path`, which follows
the pointer and downloads the checkpoint once into the local cache (`vlpipe.model.storage.localize`).

Why: checkpoints then live at stable, well-known S3 locations that a KServe `storageUri` or a later pipeline
can name, and under `kfp.local` the steps exchange checkpoints through the object store exactly as cluster
steps do. Torch-free.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from vlpipe.model.storage import filesystem, is_remote, join, localize, upload_dir, vlpipe_home

log = logging.getLogger(__name__)

STORE_ENV = "VLPIPE_MODEL_STORE"
POINTER_FILE = "vlpipe-pointer.json"
METADATA_KEY = "checkpoint_uri"


def model_store() -> str | None:
    """The model store of this step (`VLPIPE_MODEL_STORE`), or None."""
    return os.environ.get(STORE_ENV) or None


def store_uri(store: str, artifact_uri: str) -> str:
    """Where a checkpoint of the artifact at `artifact_uri` goes in `store`: `<store>/<run>/<task>/<output>`."""
    parts = [p for p in PurePosixPath(artifact_uri.split("://", 1)[-1]).parts if p not in ("/", "")]
    if len(parts) < 3:
        raise ValueError(f"cannot derive a model-store key from the artifact URI {artifact_uri!r}")
    return join(store, *parts[-3:])


def _listing(uri: str) -> dict[str, int]:
    fs, path = filesystem(uri)
    root = path.rstrip("/")
    return {k[len(root) + 1 :]: int(v.get("size") or 0) for k, v in fs.find(root, detail=True).items()}


def publish_checkpoint(local_dir: str | Path, artifact: Any, *, store: str | None = None) -> str | None:
    """Put the checkpoint in `local_dir` where the next steps read it: the artifact's directory, or the store.

    Args:
        local_dir: the finished checkpoint.
        artifact: the step's output `Model` (its `path`, `uri` and `metadata` are used).
        store: the model store; default `model_store()`.

    Returns:
        The checkpoint's store URI, or None when there is no store (the artifact holds the copy).

    Raises:
        OSError: the upload did not arrive complete (file names and sizes are compared).
    """
    store = store if store is not None else model_store()
    target = Path(artifact.path)
    target.mkdir(parents=True, exist_ok=True)
    if not store:
        shutil.copytree(local_dir, target, dirs_exist_ok=True)
        return None
    uri = store_uri(store, artifact.uri)
    upload_dir(local_dir, uri)
    local = {
        str(p.relative_to(local_dir)): p.stat().st_size for p in Path(local_dir).rglob("*") if p.is_file()
    }
    remote = _listing(uri) if is_remote(uri) else local
    missing = {k: v for k, v in local.items() if remote.get(k) != v}
    if missing:
        raise OSError(f"upload of {local_dir} to {uri} is incomplete: {sorted(missing)[:5]} differ")
    pointer = {"uri": uri, "files": len(local), "bytes": sum(local.values())}
    (target / POINTER_FILE).write_text(json.dumps(pointer, indent=2, sort_keys=True) + "\n")
    artifact.metadata[METADATA_KEY] = uri
    log.info("checkpoint published to %s (%d files, %d bytes)", uri, pointer["files"], pointer["bytes"])
    return uri


@contextmanager
def checkpoint_output(artifact: Any, *, store: str | None = None) -> Iterator[str]:
    """A directory to write a step's checkpoint into, published on a clean exit.

    Without a store it is the artifact's own directory (no copy); with one, a staging directory under
    `<VLPIPE_HOME>/staging` (not /tmp: checkpoints can be large) that is uploaded, then removed.
    """
    store = store if store is not None else model_store()
    if not store:
        Path(artifact.path).mkdir(parents=True, exist_ok=True)
        yield artifact.path
        return
    root = vlpipe_home() / "staging"
    root.mkdir(parents=True, exist_ok=True)
    staging = tempfile.mkdtemp(dir=root, prefix="checkpoint-")
    try:
        yield staging
        publish_checkpoint(staging, artifact, store=store)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def checkpoint_path(artifact_dir: str | Path) -> str:
    """A local directory holding the checkpoint of a `Model` artifact (follows a store pointer).

    Raises:
        FileNotFoundError: the pointer names a checkpoint that is not in the store (naming the URI).
    """
    pointer = Path(artifact_dir) / POINTER_FILE
    if not pointer.exists():
        return str(artifact_dir)
    uri = json.loads(pointer.read_text())["uri"]
    try:
        return localize(uri)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"the checkpoint of {artifact_dir} should be at {uri} (its model store) but is not: {exc}"
        ) from exc


def checkpoint_uri(artifact_dir: str | Path) -> str:
    """Where the checkpoint of a `Model` artifact lives: its store URI, or the artifact directory."""
    pointer = Path(artifact_dir) / POINTER_FILE
    return json.loads(pointer.read_text())["uri"] if pointer.exists() else str(artifact_dir)
