"""Batch tokenised samples: padding to the batch maximum (one sample per row).

Packing several samples per row lives in `vlpipe.model.data.packing`; both produce the same keys so training code
does not care which one it gets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from vlpipe.model.conversation import IGNORE_INDEX, EncodedSample


def collate_padded(
    samples: Sequence[EncodedSample],
    pad_token_id: int,
    padding_side: Literal["left", "right"] = "right",
) -> dict[str, torch.Tensor]:
    """Pad `samples` to the longest one.

    Args:
        samples: encoded samples (one per row).
        pad_token_id: id used for padding.
        padding_side: `right` for training, `left` for generation (new tokens follow the prompt directly).

    Returns:
        `input_ids`, `labels`, `attention_mask`, `position_ids` (float, V2PE; 0 on padding), `sample_index`
        (0 on real tokens, -1 on padding) and `pixel_values` (all tiles in row order) when any image exists.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(s) for s in samples)
    batch = len(samples)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.float32)
    sample_index = torch.full((batch, width), -1, dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s)
        cols = slice(width - n, width) if padding_side == "left" else slice(0, n)
        input_ids[row, cols] = s.input_ids
        labels[row, cols] = s.labels
        attention_mask[row, cols] = 1
        position_ids[row, cols] = s.position_ids
        sample_index[row, cols] = 0
    out = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "sample_index": sample_index,
    }
    tiles = [s.pixel_values for s in samples if s.pixel_values is not None]
    if tiles:
        out["pixel_values"] = torch.cat(tiles)
    return out
