"""`vlpipe train mpo`: mixed preference optimisation from the SFT checkpoint.

validate → load the policy → read and encode the pairs (bad ones counted) → reference log-probs of every
pair from the starting policy, computed once (that *is* the frozen reference: a copy of the starting policy)
and cached in the work dir → DeepSpeed training with `objectives.mpo.MPOLoss` → HF checkpoint. MPO's reward
shift δ is saved with every checkpoint and restored on resume.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from components.mpo.data import PairEncoder
from components.training.common import (
    ensure_local_dir,
    load_start,
    loop_context,
    resolved_config,
    resume_point,
    save_final,
    steps_for,
)
from components.training.config import MPOStageConfig
from components.training.loop import IndexSource, train_loop
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
from model.collate import collate_padded
from model.conversation import ConversationEncoder
from model.errors import SampleError
from objectives.mpo import MPOLoss, sequence_logps

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
) -> tuple[dict[int, tuple[float, float]], dict[int, str]]:
    """Log-probs of every pair under the starting policy, sharded over ranks and gathered.

    Every rank runs the same number of forward passes (ZeRO-3 needs that), padding its shard.

    Returns:
        `{pair index: (chosen logp, rejected logp)}` for the pairs that encode, and `{index: reason}` for the
        ones that do not (skipped for the whole run).
    """
    engine.module.eval()
    indices = list(range(info.rank, len(pairs), info.world_size))
    per_rank = -(-len(pairs) // info.world_size)
    batches = -(-per_rank // _REF_BATCH)
    good: dict[int, tuple[float, float]] = {}
    bad: dict[int, str] = {}
    for b in range(batches):
        chunk = indices[b * _REF_BATCH : (b + 1) * _REF_BATCH]
        encoded, kept = [], []
        for i in chunk:
            try:
                encoded.append(pairs.encode(i))
                kept.append(i)
            except SampleError as err:
                bad[i] = f"{err.reason}: {err.detail}"
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
    raise ValueError(f"no pair of {pairs.records.path} can be encoded (missing images or too long)")


def make_mpo_step(
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
        sums = all_reduce_sum([totals[n] for n in names] + [tokens])
        count = len(micros) * info.world_size
        metrics = {name: sums[i] / count for i, name in enumerate(names)}
        metrics.update(tokens=sums[-1], reward_shift=shift, grad_norm=norm if zero0 else grad_norm(engine))
        return metrics

    return step


def main(cfg: MPOStageConfig) -> dict[str, Any]:
    """Run the MPO stage; returns its summary (output, MLflow ids, steps, losses, skip counts)."""
    trainer = cfg.trainer
    info = init_distributed(trainer.distributed)
    seed_everything(trainer.seed)
    work_dir = ensure_local_dir(cfg.resolved_work_dir)
    device = device_for(info)

    # -- set up -------------------------------------------------------------------------------------------
    loaded = load_start(cfg.init, info, trainer.attn_implementation)
    trainable = apply_freeze(loaded.model, trainer.freeze)
    encoder = ConversationEncoder(loaded.tokenizer, loaded.tokens_per_tile, cfg.data.max_length, mode="sft")
    pairs = PairEncoder.create(cfg.data, encoder, loaded.image_cfg, loaded.v2pe_delta)
    engine = build_engine(loaded.model, trainer, info, total_steps=1)  # schedule length fixed below

    cache = Path(work_dir) / REF_CACHE
    key = {"init": cfg.init, "data": cfg.data.model_dump(mode="json"), "pairs": len(pairs)}
    cached = torch.load(cache, weights_only=False) if cache.exists() else None
    if cached is not None and cached["key"] == key:
        ref, bad = cached["ref"], cached["bad"]
    else:
        ref, bad = reference_logps(engine, pairs, info, device)
        if info.is_main:
            torch.save({"key": key, "ref": ref, "bad": bad}, cache)
    good = sorted(ref)
    skipped = len(pairs.records.quarantine) + len(bad)
    if (skipped / max(pairs.records.total_lines, 1)) > cfg.data.max_bad_fraction:
        raise ValueError(
            f"{skipped} of {pairs.records.total_lines} pairs in {cfg.data.path} are unusable "
            f"(> max_bad_fraction {cfg.data.max_bad_fraction}); first reasons: {list(bad.values())[:3]}"
        )
    total_steps = steps_for(trainer, len(good))
    engine.schedule.total_steps = total_steps  # known only now that the usable pairs are counted
    loss_fn = MPOLoss.from_config(cfg.mpo).to(device).train()
    source = IndexSource(len(good), trainer.micro_batch_size, cfg.data.seed, info)
    resume = resume_point(str(work_dir), cfg.checkpoint.resume, engine, info)
    start_step = 0
    if resume is not None:
        source.load_state_dict(resume.rank_state["data"])
        loss_fn.load_state_dict(resume.rank_state["mpo"])
        set_rng_state(resume.rank_state["rng"])
        start_step = resume.step
    data_report = {
        "pairs": pairs.records.total_lines,
        "pairs_used": len(good),
        "pairs_skipped": skipped,
        "skipped_lines": pairs.records.quarantine.counts,
        "skipped_encoding": dict(list(bad.items())[:100]),
    }
    resolved = resolved_config(cfg, info, engine, total_steps, trainable)
    tracker = Tracker(info.is_main)
    preset = str(loaded.metadata.get("preset", "unknown"))
    run_id = tracker.start(
        stage=cfg.stage,
        tracking=cfg.tracking,
        resolved_config=resolved,
        extra_tags={"preset": preset, "data_sha256": pairs.records.sha256},
        resume_run_id=resume.trainer_state.get("mlflow_run_id") if resume else None,
    )

    # -- train --------------------------------------------------------------------------------------------
    ctx = loop_context(cfg, info, engine, tracker, work_dir, total_steps, resolved, run_id)
    status = "FAILED"
    try:
        step_fn = make_mpo_step(engine, loss_fn, pairs, good, ref, info)
        history = train_loop(
            ctx, source, step_fn, start_step=start_step, extra_state=lambda: {"mpo": loss_fn.state_dict()}
        )
        # -- save -----------------------------------------------------------------------------------------
        tracker.log_dict(data_report, "data/pairs.json")
        metadata = {"preset": preset, "stage": cfg.stage, "parent": cfg.init, "mlflow_run_id": run_id}
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
        "reward_shift": float(loss_fn.reward_shift),
        **{k: v for k, v in data_report.items() if k != "skipped_encoding"},
    }
