"""`vlpipe train sft`: supervised fine-tuning from a checkpoint on conversation data.

The chat template puts the loss on the assistant replies; samples are packed into block-diagonal rows,
the loss is square-averaged, and JPEG augmentation applies where a dataset's `data_augment` is on.
"""

from __future__ import annotations

from typing import Any

from components.training.config import SFTStageConfig
from components.training.lm import run_lm_stage


def main(cfg: SFTStageConfig) -> dict[str, Any]:
    """Run the SFT stage; returns its summary (see `components.training.lm.run_lm_stage`)."""
    return run_lm_stage(cfg, cfg.data)
