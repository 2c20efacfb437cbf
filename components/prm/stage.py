"""The PRM stage (`vlpipe train prm`): the process reward model trained from a checkpoint on step-labelled
solutions.

validate → convert the solutions to `+`/`-` conversations (rank 0; every rank reads the result) → the LM flow
of the SFT stage on the replies (`vlpipe.components.sft.stage.train_lm`: mixture loader, packing, LM loss,
loop, save) → HF checkpoint. Besides the loss it logs `step_accuracy`: how often the model
prefers the right one of `+`/`-` at the reply positions of the training batch.

Trained as scored: at inference every reply of the conversation is a `+` placeholder (all steps go through one
forward, `vlpipe.serving.scoring`), so in training the reply tokens are `+` in the model's INPUT too,
while the labels keep the true `+`/`-` (`reply_placeholders`). With the true replies in the input the model
learns to copy the previous step's judgement (labels are strongly correlated along a solution: with
final-answer labels they are all equal) instead of judging the step, and at inference, where the previous
replies are all `+`, it then calls every step after the first correct (measured: P(+) ≈ 0.999 on steps 2-3
of wrong answers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlpipe.components.prm.data import load_prepared, prepare_prm_data
from vlpipe.components.sft.stage import train_lm
from vlpipe.components.training.common import begin_stage
from vlpipe.components.training.config import PRMStageConfig
from vlpipe.components.training.runtime import barrier, init_distributed
from vlpipe.model.tokenizer import single_token_id
from vlpipe.objectives.prm import MINUS, PLUS, reply_positions_from_labels


def step_accuracy_metric(tokenizer: Any):
    """Micro-batch metric: correct `+`/`-` preferences at the reply positions (numerator, denominator)."""
    plus_id, minus_id = single_token_id(tokenizer, PLUS), single_token_id(tokenizer, MINUS)

    def metric(logits: torch.Tensor, batch: dict[str, Any]) -> dict[str, tuple[float, float]]:
        labels = batch["labels"].to(logits.device)
        positions = reply_positions_from_labels(labels)  # (B, S), -1 padded
        valid = positions >= 0
        rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(positions)
        at = logits[rows, positions.clamp_min(0)].float()
        prefers_plus = at[..., plus_id] > at[..., minus_id]
        target = labels[rows, (positions + 1).clamp_min(0)]
        correct = (prefers_plus == (target == plus_id)) & valid
        return {"step_accuracy": (float(correct.sum()), float(valid.sum()))}

    return metric


def reply_placeholders(tokenizer: Any):
    """Batch transform: every reply token in `input_ids` becomes `+` (as at inference); labels unchanged."""
    plus_id = single_token_id(tokenizer, PLUS)

    def transform(batch: dict[str, Any]) -> dict[str, Any]:
        labels = batch["labels"]
        positions = reply_positions_from_labels(labels)  # (B, S), -1 padded; the reply token is at p + 1
        if labels.dim() == 1:
            positions = positions.unsqueeze(0)
        rows = torch.arange(positions.shape[0]).unsqueeze(1).expand_as(positions)
        valid = positions >= 0
        input_ids = batch["input_ids"].clone()
        flat = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
        flat[rows[valid], positions[valid] + 1] = plus_id
        return {**batch, "input_ids": input_ids}

    return transform


def main(cfg: PRMStageConfig) -> dict[str, Any]:
    """Run the PRM stage; returns the stage summary (see `vlpipe.components.sft.stage.train_lm`)."""
    info = init_distributed(cfg.trainer.distributed)
    out_dir = Path(cfg.resolved_work_dir) / "prm_data"
    if info.is_main:
        prepare_prm_data(cfg.data, out_dir)
    barrier()
    data, report = load_prepared(cfg.data, out_dir)
    return train_lm(
        cfg,
        data,
        micro_metrics=step_accuracy_metric,
        batch_transform=reply_placeholders,
        extra_report=report,
        start=begin_stage(cfg, info),
    )
