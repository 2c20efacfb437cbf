"""Generation with a KV cache that keeps V2PE positions: the prompt uses V2PE position ids and every new
token continues at the previous position + 1 (transformers' `generate` extends float `position_ids` so)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import InternVLForConditionalGeneration

from vlpipe.model.collate import collate_padded
from vlpipe.model.conversation import EncodedSample

# Sampling settings `generate` accepts. Below MIN_TEMPERATURE the logits divided by the temperature overflow
# (1e-45 gives inf, then NaN probabilities); the seed range is what torch.manual_seed takes.
MIN_TEMPERATURE = 1e-3
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1


def check_sampling(temperature: float, top_p: float, seed: int | None) -> None:
    """Refuse sampling settings that would overflow or fail inside generation.

    Raises:
        ValueError: for a temperature that is neither 0 nor a finite number >= MIN_TEMPERATURE, a top_p outside
            (0, 1], or a seed outside [SEED_MIN, SEED_MAX].
    """
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature < float("inf")):
        raise ValueError(f"temperature must be 0 (greedy) or a finite number of at least {MIN_TEMPERATURE}")
    if not 0 < top_p <= 1:
        raise ValueError("top_p must be in (0, 1]")
    if seed is not None and (isinstance(seed, bool) or not SEED_MIN <= seed <= SEED_MAX):
        raise ValueError(f"seed must be an integer from {SEED_MIN} to {SEED_MAX}")


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

    Raises:
        ValueError: for sampling settings `check_sampling` refuses (checked before any work).
    """
    check_sampling(temperature if do_sample else 0.0, top_p if do_sample else 1.0, seed)
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
