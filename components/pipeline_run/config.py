"""Settings of the pipeline's MLflow tracking (torch-free)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TrackingSettings(BaseModel):
    """MLflow settings shared by every step. The tracking URI is not here: it comes from the environment
    (`MLFLOW_TRACKING_URI`, set from the recipe's `cluster.tracking_uri`), and credentials from secrets.

    Attributes:
        experiment: the experiment holding the pipeline's parent run and every step's child run.
        tags: extra tags on the parent run and every child run.
        log_stage_models: log each training stage's checkpoint as an MLflow model (the register step always
            logs and registers the final policy).
        system_metrics: log CPU/GPU/memory system metrics in the training stages.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    experiment: str = Field(min_length=1, max_length=200)
    tags: dict[str, str] = Field(default_factory=dict)
    log_stage_models: bool = False
    system_metrics: bool = False


class TaskConfig(BaseModel):
    """What every non-training step knows: the recipe's name and tracking settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    recipe: str = Field(min_length=1)
    tracking: TrackingSettings
