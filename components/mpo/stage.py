"""The MPO stage (`vlpipe train mpo`): mixed preference optimisation from the SFT checkpoint.

validate → load the policy → read and encode the pairs (bad ones counted) → reference log-probs of every
pair from the starting policy, computed once (that *is* the frozen reference: a copy of the starting policy)
and cached in the work dir → DeepSpeed training with `vlpipe.objectives.mpo.MPOLoss` → HF checkpoint. MPO's reward
shift δ is saved with every checkpoint and restored on resume.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from vlpipe.components.mpo.data import PairEncoder
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
from vlpipe.components.training.config import MPOStageConfig
from vlpipe.components.training.loop import IndexSource, StepReport
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
from vlpipe.model.collate import collate_padded
from vlpipe.model.conversation import ConversationEncoder
from vlpipe.model.data.meta import Quarantine
from vlpipe.model.errors import SampleError
from vlpipe.objectives.mpo import MPOLoss, sequence_logps

log = logging.getLogger(__name__)
REF_CACHE = "reference_logps.pt"
_REF_BATCH = 8


def _forward_logps(
    engine: Engine, pairs: list[tuple], device: torch.device, pad_token_id: int
) -> tuple[torch.Tensor, ...]:
    """Summed reply log-probs of chosen and rejected, mean chosen NLL, and real token count of a batch."""
    chosen, rejected = [p[0] for p in pairs], [p[1] for p in pairs]
    batch = collate_padded(chosen + rejected, pad_token_id)
    kwargs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids")}
    if "pixel_values" in batch:
        kwargs["pixel_values"] = batch["pixel_values"].to(device, engine.dtype)
    logits = engine.engine(**kwargs).logits
    logps, nll, _ = sequence_logps(logits, batch["labels"].to(device))
    n = len(pairs)
    return logps[:n], logps[n:], nll[:n], batch["attention_mask"].sum()


@torch.no_grad()
def reference_logps(
    engine: Engine, pairs: PairEncoder, info: DistInfo, device: torch.device
) -> tuple[dict[int, tuple[float, float]], dict[int, tuple[str, str]]]:
    """Log-probs of every pair under the starting policy, sharded over ranks and gathered.

    Every rank runs the same number of forward passes (ZeRO-3 needs that), padding its shard.

    Returns:
        `{pair index: (chosen logp, rejected logp)}` for the pairs that encode, and `{index: (reason, detail)}`
        for the ones that do not (skipped for the whole run).
    """
    engine.module.eval()
    indices = list(range(info.rank, len(pairs), info.world_size))
    per_rank = -(-len(pairs) // info.world_size)
    batches = -(-per_rank // _REF_BATCH)
    good: dict[int, tuple[float, float]] = {}
    bad: dict[int, tuple[str, str]] = {}
    for b in range(batches):
        chunk = indices[b * _REF_BATCH : (b + 1) * _REF_BATCH]
        encoded, kept = [], []
        for i in chunk:
            try:
                encoded.append(pairs.encode(i))
                kept.append(i)
            except SampleError as err:
                bad[i] = (err.reason, err.detail)
        if not encoded:  # keep the forward count equal across ranks
            encoded, kept = [pairs.encode(_first_good(pairs))], []
        chosen, rejected, _, _ = _forward_logps(engine, encoded, device, pairs.pad_token_id)
        for j, i in enumerate(kept):
            good[i] = (float(chosen[j]), float(rejected[j]))
    if dist.is_initialized() and info.world_size > 1:
        gathered: list[Any] = [None] * info.world_size
        dist.all_gather_object(gathered, (good, bad))
        good, bad = {}, {}
        for g, b in gathered:
            good.update(g)
            bad.update(b)
    engine.module.train()
    return good, bad


def _first_good(pairs: PairEncoder) -> int:
    for i in range(len(pairs)):
        try:
            pairs.encode(i)
            return i
        except SampleError:
            continue
    raise ValueError(f"no pair of {pairs.path} can be encoded (missing images or too long)")


def mpo_step(
    engine: Engine, loss_fn: MPOLoss, pairs: PairEncoder, good: list[int], ref: dict, info: DistInfo
):
    """The step function: one forward over chosen + rejected per micro-batch, MPO loss, backward, step."""
    device = device_for(info)
    zero0 = engine.ds_config["zero_optimization"]["stage"] == 0
    names = ("loss", "preference", "quality", "generation", "reward_accuracy", "reward_margin")

    def step(micros: list[list[int]]) -> dict[str, float]:
        totals = dict.fromkeys(names, 0.0)
        tokens, norm = 0.0, float("nan")
        for m, positions in enumerate(micros):
            indices = [good[p] for p in positions]
            encoded = [pairs.encode(i) for i in indices]
            chosen, rejected, nll, real = _forward_logps(engine, encoded, device, pairs.pad_token_id)
            ref_c = torch.tensor([ref[i][0] for i in indices], device=device)
            ref_r = torch.tensor([ref[i][1] for i in indices], device=device)
            out = loss_fn(chosen, rejected, ref_c, ref_r, nll)
            engine.engine.backward(out["loss"])
            if zero0 and m == len(micros) - 1:
                norm = local_grad_norm(engine.module)
            engine.engine.step()
            for name in names:
                totals[name] += float(out[name].detach())
            tokens += float(real)
        shift = float(loss_fn.reward_shift)
        sums = sum_over_ranks([totals[n] for n in names] + [tokens])
        count = len(micros) * info.world_size
        metrics = {name: sums[i] / count for i, name in enumerate(names)}
        metrics.update(tokens=sums[-1], reward_shift=shift, grad_norm=norm if zero0 else grad_norm(engine))
        return metrics

    return step


def main(cfg: MPOStageConfig) -> dict[str, Any]:
    """Run the MPO stage; returns its summary (output, MLflow ids, steps, losses, skip counts)."""
    # -- set up: policy, pairs, engine, reference log-probs, resume, MLflow run ----------------------------
    trainer = cfg.trainer
    start = begin_stage(cfg)
    info, loaded = start.info, start.loaded
    device = device_for(info)
    encoder = ConversationEncoder(loaded.tokenizer, loaded.tokens_per_tile, cfg.data.max_length, mode="sft")
    pairs = PairEncoder.create(cfg.data, encoder, loaded.image_cfg, loaded.v2pe_delta)
    engine = build_engine(loaded.model, trainer, info, total_steps=1)  # schedule length fixed below
    ref, bad = cached_reference_logps(cfg, start, engine, pairs, device)
    good = [i for i in pairs.epoch_indices() if i in ref]  # a dataset's repeat_time repeats its pairs
    quarantine = Quarantine(list(pairs.quarantine.entries))
    for i, (reason, detail) in sorted(bad.items()):
        quarantine.add(*pairs.source(i), reason, detail)
    skipped, lines = len(quarantine), pairs.pairs.total_lines
    if skipped / max(lines, 1) > cfg.data.max_bad_fraction:
        raise ValueError(
            f"{skipped} of {lines} pairs in {cfg.data.path} are unusable ({skipped / max(lines, 1):.1%} > "
            f"max_bad_fraction {cfg.data.max_bad_fraction:.1%}): {quarantine.summary()}. "
            "Fix the data or raise max_bad_fraction."
        )
    total_steps = steps_for(trainer, len(good))
    engine.schedule.total_steps = total_steps  # known only now that the usable pairs are counted
    loss_fn = MPOLoss.from_config(cfg.mpo).to(device).train()
    source = IndexSource(len(good), trainer.micro_batch_size, cfg.data.seed, info)
    resume = resume_point(start, cfg.checkpoint.resume, engine)
    start_step = 0
    if resume is not None:
        source.load_state_dict(resume.rank_state["data"])
        loss_fn.load_state_dict(resume.rank_state["mpo"])
        set_rng_state(resume.rank_state["rng"])
        start_step = resume.step
    data_report = {
        "pairs": lines,
        "pairs_used": len(ref),
        "pairs_per_epoch": len(good),
        "pairs_skipped": skipped,
        "skipped_lines": quarantine.counts,
        "skipped_examples": quarantine.entries[:100],
    }
    resolved = resolved_config(cfg, start, engine, total_steps)
    run = open_run(cfg, start, resolved, tags={"data_sha256": pairs.pairs.sha256}, resume=resume)
    step_fn = mpo_step(engine, loss_fn, pairs, good, ref, info)

    with run:
        # -- train: one optimizer step per iteration ----------------------------------------------------------
        report = StepReport(cfg, start, engine, run, total_steps, start_step, resolved)
        try:
            for step in range(start_step + 1, total_steps + 1):
                report.begin()
                metrics = step_fn(source.next(engine.accumulation_steps))
                report.end(step, metrics)
                report.checkpoint(step, {"data": source.state_dict(), "mpo": loss_fn.state_dict()})
        finally:
            report.close()

        # -- save: the pair report, the HF checkpoint --------------------------------------------------------
        run.log_dict(data_report, "data/pairs.json")
        metadata = {
            "preset": start.preset,
            "stage": cfg.stage,
            "parent": cfg.init,
            "mlflow_run_id": run.run_id,
        }
        model_uri = save_final(cfg, start, engine, run, metadata)
    return stage_summary(
        cfg,
        run,
        model_uri,
        total_steps,
        start_step,
        report.history,
        reward_shift=float(loss_fn.reward_shift),
        **{k: v for k, v in data_report.items() if k != "skipped_examples"},
    )


def cached_reference_logps(
    cfg: MPOStageConfig, start: StageStart, engine: Engine, pairs: PairEncoder, device: torch.device
) -> tuple[dict[int, tuple[float, float]], dict[int, tuple[str, str]]]:
    """`reference_logps`, cached in the work directory for a rerun or resume of the same init and data."""
    cache = start.work_dir / REF_CACHE
    key = {"init": cfg.init, "data": cfg.data.model_dump(mode="json"), "pairs": len(pairs), "version": 2}
    cached = torch.load(cache, weights_only=False) if cache.exists() else None
    if cached is not None and cached["key"] == key:
        return cached["ref"], cached["bad"]
    ref, bad = reference_logps(engine, pairs, start.info, device)
    if start.info.is_main:
        torch.save({"key": key, "ref": ref, "bad": bad}, cache)
    return ref, bad
