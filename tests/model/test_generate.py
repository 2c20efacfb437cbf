"""The generation engine: batched greedy == one-at-a-time == transformers' own `generate` (mixed prompts, V2PE
δ != 1), per-row seeds independent of batch companions, features once == per sample, streaming and cancelled
rows, rows joining a running batch.

The model runs in float64 so that batch shape (padding, summation order) cannot flip an arg-max: token
equality is then exact, not luck. Its attention is sharpened so that a wrong position changes the tokens."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tests.prompts import encode_turns
from vlpipe.model.checkpoint import load_checkpoint
from vlpipe.model.generate import GenerationEngine, SamplingParams, generate, row_seed
from vlpipe.model.init import init_random
from vlpipe.model.tokenizer import IM_END

V2PE_DELTA = 0.25


def _png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    path = init_random("tiny", str(tmp_path_factory.mktemp("gen") / "ckpt"), seed=3, v2pe_delta=V2PE_DELTA)
    model = load_checkpoint(path)
    model.model.to(torch.float64).eval()
    # A random tiny LLM attends almost uniformly, so positions would hardly change its answers: sharper
    # queries and keys make every position (V2PE's and each new token's) show in the tokens.
    with torch.no_grad():
        for name, param in model.model.named_parameters():
            if "language_model" in name and name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(8.0)
    return model


def _encode(loaded, text: str, images: list[bytes]):
    return encode_turns(loaded, [("human", "".join("<image>\n" for _ in images) + text)], images)


@pytest.fixture(scope="module")
def prompts(loaded):
    return [
        _encode(loaded, "Hi", []),
        _encode(loaded, "Describe the picture in detail, naming every shape and colour you see there.", []),
        _encode(loaded, "How many red shapes?", [_png(64, 32, 0)]),  # 2 tiles + thumbnail
        _encode(loaded, "Compare them.", [_png(32, 32, 1), _png(48, 32, 2)]),
    ]


def _ids(loaded) -> dict:
    tok = loaded.tokenizer
    return {"eos_token_id": tok.convert_tokens_to_ids(IM_END), "pad_token_id": tok.pad_token_id}


def _transformers_generate(loaded, prompts, max_new_tokens: int) -> list[list[int]]:
    """The previous path: transformers' `generate` on the left-padded batch with float V2PE positions."""
    from vlpipe.model.collate import collate_padded

    ids = _ids(loaded)
    batch = collate_padded(prompts, ids["pad_token_id"], padding_side="left")
    kwargs = {}
    if "pixel_values" in batch:
        kwargs["pixel_values"] = batch["pixel_values"].to(torch.float64)
    out = loaded.model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        max_new_tokens=max_new_tokens,
        do_sample=False,
        **ids,
        **kwargs,
    )
    rows = out[:, batch["input_ids"].shape[1] :].tolist()
    return [row[: row.index(ids["eos_token_id"])] if ids["eos_token_id"] in row else row for row in rows]


def test_batched_greedy_equals_one_at_a_time_and_transformers(loaded, prompts):
    assert loaded.v2pe_delta == V2PE_DELTA and prompts[3].num_tiles and len(prompts[3].num_tiles) == 2
    lengths = {len(p) for p in prompts}
    assert len(lengths) == 4  # every row padded differently
    batched = generate(loaded.model, prompts, max_new_tokens=12, **_ids(loaded))
    alone = [generate(loaded.model, [p], max_new_tokens=12, **_ids(loaded))[0] for p in prompts]
    reference = _transformers_generate(loaded, prompts, 12)
    assert batched == alone == reference
    assert all(len(row) > 0 for row in batched)


def test_sampled_rows_do_not_depend_on_batch_companions(loaded, prompts):
    kwargs = {"max_new_tokens": 10, "do_sample": True, "temperature": 1.0, "top_p": 0.9, **_ids(loaded)}
    seeds = [row_seed(7, 0), row_seed(7, 1)]
    alone = generate(loaded.model, [prompts[2]] * 2, seed=7, **kwargs)
    mixed = generate(
        loaded.model,
        [prompts[0], prompts[2], prompts[3], prompts[2]],
        seeds=[1, *seeds[:1], 2, seeds[1]],
        **kwargs,
    )
    assert [mixed[1], mixed[3]] == alone
    assert alone[0] != alone[1]  # two samples, two generators (a random tiny model: near-uniform tokens)
    assert generate(loaded.model, [prompts[2]] * 2, seed=7, **kwargs) == alone
    assert generate(loaded.model, [prompts[2]] * 2, seed=8, **kwargs) != alone


def test_features_once_gives_the_per_sample_answers_with_one_prefill(loaded, prompts):
    kwargs = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.0, **_ids(loaded)}
    rows = [prompts[3]] * 4 + [prompts[2]] * 4
    shared = generate(loaded.model, rows, seed=3, **kwargs)
    per_sample = generate(loaded.model, rows, seed=3, share_prompts=False, **kwargs)
    assert shared == per_sample
    engine = GenerationEngine(loaded.model, share_prompts=True, **_ids(loaded))
    engine.add(prompts[3], [SamplingParams(4, 1.0, seed=i) for i in range(4)])
    engine.add(prompts[2], [SamplingParams(4, 1.0, seed=i) for i in range(4)])
    engine.step()
    assert engine.prefill_prompts == 2  # 8 rows, 2 prefills (and 2 vision-encoder passes)


def test_streaming_steps_cancel_and_join(loaded, prompts):
    ids = _ids(loaded)
    expected = generate(loaded.model, prompts[:3], max_new_tokens=12, **ids)
    engine = GenerationEngine(loaded.model, **ids)
    streamed: dict[int, list[int]] = {0: [], 2: []}
    first = engine.add(prompts[0], [SamplingParams(12)], on_token=lambda r, t: streamed[0].append(t))[0]
    victim = engine.add(prompts[1], [SamplingParams(12)])[0]
    engine.step()
    engine.step()
    assert len(first.tokens) == 2 and len(victim.tokens) == 2  # one token per step per row
    victim.cancelled = True
    late = engine.add(prompts[2], [SamplingParams(12)], on_token=lambda r, t: streamed[2].append(t))[0]
    events = engine.step()
    assert (victim, None) in events and victim.finish_reason == "cancelled" and len(victim.tokens) == 2
    assert victim not in engine.rows and late in engine.rows  # joined the running batch
    for _ in engine.run():
        pass
    assert first.tokens == streamed[0] == expected[0]
    assert late.tokens == streamed[2] == expected[2]  # joined mid-batch, same answer as alone
    assert first.finish_reason in ("stop", "length") and engine.active == 0


def test_bad_settings_are_refused_before_any_work(loaded, prompts):
    with pytest.raises(ValueError, match="seeds"):
        generate(loaded.model, prompts[:2], seeds=[1], **_ids(loaded))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(4, temperature=1e-9)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(0)
    assert row_seed(1, 0) != row_seed(1, 1) and row_seed(1, 0) == row_seed(1, 0) < 2**63
