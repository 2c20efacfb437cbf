"""Settings of the register step (torch-free)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from vlpipe.components.pipeline_run.config import TaskConfig


class RegisterSettings(BaseModel):
    """Where the trained policy goes in the MLflow model registry.

    Attributes:
        model_name: registered model name; every pipeline run adds a version.
        alias: alias set on the new version (`challenger`: promotion to `champion` is a later step).
        save_dtype: the precision of the registered (served) checkpoint's weights: bf16 (as published InternVL3
            checkpoints), fp16 or fp32. The stages hand checkpoints to each other in training precision.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", max_length=128)
    alias: str = Field("challenger", pattern=r"^[A-Za-z][A-Za-z0-9_\-]*$", max_length=64)
    save_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"


class RegisterConfig(TaskConfig):
    """The `register-model` step's settings."""

    preset: str = Field(min_length=1)
    registry: RegisterSettings
