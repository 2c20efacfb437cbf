"""Set-up and wrap-up steps every stage shares: start checkpoint, resume point, final HF checkpoint."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from components.training.loop import LoopContext
from components.training.runtime import DistInfo, Engine, barrier, full_parameters
from components.training.state import ResumeState, latest_checkpoint, load_training_state
from components.training.tracking import Tracker
from model.checkpoint import LoadedModel, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


def load_start(uri: str, info: DistInfo, attn_implementation: str) -> LoadedModel:
    """Load the stage's starting checkpoint on every rank (rank 0 first, so a remote one downloads once).

    Raises:
        FileNotFoundError: when `uri` is not a checkpoint.
    """
    if info.is_main:
        loaded = load_checkpoint(uri)
    barrier()
    if not info.is_main:
        loaded = load_checkpoint(uri)
    loaded.model.set_attn_implementation(attn_implementation)
    loaded.model.train()
    return loaded


def resume_point(work_dir: str, enabled: bool, engine: Engine, info: DistInfo) -> ResumeState | None:
    """Restore the newest complete checkpoint in `work_dir` into `engine` (None when starting fresh)."""
    if not enabled:
        return None
    path = latest_checkpoint(work_dir)
    if path is None:
        return None
    state = load_training_state(path, engine, info)
    if info.is_main:
        log.info("resuming from %s (step %d)", path, state.step)
    return state


def steps_for(trainer: Any, units_per_epoch: float) -> int:
    """Optimizer steps of the run: `max_steps`, or `epochs` x units per epoch / global batch (rounded up)."""
    if trainer.max_steps is not None:
        return int(trainer.max_steps)
    return max(1, math.ceil(trainer.epochs * units_per_epoch / trainer.global_batch_size))


def parameter_count(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def save_final(
    output: str,
    engine: Engine,
    loaded: LoadedModel,
    info: DistInfo,
    tracker: Tracker,
    *,
    metadata: dict[str, Any],
    log_model: bool,
) -> str | None:
    """Write the final HF checkpoint (rank 0, after gathering ZeRO-3 shards) and log it as an MLflow model.

    Returns:
        The MLflow model URI, when logged.
    """
    with full_parameters(engine) as module:
        if info.is_main:
            module.eval()
            save_checkpoint(output, module, loaded.tokenizer, loaded.image_cfg, metadata=metadata)
    barrier()
    model_uri = None
    if info.is_main and log_model:
        model_uri = tracker.log_model(output, metadata={k: str(v) for k, v in metadata.items()})
    return model_uri


def ensure_local_dir(path: str) -> Path:
    """Create a local directory (the work dir must be a filesystem path, shared across nodes)."""
    if "://" in path:
        raise ValueError(f"work_dir must be a local or mounted path, got {path}")
    target = Path(path)
    target.mkdir(parents=True, exist_ok=True)
    return target


def resolved_config(
    cfg: Any, info: DistInfo, engine: Engine, total_steps: int, trainable: dict[str, int]
) -> dict[str, Any]:
    """The stage config plus what was derived at launch (logged to MLflow, written beside checkpoints)."""
    return {
        **cfg.model_dump(mode="json"),
        "derived": {
            "world_size": info.world_size,
            "accumulation_steps": engine.accumulation_steps,
            "total_steps": total_steps,
            "bf16": engine.bf16,
            "trainable_parameters": trainable,
            "deepspeed": engine.ds_config,
        },
    }


def loop_context(
    cfg: Any,
    info: DistInfo,
    engine: Engine,
    tracker: Tracker,
    work_dir: Path,
    total_steps: int,
    resolved: dict[str, Any],
    run_id: str | None,
) -> LoopContext:
    """The training loop's context for a stage config."""
    return LoopContext(
        stage=cfg.stage,
        info=info,
        engine=engine,
        tracker=tracker,
        work_dir=work_dir,
        total_steps=total_steps,
        every_steps=cfg.checkpoint.every_steps,
        keep_last=cfg.checkpoint.keep_last,
        log_every=cfg.trainer.log_every,
        resolved_config=resolved,
        trainer_state={"mlflow_run_id": run_id, "stage": cfg.stage},
        flops_per_token=6.0 * parameter_count(engine.module),
    )
