"""Mixed preference optimisation (MPO): preference (DPO) + quality (BCO) + generation (SFT) losses.

Rewards are r = beta * (log pi_theta(y|x) - log pi_ref(y|x)) on per-sample summed response log-probs.

* preference: -log sigmoid(r_c - r_r)  (DPO sigmoid).
* quality: -log sigmoid(r_c - delta) - log sigmoid(-(r_r - delta))  (BCO), where delta, the reward shift, is
  the running mean of past batch rewards. At each training call the batch's mean reward (over chosen and
  rejected, all-reduced over data-parallel ranks) is folded in first, as an equal-weight running mean over
  calls, then used. This matches TRL's `bco_pair` running reward shift.
* generation: the mean of `chosen_nll`, the per-sample mean token NLL of the chosen response.

delta and the number of calls folded in are buffers of `MPOLoss`, so they travel with `state_dict()`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlpipe.objectives.config import MPOConfig
from vlpipe.objectives.distributed import all_reduce_sum
from vlpipe.objectives.lm import IGNORE_INDEX

__all__ = ["MPOConfig", "MPOLoss", "sequence_logps"]


def sequence_logps(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample log-probability of the labelled response tokens.

    Same shift convention as `vlpipe.objectives.lm`: `logits[:, t]` predicts `labels[:, t + 1]`; -100 is ignored.

    Args:
        logits: (B, T, V) logits, any float dtype (computed in float32).
        labels: (B, T) token ids aligned with input_ids, -100 outside the response.

    Returns:
        `(sum_logps, mean_nll, num_tokens)`, each of shape (B,): the summed log-prob of the labelled tokens
        (float32), their mean negative log-likelihood (float32; 0 for a row without labelled tokens) and
        their count (int64).

    Raises:
        ValueError: when logits and labels do not have shapes (B, T, V) and (B, T).
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits must be (batch, seq_len, vocab) and labels (batch, seq_len); "
            f"got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    targets = labels[:, 1:]
    vocab = logits.shape[-1]
    token_nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(targets.shape)  # 0 at ignored positions
    num_tokens = (targets != IGNORE_INDEX).sum(dim=-1)
    summed_nll = token_nll.sum(dim=-1)
    return -summed_nll, summed_nll / num_tokens.clamp_min(1), num_tokens


class MPOLoss(nn.Module):
    """MPO loss with a running reward shift for the BCO quality term.

    Use `update_shift` (default: `self.training`) to control whether a call folds its batch into delta:
    in `.eval()` mode, or with `update_shift=False`, delta is only read. In training mode a call is a
    collective when a process group is up (the batch reward sum and count are all-reduced), so every rank
    must call it once per step; delta then stays identical on all ranks.

    Args:
        beta: reward scale, > 0.
        preference_weight: weight of the DPO term, >= 0.
        quality_weight: weight of the BCO term, >= 0.
        generation_weight: weight of the SFT term, >= 0.

    Raises:
        pydantic.ValidationError: on invalid settings (see `MPOConfig`), at construction.
    """

    reward_shift: Tensor
    num_shift_updates: Tensor

    def __init__(
        self,
        beta: float = 0.1,
        preference_weight: float = 0.8,
        quality_weight: float = 0.2,
        generation_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.config = MPOConfig(
            beta=beta,
            preference_weight=preference_weight,
            quality_weight=quality_weight,
            generation_weight=generation_weight,
        )
        self.register_buffer("reward_shift", torch.zeros((), dtype=torch.float32))
        self.register_buffer("num_shift_updates", torch.zeros((), dtype=torch.int64))

    @classmethod
    def from_config(cls, config: MPOConfig) -> MPOLoss:
        """Build the loss from a validated `MPOConfig`.

        Args:
            config: the MPO settings.

        Returns:
            A fresh `MPOLoss` (delta = 0, no calls folded in).
        """
        return cls(**config.model_dump())

    @torch.no_grad()
    def _fold_in(self, rewards: Tensor) -> None:
        totals = all_reduce_sum(torch.stack([rewards.sum(), rewards.new_tensor(float(rewards.numel()))]))
        batch_mean = (totals[0] / totals[1]).to(self.reward_shift.device)
        self.num_shift_updates += 1
        # Equal-weight running mean over calls: delta_k = delta_{k-1} + (mean_k - delta_{k-1}) / k.
        self.reward_shift += (batch_mean - self.reward_shift) / self.num_shift_updates.to(torch.float32)

    def forward(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        ref_chosen_logps: Tensor,
        ref_rejected_logps: Tensor,
        chosen_nll: Tensor,
        update_shift: bool | None = None,
    ) -> dict[str, Tensor]:
        """Compute the MPO loss and its terms for a batch of preference pairs.

        Args:
            policy_chosen_logps: (B,) summed log-probs of the chosen responses under the policy.
            policy_rejected_logps: (B,) same for the rejected responses.
            ref_chosen_logps: (B,) summed log-probs of the chosen responses under the reference (no grad).
            ref_rejected_logps: (B,) same for the rejected responses.
            chosen_nll: (B,) per-sample mean token NLL of the chosen responses under the policy.
            update_shift: fold this batch into delta before using it; None means `self.training`.

        Returns:
            float32 scalars: `loss` (weighted sum of the terms), `preference`, `quality`, `generation`
            (each averaged over the batch; these four carry gradients), and detached `reward_shift` (delta as
            used by this call), `reward_accuracy` (mean of r_c > r_r) and `reward_margin` (mean of r_c - r_r).

        Raises:
            ValueError: when the inputs are not all 1-D of the same non-zero length.
        """
        inputs = (
            policy_chosen_logps,
            policy_rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            chosen_nll,
        )
        shapes = [tuple(x.shape) for x in inputs]
        if any(len(s) != 1 for s in shapes) or len(set(shapes)) != 1 or shapes[0][0] == 0:
            raise ValueError(f"MPO inputs must all be 1-D of the same non-zero length (batch); got {shapes}")
        beta = self.config.beta
        chosen_rewards = beta * (policy_chosen_logps.float() - ref_chosen_logps.detach().float())
        rejected_rewards = beta * (policy_rejected_logps.float() - ref_rejected_logps.detach().float())

        fold_in = self.training if update_shift is None else update_shift
        if fold_in:
            self._fold_in(torch.cat([chosen_rewards, rejected_rewards]).detach())
        delta = self.reward_shift.detach().clone().to(chosen_rewards.device)

        preference = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
        quality = (-F.logsigmoid(chosen_rewards - delta) - F.logsigmoid(-(rejected_rewards - delta))).mean()
        generation = chosen_nll.float().mean()
        loss = (
            self.config.preference_weight * preference
            + self.config.quality_weight * quality
            + self.config.generation_weight * generation
        )
        margins = (chosen_rewards - rejected_rewards).detach()
        return {
            "loss": loss,
            "preference": preference,
            "quality": quality,
            "generation": generation,
            "reward_shift": delta,
            "reward_accuracy": (margins > 0).float().mean(),
            "reward_margin": margins.mean(),
        }
