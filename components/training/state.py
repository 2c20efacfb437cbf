"""Resumable training state: periodic checkpoints in `<location>/step-NNNNNNNN/`, committed atomically.

`location` is `checkpoint.location` of the stage (default `<work_dir>/checkpoints`): a local or shared
directory, or an `s3://` prefix. A checkpoint holds DeepSpeed's model/optimizer/scheduler state (`state/`,
one shard per rank under ZeRO), one `rank-NNNNN.pt` per rank (RNG states, the data stream's position, the
packer's open rows, and any stage extras such as MPO's reward shift), `trainer_state.json` (step, world size,
MLflow run id), the resolved stage `config.json` and the commit marker `COMMITTED` (the step and the manifest
of its files with their sizes; `shared_store.py`).

- A directory: every rank writes into `.tmp-step-N/`; after a barrier rank 0 writes the marker and renames
  it to `step-N/` (atomic on one filesystem), so a directory named `step-*` is always complete, then prunes
  all but the newest `keep_last`. Several nodes need it on a shared (ReadWriteMany) volume; a directory one
  node does not see is an error at the first checkpoint.
- An object store (no rename): ranks write into a node-local staging directory, each node uploads what its
  ranks wrote, and rank 0 writes the marker last, after checking every file arrived; steps without a marker
  are ignored. Resume downloads the newest committed step once per node.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vlpipe.components.training import shared_store
from vlpipe.components.training.runtime import DistInfo, Engine, barrier
from vlpipe.components.training.shared_store import COMMIT_FILE, PREFIX, step_dir_name
from vlpipe.model.storage import is_remote

__all__ = [
    "COMMIT_FILE",
    "CONFIG_FILE",
    "DS_TAG",
    "PREFIX",
    "STATE_FILE",
    "ResumeState",
    "checkpoint_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "load_training_state",
    "restore_latest",
    "save_training_state",
    "step_dir_name",
]

DS_TAG = "state"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.json"


def checkpoint_dir(work_dir: str | Path) -> Path:
    """The default checkpoint location of a work directory: `<work_dir>/checkpoints`."""
    return Path(work_dir) / "checkpoints"


def list_checkpoints(work_dir: str | Path) -> list[Path]:
    """Complete checkpoints under `<work_dir>/checkpoints`, oldest first."""
    root = checkpoint_dir(work_dir)
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest_checkpoint(work_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under `<work_dir>/checkpoints`, or None."""
    found = list_checkpoints(work_dir)
    return found[-1] if found else None


@dataclass
class ResumeState:
    """What a checkpoint gives back to the training loop."""

    step: int
    trainer_state: dict[str, Any]
    rank_state: dict[str, Any]
    path: Path | str


def _all_true(flag: bool) -> bool:
    """Whether `flag` holds on every rank (a collective; lets every rank raise the same error together)."""
    if not dist.is_initialized():
        return flag
    flags: list[bool] = [False] * dist.get_world_size()
    dist.all_gather_object(flags, flag)
    return all(flags)


def _gather(value: Any) -> list[Any]:
    if not dist.is_initialized():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _from_rank0(value: Any) -> Any:
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _write_rank_files(
    tmp: Path,
    step: int,
    engine: Engine,
    info: DistInfo,
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    resolved_config: dict[str, Any],
) -> None:
    engine.engine.save_checkpoint(str(tmp), tag=DS_TAG)
    torch.save(rank_state, tmp / f"rank-{info.rank:05d}.pt")
    if info.is_main:
        state = {**trainer_state, "step": step, "world_size": info.world_size}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
        (tmp / CONFIG_FILE).write_text(json.dumps(resolved_config, indent=2, sort_keys=True))


def _expected_rank_files(world_size: int) -> list[str]:
    return [f"rank-{r:05d}.pt" for r in range(world_size)] + [STATE_FILE, CONFIG_FILE]


def save_training_state(
    location: str | Path,
    step: int,
    engine: Engine,
    info: DistInfo,
    *,
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    resolved_config: dict[str, Any],
    keep_last: int,
) -> Path | str:
    """Write a checkpoint at `step` and commit it (a collective: every rank calls it).

    Args:
        location: the checkpoint location (directory every rank sees, or an `s3://` prefix).
        step: optimizer steps done.
        engine: the DeepSpeed engine (its model, optimizer and scheduler are saved).
        info: this rank.
        trainer_state: JSON-serialisable run facts (rank 0's copy is written).
        rank_state: this rank's RNG/data/extra state (torch-serialisable).
        resolved_config: the stage config, written beside the weights.
        keep_last: checkpoints to keep.

    Returns:
        The committed checkpoint (directory, or URI for a remote location).

    Raises:
        ValueError: a directory location that not every node sees (multi-node needs a shared volume or s3://).
        OSError: an upload that did not complete (nothing is committed; every rank raises).
    """
    if is_remote(str(location)):
        return _save_remote(
            str(location), step, engine, info, trainer_state, rank_state, resolved_config, keep_last
        )
    root = Path(location)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        tmp.mkdir(parents=True)
    barrier()
    if not _all_true(tmp.is_dir()):
        raise ValueError(
            f"checkpoint.location {root} is not shared by every node (rank 0 created {tmp.name} there, "
            "another node does not see it); put it on a ReadWriteMany volume or use s3://"
        )
    _write_rank_files(tmp, step, engine, info, trainer_state, rank_state, resolved_config)
    barrier()
    if info.is_main:
        files = shared_store.file_manifest(tmp)
        (tmp / COMMIT_FILE).write_text(json.dumps(shared_store.commit_record(step, files), indent=1))
        if final.exists():  # a re-run of the same step after a resume: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _save_remote(
    location: str,
    step: int,
    engine: Engine,
    info: DistInfo,
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    resolved_config: dict[str, Any],
    keep_last: int,
) -> str:
    uri = shared_store.step_uri(location, step)
    staging = shared_store.staging_root(location)
    tmp = staging / f".tmp-{step_dir_name(step)}"
    if info.local_rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # also what a killed run left on this node's disk
        tmp.mkdir(parents=True)
    if info.is_main:
        shared_store.remove_step(uri)  # what a killed run left of this step: never mixed with the new files
    barrier()
    _write_rank_files(tmp, step, engine, info, trainer_state, rank_state, resolved_config)
    barrier()  # this node's ranks have all written: its first process uploads them
    error, files = None, {}
    if info.local_rank == 0:
        try:
            files = shared_store.upload_files(tmp, uri)
        except OSError as exc:
            error = f"node of rank {info.rank}: {exc}"
    uploads = _gather((error, files))
    errors = [e for e, _ in uploads if e]
    manifest = {name: size for _, f in uploads for name, size in f.items()}
    if info.is_main and not errors:
        try:
            missing = [n for n in _expected_rank_files(info.world_size) if n not in manifest]
            if missing:
                raise OSError(f"no rank uploaded {', '.join(missing)} to {uri}")
            shared_store.check_uploaded(uri, manifest)
            shared_store.write_commit(uri, shared_store.commit_record(step, manifest))
            shared_store.prune(location, keep_last)
        except OSError as exc:
            errors.append(str(exc))
    errors = _from_rank0(errors)
    if info.local_rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if errors:
        raise OSError(f"checkpoint of step {step} not committed: {'; '.join(errors)}")
    return uri


def load_training_state(path: Path, engine: Engine, info: DistInfo) -> ResumeState:
    """Restore the engine from a local checkpoint directory and return the loop's state.

    Raises:
        ValueError: when the checkpoint was written with another world size (the data stream is sharded
            per rank; resume with the same number of processes).
    """
    trainer_state = json.loads((path / STATE_FILE).read_text())
    if trainer_state["world_size"] != info.world_size:
        raise ValueError(
            f"checkpoint {path} was written by {trainer_state['world_size']} processes but this run has "
            f"{info.world_size}; resume with the same world size, or set checkpoint.resume: false"
        )
    load_path, _ = engine.engine.load_checkpoint(
        str(path), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed found no model state in {path}/{DS_TAG}")
    rank_state = torch.load(path / f"rank-{info.rank:05d}.pt", weights_only=False)
    return ResumeState(int(trainer_state["step"]), trainer_state, rank_state, path)


def restore_latest(location: str | Path, engine: Engine, info: DistInfo) -> ResumeState | None:
    """Restore the newest committed checkpoint at `location` into `engine` (a collective), or None.

    Rank 0 picks the step, so every rank resumes from the same one. A remote step is downloaded once per
    node (by its local rank 0) into the node's staging directory, checked against its manifest, loaded by
    every rank of the node and deleted.

    Raises:
        ValueError: another world size (see `load_training_state`).
        OSError: a download that does not match the step's manifest.
    """
    location = str(location)
    step = None
    if info.is_main:
        steps = shared_store.committed_steps(location)
        step = steps[-1] if steps else None
    step = _from_rank0(step)
    if step is None:
        return None
    if not is_remote(location):
        return load_training_state(Path(location) / step_dir_name(step), engine, info)
    uri = shared_store.step_uri(location, step)
    local = shared_store.staging_root(location) / f"restore-{step_dir_name(step)}"
    error = None
    if info.local_rank == 0:
        try:
            record = shared_store.read_step_commit(location, step)
            if record is None:
                raise OSError(f"{uri} lost its commit marker while resuming")
            shared_store.download_step(uri, local, record)
        except OSError as exc:
            error = str(exc)
    errors = [e for e in _gather(error) if e]
    if errors:
        raise OSError("; ".join(errors))
    try:
        state = load_training_state(local, engine, info)
    finally:
        barrier()
        if info.local_rank == 0:
            shutil.rmtree(local, ignore_errors=True)
    state.path = uri
    return state
