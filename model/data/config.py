"""Settings of the data path, importable without torch (pipeline recipes validate them on any machine)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vlpipe.model.data.mixing import MixtureConfig
from vlpipe.model.files import ReadLimits

LabelMode = Literal["sft", "pretrain"]
"""Which tokens carry the loss: assistant replies ("sft") or every text token ("pretrain")."""


class DataConfig(BaseModel):
    """The data part of a training stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    meta: str = Field(min_length=1, description="InternVL meta JSON (local path or s3://).")
    mixture: MixtureConfig = MixtureConfig()
    mode: LabelMode = "sft"
    max_length: int = Field(default=4096, gt=0)
    augment: bool = Field(
        default=True, description="JPEG augmentation where the dataset's data_augment is on."
    )
    v2pe_training: bool = Field(default=True, description="Draw V2PE δ per image (else δ = 1).")
    system_prompt: str | None = Field(
        default="template",
        description='System message of every conversation without one: "template" (the checkpoint chat '
        "template's default: InternVL's message for OpenGVLab checkpoints, none for vlpipe's), a string, or "
        "null for none. A dataset's `system_prompt` in the meta file overrides it.",
    )
    multi_image_tiles: Literal["divide", "full"] = Field(
        default="divide",
        description="Tiles per image of a k-image record: max(1, max_tiles // k) (InternVL) or max_tiles each.",
    )
    limits: ReadLimits = Field(
        default=ReadLimits(),
        description="Read limits per image file and per JSONL line (hostile-data bounds).",
    )


class PackingConfig(BaseModel):
    """How samples are packed into rows.

    Attributes:
        max_tokens: length of every packed row (the training sequence length).
        max_tiles: most image tiles in one row (bounds the ViT's batch, hence its memory).
        buffer_size: most rows kept open at once; more rows give fuller rows but hold more samples in memory.
        min_remaining: a row with fewer free tokens than this is emitted at once (no sample is that short).
        rows_per_batch: packed rows per training micro-batch (`packed_batches`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(gt=0)
    max_tiles: int = Field(gt=0)
    buffer_size: int = Field(default=64, ge=1)
    min_remaining: int = Field(default=16, ge=0)
    rows_per_batch: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _check_min_remaining(self) -> PackingConfig:
        if self.min_remaining >= self.max_tokens:
            raise ValueError(
                f"min_remaining ({self.min_remaining}) must be below max_tokens ({self.max_tokens}); "
                "lower min_remaining"
            )
        return self
