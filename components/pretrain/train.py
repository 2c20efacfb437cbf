"""`vlpipe train pretrain`: native multimodal pre-training from a composed initial model.

All of ViT, MLP projector and LLM train (unless the config freezes a part) on the language + multimodal
mixture at the configured token ratio, with the loss on text tokens only (image tokens are never
supervised), square averaging, and V2PE δ drawn per image (`data.v2pe_training`).
"""

from __future__ import annotations

from typing import Any

from components.training.config import PretrainStageConfig
from components.training.lm import run_lm_stage


def main(cfg: PretrainStageConfig) -> dict[str, Any]:
    """Run the pre-training stage; returns its summary (see `components.training.lm.run_lm_stage`)."""
    return run_lm_stage(cfg, cfg.data)
