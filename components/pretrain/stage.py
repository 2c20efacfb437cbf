"""The pre-training stage: native multimodal pre-training from a composed initial model.

All of ViT, MLP projector and LLM train (unless the config freezes a part) on the language + multimodal
mixture at the configured token ratio, with the loss on text tokens only (image tokens are never supervised),
square averaging, and V2PE δ drawn per image (`data.v2pe_training`). The flow is the LM flow of the SFT stage
(`vlpipe.components.sft.stage.train_lm`); only the data (`data.mode: pretrain`) differs.
"""

from __future__ import annotations

from typing import Any

from vlpipe.components.sft.stage import train_lm
from vlpipe.components.training.config import PretrainStageConfig


def main(cfg: PretrainStageConfig) -> dict[str, Any]:
    """Run the pre-training stage; returns its summary (see `vlpipe.components.sft.stage.train_lm`)."""
    return train_lm(cfg, cfg.data)
