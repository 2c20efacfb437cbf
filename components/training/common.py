"""The set-up and wrap-up every training stage shares, one helper each: `begin_stage` (process group, seed, work
directory, starting checkpoint, frozen parts), `resume_point`, `open_run` (the stage's MLflow run with its resolved
config), `save_final` (the HF checkpoint, also as an MLflow model) and `stage_summary` (the stage's result).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlpipe.components.training.runtime import (
    DistInfo,
    Engine,
    apply_freeze,
    barrier,
    full_parameters,
    init_distributed,
    seed_everything,
)
from vlpipe.components.training.state import ResumeState, checkpoint_dir, restore_latest
from vlpipe.model.checkpoint import LoadedModel, load_checkpoint, save_checkpoint
from vlpipe.tracking.runs import Run

log = logging.getLogger(__name__)


@dataclass
class StageStart:
    """What a training stage has after `begin_stage`: its rank, work directory and starting model."""

    info: DistInfo
    work_dir: Path
    loaded: LoadedModel
    trainable: dict[str, int]
    """Trainable parameters per model part after freezing."""
    checkpoints: str = ""
    """Where resumable checkpoints go: `checkpoint.location`, default `<work_dir>/checkpoints`."""

    @property
    def preset(self) -> str:
        return str(self.loaded.metadata.get("preset", "unknown"))


def begin_stage(cfg: Any, info: DistInfo | None = None) -> StageStart:
    """Join the process group (unless `info` says the caller did), seed, create the work directory, load the
    starting checkpoint (rank 0 first, so a remote one downloads once) and freeze the configured parts.

    Raises:
        ValueError: a remote work directory.
        FileNotFoundError: when `cfg.init` is not a checkpoint.
    """
    trainer = cfg.trainer
    info = info or init_distributed(trainer.distributed)
    seed_everything(trainer.seed)
    work_dir = ensure_local_dir(cfg.resolved_work_dir)
    template = getattr(cfg, "chat_template", None)
    if info.is_main:
        loaded = load_checkpoint(cfg.init, chat_template=template)
    barrier()
    if not info.is_main:
        loaded = load_checkpoint(cfg.init, chat_template=template)
    loaded.model.set_attn_implementation(trainer.attn_implementation)
    loaded.model.train()
    trainable = apply_freeze(loaded.model, trainer.freeze)
    return StageStart(info, work_dir, loaded, trainable, checkpoint_location(cfg, work_dir))


def checkpoint_location(cfg: Any, work_dir: Path) -> str:
    """The stage's checkpoint location: `checkpoint.location`, default `<work_dir>/checkpoints`."""
    return cfg.checkpoint.location or str(checkpoint_dir(work_dir))


def resume_point(start: StageStart, enabled: bool, engine: Engine) -> ResumeState | None:
    """Restore the newest committed checkpoint at the stage's checkpoint location into `engine` (a collective;
    None when starting fresh). A remote one is downloaded once per node."""
    if not enabled:
        return None
    state = restore_latest(start.checkpoints or checkpoint_dir(start.work_dir), engine, start.info)
    if state is not None and start.info.is_main:
        log.info("resuming from %s (step %d)", state.path, state.step)
    return state


def steps_for(trainer: Any, units_per_epoch: float) -> int:
    """Optimizer steps of the run: `max_steps`, or `epochs` x units per epoch / global batch (rounded up)."""
    if trainer.max_steps is not None:
        return int(trainer.max_steps)
    return max(1, math.ceil(trainer.epochs * units_per_epoch / trainer.global_batch_size))


def ensure_local_dir(path: str) -> Path:
    """Create a local directory (the work dir must be a filesystem path, shared across nodes)."""
    if "://" in path:
        raise ValueError(f"work_dir must be a local or mounted path, got {path}")
    target = Path(path)
    target.mkdir(parents=True, exist_ok=True)
    return target


def resolved_config(cfg: Any, start: StageStart, engine: Engine, total_steps: int) -> dict[str, Any]:
    """The stage config plus what was derived at launch (logged to MLflow, written beside checkpoints)."""
    return {
        **cfg.model_dump(mode="json"),
        "derived": {
            "world_size": start.info.world_size,
            "accumulation_steps": engine.accumulation_steps,
            "total_steps": total_steps,
            "bf16": engine.bf16,
            "trainable_parameters": start.trainable,
            "deepspeed": engine.ds_config,
        },
    }


def open_run(
    cfg: Any,
    start: StageStart,
    resolved: dict[str, Any],
    *,
    tags: dict[str, str],
    resume: ResumeState | None,
) -> Run:
    """The stage's MLflow run (rank 0; reopened on resume), with its tags, params and resolved config."""
    tracking = cfg.tracking
    run = Run(start.info.is_main)
    run.start(
        tracking.run_name or cfg.stage,
        experiment=tracking.experiment,
        recipe=tracking.recipe,
        parent_run_id=tracking.parent_run_id,
        stage=cfg.stage,
        tags={**tracking.tags, "preset": start.preset, **tags},
        config=resolved,
        resume_run_id=resume.trainer_state.get("mlflow_run_id") if resume else None,
        system_metrics=tracking.system_metrics,
    )
    return run


def save_final(cfg: Any, start: StageStart, engine: Engine, run: Run, metadata: dict[str, Any]) -> str | None:
    """Write the final HF checkpoint to `cfg.output` (rank 0, after gathering ZeRO-3 shards) and, with
    `tracking.log_model`, log it as an MLflow pyfunc model.

    Returns:
        The MLflow model URI, when logged.
    """
    # The tokens the starting checkpoint needed rows for stay on record; an unknown preset is not written down.
    carried = {k: v for k, v in start.loaded.metadata.items() if k == "added_tokens"}
    metadata = {**carried, **{k: v for k, v in metadata.items() if not (k == "preset" and v == "unknown")}}
    with full_parameters(engine) as module:
        if start.info.is_main:
            module.eval()
            loaded = start.loaded
            save_checkpoint(cfg.output, module, loaded.tokenizer, loaded.image_cfg, metadata=metadata)
    barrier()
    if not (run.active and cfg.tracking.log_model):
        return None
    from vlpipe.serving.pyfunc import log_checkpoint_model

    info = log_checkpoint_model(cfg.output, name="model", metadata={k: str(v) for k, v in metadata.items()})
    return info.model_uri


def stage_summary(
    cfg: Any,
    run: Run,
    model_uri: str | None,
    total_steps: int,
    start_step: int,
    history: list[dict[str, Any]],
    **extra: Any,
) -> dict[str, Any]:
    """A training stage's result: output checkpoint, MLflow run and model URIs, steps, first/last loss, extras."""
    losses = [h["loss"] for h in history]
    return {
        "stage": cfg.stage,
        "output": cfg.output,
        "mlflow_run_id": run.run_id,
        "model_uri": model_uri,
        "steps": total_steps,
        "resumed_from_step": start_step,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        **extra,
    }
