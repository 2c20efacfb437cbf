"""Resumable training state: periodic, atomic checkpoints in `<work_dir>/checkpoints/step-NNNNNNNN/`.

A checkpoint holds DeepSpeed's model/optimizer/scheduler state (`state/`, one shard per rank under ZeRO),
one `rank-NNNNN.pt` per rank (RNG states, the data stream's position, the packer's open rows, and any stage
extras such as MPO's reward shift), `trainer_state.json` (step, world size, MLflow run id) and the resolved
stage `config.json`. Every rank writes into `.tmp-step-N/`; after a barrier rank 0 renames it to
`step-N/` (atomic on one filesystem), so a directory named `step-*` is always complete, then prunes all but
the newest `keep_last`. Multi-node runs need `work_dir` on a shared volume.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlpipe.components.training.runtime import DistInfo, Engine, barrier

PREFIX = "step-"
DS_TAG = "state"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.json"


def checkpoint_dir(work_dir: str | Path) -> Path:
    return Path(work_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def list_checkpoints(work_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(work_dir)
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest_checkpoint(work_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(work_dir)
    return found[-1] if found else None


@dataclass
class ResumeState:
    """What a checkpoint gives back to the training loop."""

    step: int
    trainer_state: dict[str, Any]
    rank_state: dict[str, Any]
    path: Path


def save_training_state(
    work_dir: str | Path,
    step: int,
    engine: Engine,
    info: DistInfo,
    *,
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    resolved_config: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write a checkpoint at `step` atomically (a collective: every rank calls it).

    Args:
        work_dir: the stage's work directory (shared by all ranks).
        step: optimizer steps done.
        engine: the DeepSpeed engine (its model, optimizer and scheduler are saved).
        info: this rank.
        trainer_state: JSON-serialisable run facts (rank 0's copy is written).
        rank_state: this rank's RNG/data/extra state (torch-serialisable).
        resolved_config: the stage config, written beside the weights.
        keep_last: checkpoints to keep.

    Returns:
        The final checkpoint directory.
    """
    root = checkpoint_dir(work_dir)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        tmp.mkdir(parents=True)
    barrier()
    engine.engine.save_checkpoint(str(tmp), tag=DS_TAG)
    torch.save(rank_state, tmp / f"rank-{info.rank:05d}.pt")
    if info.is_main:
        state = {**trainer_state, "step": step, "world_size": info.world_size}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
        (tmp / CONFIG_FILE).write_text(json.dumps(resolved_config, indent=2, sort_keys=True))
    barrier()
    if info.is_main:
        if final.exists():  # a re-run of the same step after a resume: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(work_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_training_state(path: Path, engine: Engine, info: DistInfo) -> ResumeState:
    """Restore the engine from a checkpoint and return the loop's state.

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
