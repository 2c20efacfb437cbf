"""Next-token language-modelling loss for pre-training and SFT, with token / sample / square averaging.

Conventions shared by every function here:

* `labels` is aligned with `input_ids` (shape (B, T)); the shift happens inside: `logits[:, t]` predicts
  `labels[:, t + 1]`. Positions labelled `IGNORE_INDEX` (-100) are not supervised.
* Each supervised target token gets a weight w that depends on n, the number of supervised target tokens
  of the (packed sub-)sample it belongs to: "token" w = 1, "sample" w = 1/n, "square" w = 1/sqrt(n)
  (InternVL2.5/3's square averaging). The loss is sum(w * CE) / sum(w).
* `sample_index` (B, T) gives each token's sub-sample id in a packed row; ids need only be unique within
  a row and may be anything (e.g. -1) on padding. Without it, each row is one sample. A target's
  sub-sample is the id at the target's own position.
* Packing assumption (the packer's job): the label of the first token of every sub-sample is -100, so no
  token of one sub-sample is trained to predict the next sub-sample's first token. Under that assumption a
  packed batch and the same samples unpacked give the same loss and gradients.
* Computation is in float32 whatever the logits' dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vlpipe.objectives.config import REDUCTIONS, LMLossConfig, Reduction
from vlpipe.objectives.distributed import all_reduce_sum, get_world_size

__all__ = [
    "IGNORE_INDEX",
    "LMLossConfig",
    "LMLossTerms",
    "Reduction",
    "lm_loss",
    "lm_loss_terms",
    "token_weights",
]

IGNORE_INDEX = -100

_WEIGHT_FNS: dict[str, Callable[[Tensor], Tensor]] = {
    "token": torch.ones_like,
    "sample": torch.reciprocal,
    "square": torch.rsqrt,
}


@dataclass(frozen=True)
class LMLossTerms:
    """The pieces of the LM loss on one (micro-)batch, for callers that normalise themselves.

    With gradient accumulation over micro-batches m and data parallelism over ranks, the loss of
    micro-batch m that makes averaged gradients equal the gradient of the global step loss is
    `terms_m.weighted_sum * world_size / W`, where W is the all-reduced sum of `weight_sum` over every
    micro-batch of the step (compute it up front with `token_weights(...).sum()`, which needs no logits).
    If the engine also divides by the number of accumulation steps (DeepSpeed does), multiply by that too.

    Attributes:
        weighted_sum: sum(w * CE) over supervised targets; float32 scalar connected to the logits.
        weight_sum: sum(w); float32 scalar without grad.
        num_tokens: number of supervised targets; int64 scalar.
    """

    weighted_sum: Tensor
    weight_sum: Tensor
    num_tokens: Tensor


def _check_reduction(reduction: str) -> None:
    if reduction not in _WEIGHT_FNS:
        raise ValueError(f"unknown LM loss reduction {reduction!r}; allowed: {', '.join(REDUCTIONS)}")


def _check_shapes(labels: Tensor, sample_index: Tensor | None, logits: Tensor | None = None) -> None:
    if labels.dim() != 2:
        raise ValueError(f"labels must be (batch, seq_len); got shape {tuple(labels.shape)}")
    if logits is not None and (logits.dim() != 3 or logits.shape[:2] != labels.shape):
        raise ValueError(
            f"logits must be (batch, seq_len, vocab) matching labels {tuple(labels.shape)}; "
            f"got {tuple(logits.shape)}"
        )
    if sample_index is not None and sample_index.shape != labels.shape:
        raise ValueError(
            f"sample_index must have the shape of labels {tuple(labels.shape)}; got {tuple(sample_index.shape)}"
        )


def token_weights(
    labels: Tensor, sample_index: Tensor | None = None, reduction: Reduction = "square"
) -> Tensor:
    """Per-target weights of the LM loss; needs no logits.

    Args:
        labels: (B, T) token ids aligned with input_ids, -100 where not supervised.
        sample_index: optional (B, T) sub-sample id of each token in a packed row.
        reduction: "token", "sample" or "square".

    Returns:
        (B, T - 1) float32 weights of the shifted targets `labels[:, 1:]`; 0 where not supervised.

    Raises:
        ValueError: on an unknown reduction or mismatched shapes.
    """
    _check_reduction(reduction)
    _check_shapes(labels, sample_index)
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    weights = torch.zeros(targets.shape, dtype=torch.float32, device=labels.device)
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(targets)[supervised]
    if sample_index is None:
        sub_samples = torch.zeros_like(rows)
    else:
        sub_samples = sample_index[:, 1:][supervised].to(rows.dtype)
    # Sub-sample ids are unique only within a row, so a sample is a (row, id) pair.
    _, group, group_sizes = torch.unique(
        torch.stack([rows, sub_samples], dim=1), dim=0, return_inverse=True, return_counts=True
    )
    tokens_in_sample = group_sizes[group].to(torch.float32)
    weights[supervised] = _WEIGHT_FNS[reduction](tokens_in_sample)
    return weights


def lm_loss_terms(
    logits: Tensor, labels: Tensor, sample_index: Tensor | None = None, reduction: Reduction = "square"
) -> LMLossTerms:
    """Weighted CE sum, weight sum and token count of one (micro-)batch, without any normalisation.

    Args:
        logits: (B, T, V) next-token logits, any float dtype.
        labels: (B, T) token ids aligned with input_ids, -100 where not supervised.
        sample_index: optional (B, T) sub-sample id of each token in a packed row.
        reduction: "token", "sample" or "square".

    Returns:
        The `LMLossTerms` of the batch (see there for how a trainer normalises them).

    Raises:
        ValueError: on an unknown reduction or mismatched shapes.
    """
    _check_reduction(reduction)
    _check_shapes(labels, sample_index, logits)
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    weights = token_weights(labels, sample_index, reduction)[supervised]
    # Select first, then upcast: only supervised positions are copied to float32.
    ce = F.cross_entropy(logits[:, :-1][supervised].float(), targets[supervised], reduction="none")
    # With no supervised target this is a sum over an empty tensor: an exact 0 that keeps a grad_fn.
    return LMLossTerms(
        weighted_sum=(weights * ce).sum(),
        weight_sum=weights.sum(),
        num_tokens=supervised.sum(),
    )


def lm_loss(
    logits: Tensor, labels: Tensor, sample_index: Tensor | None = None, reduction: Reduction = "square"
) -> Tensor:
    """Next-token cross-entropy over supervised tokens: sum(w * CE) / sum(w).

    Data parallelism: sum(w) is all-reduced over ranks and the value returned on each rank is
    `world_size * sum_local(w * CE) / sum_global(w)`. DDP/DeepSpeed *average* gradients over ranks, so the
    averaged gradient is exactly the gradient of the global loss sum_global(w * CE) / sum_global(w),
    whatever the split of samples over ranks. The per-rank value is therefore not the global loss; its mean
    over ranks is (all-reduce it with AVG for logging). This is a collective: every rank must call it.
    Without a process group (world size 1) it is the plain loss.

    Args:
        logits: (B, T, V) next-token logits, any float dtype (computed in float32).
        labels: (B, T) token ids aligned with input_ids (shifted inside), -100 where not supervised. In a
            packed row the first token of each sub-sample must be labelled -100.
        sample_index: optional (B, T) sub-sample id of each token in a packed row (unique within a row);
            without it each row is one sample.
        reduction: "token" (w = 1), "sample" (w = 1/n) or "square" (w = 1/sqrt(n)), n being the number of
            supervised targets of the token's (sub-)sample.

    Returns:
        A float32 scalar. With no supervised token on any rank it is 0 and still connected to `logits`,
        so `backward()` works (giving zero gradients).

    Raises:
        ValueError: on an unknown reduction (the message lists the allowed ones) or mismatched shapes.
    """
    terms = lm_loss_terms(logits, labels, sample_index, reduction)
    global_weight = all_reduce_sum(terms.weight_sum)
    # weighted_sum is an exact 0 when global_weight is 0, so any non-zero denominator gives 0 there.
    denominator = torch.where(global_weight > 0, global_weight, torch.ones_like(global_weight))
    return terms.weighted_sum * get_world_size() / denominator
