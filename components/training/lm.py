"""The LM-loss stages (pretrain, SFT, PRM): mixed stream → packed batches → square-averaged LM loss.

Exact global normalisation: the loss of an optimizer step is sum(w * CE) / sum(w) over *all* micro-batches
of *all* ranks (w = 1/sqrt(n) per token for square averaging). The step's total weight is all-reduced up
front from the labels alone, and each micro-batch's backward gets `weighted_sum * world * accumulation / W`
(DeepSpeed divides by the accumulation steps and averages over ranks). The gradient is then the same
whatever the split of the global batch over ranks and micro-batches: 2 processes reproduce 1 process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from components.training.common import (
    ensure_local_dir,
    load_start,
    loop_context,
    resolved_config,
    resume_point,
    save_final,
    steps_for,
)
from components.training.loop import PackedSource, PaddedSource, train_loop
from components.training.runtime import (
    DistInfo,
    Engine,
    all_reduce_sum,
    apply_freeze,
    build_engine,
    device_for,
    grad_norm,
    init_distributed,
    local_grad_norm,
    seed_everything,
    set_rng_state,
)
from components.training.tracking import Tracker
from model.data.config import DataConfig
from model.data.loader import MixtureLoader
from model.data.packing import model_inputs
from objectives.lm import lm_loss_terms, token_weights

log = logging.getLogger(__name__)
# Extra metrics of a micro-batch: (logits, batch) -> {name: (numerator, denominator)}, summed over the step.
MicroMetrics = Callable[[torch.Tensor, dict[str, Any]], dict[str, tuple[float, float]]]
MicroMetricsFactory = Callable[[Any], MicroMetrics]  # built from the stage's tokenizer
BatchTransform = Callable[[dict[str, Any]], dict[str, Any]]
BatchTransformFactory = Callable[[Any], BatchTransform]  # built from the stage's tokenizer


def _to_device(inputs: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    moved = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if key == "pixel_values":
                value = value.to(dtype)
        moved[key] = value
    return moved


def make_lm_step(
    engine: Engine,
    info: DistInfo,
    reduction: str,
    attn_implementation: str,
    micro_metrics: MicroMetrics | None = None,
    transform: BatchTransform | None = None,
) -> Callable[[list[dict[str, Any]]], dict[str, float]]:
    """The step function of an LM stage (see the module docstring for the normalisation)."""
    device = device_for(info)
    zero0 = engine.ds_config["zero_optimization"]["stage"] == 0

    def step(micros: list[dict[str, Any]]) -> dict[str, float]:
        local_weight = sum(
            float(token_weights(m["labels"], m["sample_index"], reduction).sum()) for m in micros
        )
        real_tokens = sum(int((m["sample_index"] >= 0).sum()) for m in micros)
        slots = sum(m["sample_index"].numel() for m in micros)
        total_weight = all_reduce_sum([local_weight])[0]
        denominator = total_weight if total_weight > 0 else 1.0
        scale = info.world_size * engine.accumulation_steps / denominator
        weighted, supervised, norm = 0.0, 0, float("nan")
        extra: dict[str, list[float]] = {}
        for i, batch in enumerate(micros):
            if transform is not None:
                batch = transform(batch)
            inputs = _to_device(model_inputs(batch, attn_implementation, engine.dtype), device, engine.dtype)
            logits = engine.engine(**inputs).logits
            labels = batch["labels"].to(device)
            terms = lm_loss_terms(logits, labels, batch["sample_index"].to(device), reduction)
            engine.engine.backward(terms.weighted_sum * scale)
            if zero0 and i == len(micros) - 1:
                norm = local_grad_norm(engine.module)  # gradients are all-reduced by now
            engine.engine.step()
            weighted += float(terms.weighted_sum.detach())
            supervised += int(terms.num_tokens)
            if micro_metrics is not None:
                with torch.no_grad():
                    for name, (num, den) in micro_metrics(logits.detach(), batch).items():
                        acc = extra.setdefault(name, [0.0, 0.0])
                        acc[0] += num
                        acc[1] += den
        names = sorted(extra)
        sums = all_reduce_sum(
            [weighted, float(supervised), float(real_tokens), float(slots)]
            + [v for name in names for v in extra[name]]
        )
        metrics = {
            "loss": sums[0] / denominator,
            "supervised_tokens": sums[1],
            "tokens": sums[2],
            "token_utilisation": sums[2] / max(sums[3], 1.0),
            "grad_norm": norm if zero0 else grad_norm(engine),
        }
        for j, name in enumerate(names):
            num, den = sums[4 + 2 * j], sums[5 + 2 * j]
            metrics[name] = num / den if den else float("nan")
        return metrics

    return step


def _units_per_epoch(loader: MixtureLoader, cfg: Any) -> float:
    """Samples (no packing) or estimated packed rows per epoch of the mixture."""
    stream = loader.stream
    samples = sum(len(d.records) * d.spec.repeat_time for d in loader.datasets)
    if cfg.packing is None:
        return samples
    tokens = sum(len(d.records) * d.spec.repeat_time * stream.mean_tokens[d.name] for d in loader.datasets)
    # Greedy packing fills ~95-99% of a row (measured by `make bench`); assume 95%.
    return tokens / (cfg.packing.max_tokens * 0.95)


def _gather_stats(loader: MixtureLoader) -> tuple[dict[str, int], dict[str, int]]:
    names = list(loader.stats.samples)
    sums = all_reduce_sum(
        [float(loader.stats.samples[n]) for n in names] + [float(loader.stats.tokens[n]) for n in names]
    )
    k = len(names)
    return (
        {n: int(sums[i]) for i, n in enumerate(names)},
        {n: int(sums[k + i]) for i, n in enumerate(names)},
    )


def run_lm_stage(
    cfg: Any,
    data: DataConfig,
    *,
    micro_metrics: MicroMetricsFactory | None = None,
    batch_transform: BatchTransformFactory | None = None,
    extra_tags: dict[str, str] | None = None,
    extra_report: dict[str, Any] | None = None,
    info: DistInfo | None = None,
) -> dict[str, Any]:
    """Validate → set up → train → save → clean up, for pretrain, SFT and PRM.

    Args:
        cfg: a validated `PretrainStageConfig`, `SFTStageConfig` or `PRMStageConfig`.
        data: the data settings (the PRM stage passes its converted conversations).
        micro_metrics: builds extra per-micro-batch metrics from the tokenizer (PRM step accuracy).
        batch_transform: builds, from the tokenizer, a function applied to every micro-batch before the
            forward (the PRM's reply placeholders).
        extra_tags: more MLflow tags.
        extra_report: more facts for the stage's result (e.g. the PRM conversion's skip counts).
        info: the process group, when the caller already joined it.

    Returns:
        A summary: output checkpoint, MLflow run and model URIs, steps, first/last loss, data manifest.
    """
    trainer = cfg.trainer
    info = info or init_distributed(trainer.distributed)
    seed_everything(trainer.seed)
    work_dir = ensure_local_dir(cfg.resolved_work_dir)

    # -- set up: model, data, engine, resume --------------------------------------------------------------
    loaded = load_start(cfg.init, info, trainer.attn_implementation)
    trainable = apply_freeze(loaded.model, trainer.freeze)
    loader = MixtureLoader(
        data,
        loaded.tokenizer,
        loaded.image_cfg,
        loaded.tokens_per_tile,
        rank=info.rank,
        world_size=info.world_size,
    )
    pad_id = loaded.tokenizer.pad_token_id
    if cfg.packing is not None:
        source: Any = PackedSource(loader, cfg.packing, trainer.micro_batch_size, pad_id)
    else:
        source = PaddedSource(loader, trainer.micro_batch_size, pad_id)
    total_steps = steps_for(trainer, _units_per_epoch(loader, cfg))
    engine = build_engine(loaded.model, trainer, info, total_steps)
    resume = resume_point(str(work_dir), cfg.checkpoint.resume, engine, info)
    start_step = 0
    if resume is not None:
        source.load_state_dict(resume.rank_state["data"])
        set_rng_state(resume.rank_state["rng"])
        start_step = resume.step
    packing = cfg.packing.model_dump() if cfg.packing else None
    manifest_hash = loader.manifest(packing=packing)["manifest_sha256"]
    resolved = resolved_config(cfg, info, engine, total_steps, trainable)
    tracker = Tracker(info.is_main)
    preset = str(loaded.metadata.get("preset", "unknown"))
    run_id = tracker.start(
        stage=cfg.stage,
        tracking=cfg.tracking,
        resolved_config=resolved,
        extra_tags={"preset": preset, "data_manifest_sha256": manifest_hash, **(extra_tags or {})},
        resume_run_id=resume.trainer_state.get("mlflow_run_id") if resume else None,
    )
    if info.is_main and start_step == 0:
        log.info(
            "%s: %d steps, global batch %d (%d ranks x %d micro x %d accumulation), trainable %s",
            cfg.stage,
            total_steps,
            trainer.global_batch_size,
            info.world_size,
            trainer.micro_batch_size,
            engine.accumulation_steps,
            trainable,
        )

    # -- train --------------------------------------------------------------------------------------------
    ctx = loop_context(cfg, info, engine, tracker, work_dir, total_steps, resolved, run_id)
    status = "FAILED"
    try:
        metric = micro_metrics(loaded.tokenizer) if micro_metrics else None
        transform = batch_transform(loaded.tokenizer) if batch_transform else None
        step_fn = make_lm_step(
            engine, info, cfg.loss.reduction, trainer.attn_implementation, metric, transform
        )
        history = train_loop(ctx, source, step_fn, start_step=start_step)

        # -- save -----------------------------------------------------------------------------------------
        samples, tokens = _gather_stats(loader)
        manifest = loader.manifest(packing=packing)
        for name, info_ in manifest["datasets"].items():  # counts over all ranks, not just rank 0
            info_["samples_used"], info_["tokens_used"] = samples[name], tokens[name]
        manifest["unpackable"] = dict(getattr(source, "unpackable", {}))
        tracker.log_manifest(manifest, loader.quarantine.report())
        if extra_report:
            tracker.log_dict(extra_report, "data/conversion.json")
        metadata = {
            "preset": preset,
            "stage": cfg.stage,
            "parent": cfg.init,
            "mlflow_run_id": run_id,
            "data_manifest_sha256": manifest_hash,
        }
        model_uri = save_final(
            cfg.output, engine, loaded, info, tracker, metadata=metadata, log_model=cfg.tracking.log_model
        )
        status = "FINISHED"
    finally:
        tracker.finish(status)
    losses = [h["loss"] for h in history]
    return {
        "stage": cfg.stage,
        "output": cfg.output,
        "mlflow_run_id": run_id,
        "model_uri": model_uri,
        "steps": total_steps,
        "resumed_from_step": start_step,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "data_manifest_sha256": manifest_hash,
        "quarantined": len(loader.quarantine),
        **(extra_report or {}),
    }
