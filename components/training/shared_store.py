"""Where a training stage's resumable checkpoints live when several nodes must see them: a shared directory
(a ReadWriteMany volume) or an object store (`s3://`, any fsspec URL).

Layout: `<location>/step-NNNNNNNN/` holds one checkpoint (DeepSpeed's `state/`, `rank-NNNNN.pt` per rank,
`trainer_state.json`, `config.json`) and, written LAST, the commit marker `COMMITTED`: JSON with the step and
the manifest of every file with its size. An object store has no rename, so a step is complete exactly when
its marker exists; every reader here (resume, `latest_committed`, pruning) ignores a step without one.

A remote location is written through a node-local staging directory (`staging_root`): DeepSpeed writes each
rank's files locally, the first process of every node (local rank 0) uploads what its node wrote, rank 0
checks that the bucket holds every rank's files and only then writes the marker. Resume downloads the newest
committed step once per node, checks it against the manifest, and every rank loads from that local copy.
A shared directory is written in place (`state.py`: a temporary directory renamed when complete).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from vlpipe.model.checkpoint import COMMIT_FILE, file_manifest, read_commit, remove_commit, write_commit
from vlpipe.model.storage import filesystem, is_remote, join, upload_dir

__all__ = [
    "COMMIT_FILE",
    "PREFIX",
    "STAGING_ENV",
    "check_uploaded",
    "commit_record",
    "committed_steps",
    "download_step",
    "file_manifest",
    "latest_committed",
    "prune",
    "read_step_commit",
    "remove_step",
    "staging_root",
    "step_dir_name",
    "step_uri",
    "upload_files",
    "write_commit",
]

PREFIX = "step-"
STAGING_ENV = "VLPIPE_STAGING_DIR"
_STEP_NAME = re.compile(rf"^{PREFIX}(\d{{8}})$")


def step_dir_name(step: int) -> str:
    """`step-NNNNNNNN` (zero-padded, so names sort by step)."""
    return f"{PREFIX}{step:08d}"


def step_uri(location: str, step: int) -> str:
    """The directory (or object prefix) of `step` under `location`."""
    return join(location, step_dir_name(step))


def staging_root(location: str) -> Path:
    """This node's staging directory for `location`: `$VLPIPE_STAGING_DIR` (default: the system temp
    directory, i.e. `$TMPDIR`), then `vlpipe-checkpoints/<hash of location>`. Processes of one node share it;
    other nodes have their own (their own disk)."""
    base = Path(os.environ.get(STAGING_ENV) or tempfile.gettempdir())
    key = hashlib.sha256(location.encode()).hexdigest()[:16]
    return base / "vlpipe-checkpoints" / key


def commit_record(step: int, files: dict[str, int]) -> dict[str, Any]:
    """The content of a step's commit marker."""
    return {"step": step, "files": dict(sorted(files.items()))}


def read_step_commit(location: str, step: int, storage_options: dict | None = None) -> dict[str, Any] | None:
    """The commit marker of `step` under `location`, or None when the step is not committed."""
    record = read_commit(step_uri(location, step), storage_options)
    return record if record is not None and record.get("step") == step else None


def _step_names(location: str, storage_options: dict | None) -> list[tuple[int, str]]:
    fs, path = filesystem(location, storage_options)
    try:
        entries = (
            fs.ls(path, detail=False, refresh=True) if is_remote(location) else fs.ls(path, detail=False)
        )
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        match = _STEP_NAME.match(entry.rstrip("/").rsplit("/", 1)[-1])
        if match:
            found.append((int(match.group(1)), entry))
    return sorted(found)


def committed_steps(location: str, storage_options: dict | None = None) -> list[int]:
    """Steps under `location` whose commit marker exists, oldest first.

    A local directory named `step-*` also counts without a marker (it was renamed into place complete, and
    checkpoints written before the marker existed have none); a remote step needs its marker.
    """
    if not is_remote(location):
        root = Path(location.removeprefix("file://"))
        return [step for step, _ in _step_names(str(root), None) if (root / step_dir_name(step)).is_dir()]
    return [
        step
        for step, _ in _step_names(location, storage_options)
        if read_step_commit(location, step, storage_options)
    ]


def latest_committed(location: str, storage_options: dict | None = None) -> str | None:
    """The newest committed checkpoint under `location` (its directory or URI), or None.

    The hook for whoever needs the result of a multi-node training step from outside its pods (a launcher
    waiting on a TrainJob, `vlpipe model check`): it never returns a step a killed run left half-uploaded.
    """
    steps = committed_steps(location, storage_options)
    return step_uri(location, steps[-1]) if steps else None


def upload_files(local_dir: Path, uri: str, storage_options: dict | None = None) -> dict[str, int]:
    """Upload every file under `local_dir` to `uri`; returns their manifest (relative path → size)."""
    files = file_manifest(local_dir)
    if files:
        upload_dir(local_dir, uri, storage_options=storage_options)
    return files


def check_uploaded(uri: str, expected: dict[str, int], storage_options: dict | None = None) -> None:
    """Raise when the objects under `uri` do not match `expected` (relative path → size).

    Raises:
        OSError: a file is missing or has another size (an upload that did not complete; the step is not
            committed, so resume uses the previous one).
    """
    fs, path = filesystem(uri, storage_options)
    prefix = path.rstrip("/") + "/"
    fs.invalidate_cache(path)
    found = {k[len(prefix) :]: int(v["size"]) for k, v in fs.find(prefix, detail=True).items()}
    wrong = sorted(name for name, size in expected.items() if found.get(name) != size)
    if wrong:
        shown = ", ".join(f"{n} (expected {expected[n]} bytes, found {found.get(n)})" for n in wrong[:5])
        raise OSError(f"checkpoint upload to {uri} is incomplete: {shown}; the step is not committed")


def remove_step(uri: str, storage_options: dict | None = None) -> None:
    """Delete a step: its marker first (readers stop seeing it at once), then its files."""
    fs, path = filesystem(uri, storage_options)
    path = path.rstrip("/")
    remove_commit(uri, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def prune(location: str, keep_last: int, storage_options: dict | None = None) -> list[int]:
    """Remove all but the newest `keep_last` committed steps and any uncommitted step older than the newest
    committed one (left by a killed upload). Returns the steps removed."""
    committed = committed_steps(location, storage_options)
    keep = set(committed[-keep_last:])
    newest = committed[-1] if committed else -1
    removed = []
    for step, _ in _step_names(location, storage_options):
        if step not in keep and step < newest:
            remove_step(step_uri(location, step), storage_options)
            removed.append(step)
    return removed


def download_step(
    uri: str, target: Path, record: dict[str, Any], storage_options: dict | None = None
) -> Path:
    """Download a committed step into `target` (replaced) and check it against its manifest.

    Raises:
        OSError: a file of the manifest is missing or has another size after the download.
    """
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    fs, path = filesystem(uri, storage_options)
    fs.get(path.rstrip("/") + "/", str(target) + "/", recursive=True)
    found = file_manifest(target)
    wrong = sorted(n for n, size in record["files"].items() if found.get(n) != size)
    if wrong:
        raise OSError(f"checkpoint {uri} downloaded incompletely ({', '.join(wrong[:5])}); retry the run")
    return target
