"""V2PE: variable visual position encoding (InternVL3, arXiv 2412.09616).

Text tokens advance the position by 1; the visual tokens of one image advance it by a fixed δ ≤ 1, so long
multimodal contexts use fewer positions. After an image, text continues at ceil(last visual position) + 1.
Positions are float and go into the LLM's rotary embedding unchanged (Qwen2's RoPE accepts them).

Trap: transformers treats `position_ids` that do not step by 1 as *packed sequences* when no attention mask
is given. Always pass an `attention_mask` (2-D, or the 4-D block mask of a packed batch) with V2PE positions.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

# InternVL3 samples δ per image from {1, 1/2, 1/4, ..., 1/256} during training.
TRAINING_DELTAS: tuple[float, ...] = tuple(1.0 / 2**k for k in range(9))


def image_blocks(input_ids: torch.Tensor, image_token_id: int) -> list[tuple[int, int]]:
    """(start, end) index pairs (end exclusive) of each maximal run of `image_token_id` in 1-D `input_ids`."""
    is_img = (input_ids == image_token_id).to(torch.int8)
    if not bool(is_img.any()):
        return []
    padded = torch.nn.functional.pad(is_img, (1, 1))
    edges = torch.diff(padded)
    starts = torch.nonzero(edges == 1).flatten().tolist()
    ends = torch.nonzero(edges == -1).flatten().tolist()
    return list(zip(starts, ends, strict=True))


def v2pe_position_ids(
    input_ids: torch.Tensor, image_token_id: int, deltas: Sequence[float] | torch.Tensor | float
) -> torch.FloatTensor:
    """V2PE position ids for one sequence.

    Args:
        input_ids: 1-D token ids.
        image_token_id: the `<IMG_CONTEXT>` id; each maximal run of it is one image block.
        deltas: one δ per image block, in order (a single float applies to every block).

    Returns:
        A float32 tensor shaped like `input_ids`. The first token is at 0; a text token is at previous + 1,
        or ceil(previous) + 1 right after an image; the k-th visual token of a block is at p + k·δ, where p
        is the position of the token before the block.

    Raises:
        ValueError: when the number of deltas differs from the number of image blocks, or a δ is not in (0, 1].
    """
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be 1-D, got shape {tuple(input_ids.shape)}")
    blocks = image_blocks(input_ids, image_token_id)
    if isinstance(deltas, int | float):
        deltas = [float(deltas)] * len(blocks)
    deltas = [float(d) for d in (deltas.tolist() if isinstance(deltas, torch.Tensor) else deltas)]
    if len(deltas) != len(blocks):
        raise ValueError(f"got {len(deltas)} V2PE deltas for {len(blocks)} image blocks; pass one per image")
    if any(not 0 < d <= 1 for d in deltas):
        raise ValueError(f"V2PE deltas must be in (0, 1]; got {deltas}")

    positions = torch.empty(input_ids.shape[0], dtype=torch.float64)
    prev = -1.0  # position of the token before the current segment
    cursor = 0
    for (start, end), delta in zip(blocks, deltas, strict=True):
        n_text = start - cursor
        if n_text:
            first = math.ceil(prev) + 1 if cursor else prev + 1
            positions[cursor:start] = first + torch.arange(n_text, dtype=torch.float64)
            prev = float(positions[start - 1])
        elif cursor == 0:
            prev = -delta  # an image at the very start: its first visual token sits at 0
        positions[start:end] = prev + delta * torch.arange(1, end - start + 1, dtype=torch.float64)
        prev = float(positions[end - 1])
        cursor = end
    if cursor < input_ids.shape[0]:
        first = math.ceil(prev) + 1 if cursor else 0.0
        positions[cursor:] = first + torch.arange(input_ids.shape[0] - cursor, dtype=torch.float64)
    return positions.to(torch.float32)


def sample_deltas(
    num_images: int, rng: random.Random, choices: Sequence[float] = TRAINING_DELTAS
) -> list[float]:
    """Draw one training δ per image from `choices` with a seeded generator."""
    return [rng.choice(choices) for _ in range(num_images)]
