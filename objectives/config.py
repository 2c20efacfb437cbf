"""Validated settings of the training objectives.

This module imports pydantic only (no torch), so stage and pipeline configs can embed these classes and
validate recipes on a machine without torch. Invalid settings fail here, when the config is built, not at
the first training step.
"""

from __future__ import annotations

from typing import Literal, Self, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

Reduction = Literal["token", "sample", "square"]
"""How `vlpipe.objectives.lm.lm_loss` weights tokens: 1, 1/n or 1/sqrt(n) (n = supervised tokens in the sample)."""
REDUCTIONS: tuple[str, ...] = get_args(Reduction)

Aggregation = Literal["mean", "min", "last"]
"""How `vlpipe.objectives.prm.aggregate_step_scores` turns step scores into a solution score."""
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)


class LMLossConfig(BaseModel):
    """Settings of the next-token LM loss (pre-training and SFT).

    Attributes:
        reduction: token weighting; "square" is InternVL2.5/3's square averaging.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    reduction: Reduction = "square"


class MPOConfig(BaseModel):
    """Settings of mixed preference optimisation (`vlpipe.objectives.mpo.MPOLoss`).

    Attributes:
        beta: scale of the implicit reward r = beta * (log pi_theta - log pi_ref); must be > 0.
        preference_weight: weight of the DPO sigmoid term; >= 0.
        quality_weight: weight of the BCO term; >= 0.
        generation_weight: weight of the SFT (chosen NLL) term; >= 0.

    Raises:
        pydantic.ValidationError: on a non-positive beta, a negative or non-finite weight, all weights zero,
            or an unknown key.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    beta: float = Field(0.1, gt=0, allow_inf_nan=False)
    preference_weight: float = Field(0.8, ge=0, allow_inf_nan=False)
    quality_weight: float = Field(0.2, ge=0, allow_inf_nan=False)
    generation_weight: float = Field(1.0, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _some_weight_positive(self) -> Self:
        if self.preference_weight == self.quality_weight == self.generation_weight == 0:
            raise ValueError(
                "MPO: preference_weight, quality_weight and generation_weight are all 0; "
                "set at least one of them > 0"
            )
        return self


class PRMConfig(BaseModel):
    """Settings of the process reward model's scoring.

    Attributes:
        aggregation: how step scores become a solution score ("mean", "min" or "last").
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    aggregation: Aggregation = "mean"
