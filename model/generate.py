"""Generation with a KV cache that keeps V2PE positions: the prompt uses V2PE position ids and every new
token continues at the previous position + 1 (transformers' `generate` extends float `position_ids` so)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import InternVLForConditionalGeneration

from vlpipe.model.collate import collate_padded
from vlpipe.model.conversation import EncodedSample


@torch.no_grad()
def generate(
    model: InternVLForConditionalGeneration,
    prompts: Sequence[EncodedSample],
    *,
    eos_token_id: int,
    pad_token_id: int,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 1.0,
    seed: int | None = None,
) -> list[list[int]]:
    """Generate a continuation for each prompt (one row per prompt; repeat a prompt to sample it N times).

    Args:
        model: the VLM.
        prompts: samples encoded with `add_generation_prompt=True`, with their `pixel_values`.
        eos_token_id: stop token (`<|im_end|>`).
        pad_token_id: padding id.
        max_new_tokens: length cap of each answer.
        do_sample: sample instead of greedy decoding.
        temperature, top_p: sampling settings.
        seed: makes sampling reproducible without touching the global RNG state outside this call.

    Returns:
        The new token ids of each row, without the prompt, cut after the first `eos_token_id` (excluded).
    """
    batch = collate_padded(prompts, pad_token_id, padding_side="left")
    device = next(model.parameters()).device
    kwargs = {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": batch["attention_mask"].to(device),
        "position_ids": batch["position_ids"].to(device),
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
    }
    if "pixel_values" in batch:
        kwargs["pixel_values"] = batch["pixel_values"].to(device, dtype=model.dtype)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(**kwargs)
    prompt_len = batch["input_ids"].shape[1]
    results = []
    for row in out[:, prompt_len:].tolist():
        results.append(row[: row.index(eos_token_id)] if eos_token_id in row else row)
    return results
