"""Generation prompts encoded the way the model's own code encodes them, without serving code (shared by the
generation-engine and OpenAI-route tests)."""

from __future__ import annotations

import torch

from vlpipe.model.conversation import ConversationEncoder
from vlpipe.model.image import decode_image, process_image


def encode_turns(loaded, turns: list[tuple[str, str]], images: list[bytes]):
    """The generation prompt of InternVL turns (`(role, text)`, `<image>` placeholders in the text) over
    `images` (encoded bytes), for the loaded checkpoint `loaded`."""
    encoder = ConversationEncoder(loaded.tokenizer, loaded.tokens_per_tile, max_length=4096, mode="sft")
    tiles = [
        process_image(decode_image(data, source=str(i)), loaded.image_cfg) for i, data in enumerate(images)
    ]
    record: dict = {"id": "x", "conversations": [{"from": role, "value": text} for role, text in turns]}
    if images:
        record["image"] = [f"{i}.png" for i in range(len(images))]
    return encoder.encode(
        record,
        [t.shape[0] for t in tiles],
        pixel_values=torch.cat(tiles) if tiles else None,
        v2pe_deltas=loaded.v2pe_delta,
        add_generation_prompt=True,
    )
