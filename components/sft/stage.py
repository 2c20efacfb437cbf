"""The SFT stage, and the LM-loss flow that pre-training, the critic and the PRM train with too.

validate (the config, before this runs) → set up (process group, starting checkpoint, mixture loader, packing,
DeepSpeed engine, resume point, MLflow run) → the optimizer-step loop → save (the HF checkpoint, the data
manifest) → clean up (the run is closed; `vlpipe.components.training.entrypoint` tears the process group down).

The chat template puts the loss on the assistant replies (pre-training: every text token; image tokens are
never supervised); samples are packed into block-diagonal rows; the loss is square-averaged; JPEG augmentation
applies where a dataset's `data_augment` is on.

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

from vlpipe.components.training.common import (
    StageStart,
    begin_stage,
    open_run,
    resolved_config,
    resume_point,
    save_final,
    stage_summary,
    steps_for,
)
from vlpipe.components.training.config import SFTStageConfig
from vlpipe.components.training.loop import PackedSource, PaddedSource, StepReport
from vlpipe.components.training.runtime import (
    DistInfo,
    Engine,
    build_engine,
    device_for,
    grad_norm,
    local_grad_norm,
    set_rng_state,
    sum_over_ranks,
)
from vlpipe.model.data.config import DataConfig
from vlpipe.model.data.loader import MixtureLoader
from vlpipe.model.data.packing import model_inputs
from vlpipe.objectives.lm import lm_loss_terms, token_weights

log = logging.getLogger(__name__)
# Extra metrics of a micro-batch: (logits, batch) -> {name: (numerator, denominator)}, summed over the step.
MicroMetrics = Callable[[torch.Tensor, dict[str, Any]], dict[str, tuple[float, float]]]
# A function applied to every micro-batch before the forward.
BatchTransform = Callable[[dict[str, Any]], dict[str, Any]]


def main(cfg: SFTStageConfig) -> dict[str, Any]:
    """Run the SFT stage; returns its summary (see `train_lm`)."""
    return train_lm(cfg, cfg.data)


def train_lm(
    cfg: Any,
    data: DataConfig,
    *,
    micro_metrics: Callable[[Any], MicroMetrics] | None = None,
    batch_transform: Callable[[Any], BatchTransform] | None = None,
    extra_report: dict[str, Any] | None = None,
    start: StageStart | None = None,
) -> dict[str, Any]:
    """Set up → train → save → clean up, with the LM loss (SFT, pre-training, the critic, the PRM).

    Args:
        cfg: a validated `SFTStageConfig`, `PretrainStageConfig` or `PRMStageConfig`.
        data: the data settings (the PRM stage passes its converted conversations).
        micro_metrics: builds, from the tokenizer, extra per-micro-batch metrics (PRM step accuracy).
        batch_transform: builds, from the tokenizer, a function applied to every micro-batch before the
            forward (the PRM's reply placeholders).
        extra_report: more facts for the stage's result and MLflow (e.g. the PRM conversion's skip counts).
        start: the stage's start, when the caller already began it.

    Returns:
        A summary: output checkpoint, MLflow run and model URIs, steps, first/last loss, data manifest.
    """
    # -- set up: model, data, engine, resume, MLflow run ---------------------------------------------------
    trainer = cfg.trainer
    start = start or begin_stage(cfg)
    info, tokenizer = start.info, start.loaded.tokenizer
    loader = MixtureLoader(
        data,
        tokenizer,
        start.loaded.image_cfg,
        start.loaded.tokens_per_tile,
        rank=info.rank,
        world_size=info.world_size,
    )
    if cfg.packing is not None:
        source: Any = PackedSource(loader, cfg.packing, trainer.micro_batch_size, tokenizer.pad_token_id)
    else:
        source = PaddedSource(loader, trainer.micro_batch_size, tokenizer.pad_token_id)
    total_steps = steps_for(trainer, _units_per_epoch(loader, cfg))
    engine = build_engine(start.loaded.model, trainer, info, total_steps)
    resume = resume_point(start, cfg.checkpoint.resume, engine)
    start_step = 0
    if resume is not None:
        source.load_state_dict(resume.rank_state["data"])
        set_rng_state(resume.rank_state["rng"])
        start_step = resume.step
    packing = cfg.packing.model_dump() if cfg.packing else None
    manifest_hash = loader.manifest(packing=packing)["manifest_sha256"]
    resolved = resolved_config(cfg, start, engine, total_steps)
    run = open_run(cfg, start, resolved, tags={"data_manifest_sha256": manifest_hash}, resume=resume)
    if info.is_main and start_step == 0:
        log.info(
            "%s: %d steps, global batch %d (%d ranks x %d micro x %d accumulation), trainable %s",
            cfg.stage, total_steps, trainer.global_batch_size, info.world_size, trainer.micro_batch_size,
            engine.accumulation_steps, start.trainable,
        )  # fmt: skip
    step_fn = lm_step(
        engine,
        info,
        cfg.loss.reduction,
        trainer.attn_implementation,
        micro_metrics(tokenizer) if micro_metrics else None,
        batch_transform(tokenizer) if batch_transform else None,
    )

    with run:
        # -- train: one optimizer step per iteration ----------------------------------------------------------
        report = StepReport(cfg, start, engine, run, total_steps, start_step, resolved)
        try:
            for step in range(start_step + 1, total_steps + 1):
                report.begin()
                metrics = step_fn(source.next(engine.accumulation_steps))
                report.end(step, metrics)
                report.checkpoint(step, {"data": source.state_dict()})
        finally:
            report.close()

        # -- save: data manifest (counts over all ranks), the HF checkpoint -----------------------------------
        manifest = loader.manifest(packing=packing)
        samples, tokens = _counts_over_ranks(loader)
        for name, entry in manifest["datasets"].items():
            entry["samples_used"], entry["tokens_used"] = samples[name], tokens[name]
        manifest["unpackable"] = dict(getattr(source, "unpackable", {}))
        if run.active:
            from vlpipe.model.data.provenance import log_manifest_to_mlflow

            log_manifest_to_mlflow(manifest, loader.quarantine.report())
        if extra_report:
            run.log_dict(extra_report, "data/conversion.json")
        metadata = {
            "preset": start.preset,
            "stage": cfg.stage,
            "parent": cfg.init,
            "mlflow_run_id": run.run_id,
            "data_manifest_sha256": manifest_hash,
        }
        model_uri = save_final(cfg, start, engine, run, metadata)
    return stage_summary(
        cfg,
        run,
        model_uri,
        total_steps,
        start_step,
        report.history,
        data_manifest_sha256=manifest_hash,
        quarantined=len(loader.quarantine),
        **(extra_report or {}),
    )


def lm_step(
    engine: Engine,
    info: DistInfo,
    reduction: str,
    attn_implementation: str,
    micro_metrics: MicroMetrics | None = None,
    transform: BatchTransform | None = None,
) -> Callable[[list[dict[str, Any]]], dict[str, float]]:
    """One optimizer step of the LM loss over a step's micro-batches (see the module docstring for the
    normalisation); returns the step's metrics, summed over ranks."""
    device = device_for(info)
    zero0 = engine.ds_config["zero_optimization"]["stage"] == 0

    def step(micros: list[dict[str, Any]]) -> dict[str, float]:
        local_weight = sum(
            float(token_weights(m["labels"], m["sample_index"], reduction).sum()) for m in micros
        )
        real_tokens = sum(int((m["sample_index"] >= 0).sum()) for m in micros)
        slots = sum(m["sample_index"].numel() for m in micros)
        total_weight = sum_over_ranks([local_weight])[0]
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
        sums = sum_over_ranks(
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


def _to_device(inputs: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    moved = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if key == "pixel_values":
                value = value.to(dtype)
        moved[key] = value
    return moved


def _units_per_epoch(loader: MixtureLoader, cfg: Any) -> float:
    """Samples (no packing) or estimated packed rows per epoch of the mixture."""
    stream = loader.stream
    samples = sum(len(d) * d.spec.repeat_time for d in loader.datasets)
    if cfg.packing is None:
        return samples
    tokens = sum(len(d) * d.spec.repeat_time * stream.mean_tokens[d.name] for d in loader.datasets)
    # Greedy packing fills ~95-99% of a row (measured by `make bench`); assume 95%.
    return tokens / (cfg.packing.max_tokens * 0.95)


def _counts_over_ranks(loader: MixtureLoader) -> tuple[dict[str, int], dict[str, int]]:
    """Samples and tokens used per dataset, summed over ranks."""
    names = list(loader.stats.samples)
    sums = sum_over_ranks(
        [float(loader.stats.samples[n]) for n in names] + [float(loader.stats.tokens[n]) for n in names]
    )
    k = len(names)
    return (
        {n: int(sums[i]) for i, n in enumerate(names)},
        {n: int(sums[k + i]) for i, n in enumerate(names)},
    )
