"""Packing: greedy row assignment, the packed batch's tensors, and packed = unpacked for logits and loss."""

from __future__ import annotations

import io
import random
from collections import Counter

import pytest
import torch
from pydantic import ValidationError

from vlpipe.model.collate import collate_padded
from vlpipe.model.conversation import IGNORE_INDEX, ConversationEncoder, EncodedSample
from vlpipe.model.data.packing import (
    GreedyPacker,
    PackingConfig,
    model_inputs,
    pack_rows,
    packed_batches,
    padded_utilisation,
    token_utilisation,
)
from vlpipe.model.errors import SampleError
from vlpipe.objectives.lm import lm_loss

PAD = 0


def _sample(sid: str, length: int, first_id: int = 1, tiles: list[int] | None = None) -> EncodedSample:
    """A text-like sample: ids first_id, first_id+1, ...; every token supervised; positions 0, 1, 2, ..."""
    ids = torch.arange(first_id, first_id + length)
    return EncodedSample(sid, ids, ids.clone(), torch.arange(length, dtype=torch.float32), tiles or [])


def _ids(rows: list[list[EncodedSample]]) -> list[list[str]]:
    return [[s.sample_id for s in row] for row in rows]


def _pack_all(packer: GreedyPacker, samples: list[EncodedSample]) -> list[list[EncodedSample]]:
    rows = []
    for s in samples:
        rows += packer.add(s)
    return rows + packer.flush()


# -- config -----------------------------------------------------------------------------------------------------
def test_config_validates():
    cfg = PackingConfig(max_tokens=64, max_tiles=4)
    assert (cfg.buffer_size, cfg.min_remaining, cfg.rows_per_batch) == (64, 16, 1)
    with pytest.raises(ValidationError):
        PackingConfig(max_tokens=0, max_tiles=4)
    with pytest.raises(ValidationError):
        PackingConfig(max_tokens=64, max_tiles=4, buffer_size=0)
    with pytest.raises(ValidationError):
        PackingConfig(max_tokens=64, max_tiles=4, max_tokenz=3)
    with pytest.raises(ValidationError, match="min_remaining"):
        PackingConfig(max_tokens=8, max_tiles=4)  # default min_remaining 16 >= 8
    with pytest.raises(ValidationError):
        cfg.max_tokens = 32  # frozen


# -- the hand-built example: lengths 5, 3, 4 into rows of 8 -------------------------------------------------------
@pytest.fixture()
def example():
    samples = [_sample("a", 5, 10), _sample("b", 3, 20), _sample("c", 4, 30)]
    packer = GreedyPacker(PackingConfig(max_tokens=8, max_tiles=4, min_remaining=1))
    # a opens row 0 (3 free); b fits exactly, leaving 0 < min_remaining free, so row 0 is emitted at once;
    # c (4) opens row 1, emitted by flush.
    assert packer.add(samples[0]) == []
    assert _ids(packer.add(samples[1])) == [["a", "b"]]
    assert packer.add(samples[2]) == []
    assert _ids(packer.flush()) == [["c"]]
    return pack_rows([[samples[0], samples[1]], [samples[2]]], max_tokens=8, pad_token_id=PAD)


def test_example_tokens_positions_labels(example):
    assert example["input_ids"].tolist() == [
        [10, 11, 12, 13, 14, 20, 21, 22],
        [30, 31, 32, 33, PAD, PAD, PAD, PAD],  # only the tail is padded
    ]
    assert example["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 0, 0, 0]]
    assert example["position_ids"].dtype == torch.float32
    x = IGNORE_INDEX
    # The first token of every sub-sample is -100: no token learns to predict the next sub-sample.
    assert example["labels"].tolist() == [[x, 11, 12, 13, 14, x, 21, 22], [x, 31, 32, 33, x, x, x, x]]
    assert example["sample_index"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, -1, -1, -1, -1]]
    assert example["sample_ids"] == [["a", "b"], ["c"]]
    assert example["num_tiles"] == [] and "pixel_values" not in example
    assert token_utilisation(example) == 12 / 16


def test_example_block_causal_mask(example):
    mask = example["attention_mask"]
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 0, 0],  # b starts: sees only itself
        [0, 0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1, 1, 1],
    ]
    assert mask[1, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0, 0],  # padding is a block of its own: no empty mask row, no NaN
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],
    ]


def test_example_flash_varlen_kwargs(example):
    # Segments over the flattened batch: a (5), b (3) | c (4), padding (4) -> cumulative 0, 5, 8, 12, 16.
    assert example["cu_seq_lens_q"].tolist() == [0, 5, 8, 12, 16]
    assert example["cu_seq_lens_q"].dtype == torch.int32
    assert torch.equal(example["cu_seq_lens_k"], example["cu_seq_lens_q"])
    assert example["max_length_q"] == example["max_length_k"] == 5
    kwargs = model_inputs(example, "flash_attention_2")
    assert "attention_mask" not in kwargs
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 5, 8, 12, 16] and kwargs["max_length_k"] == 5
    assert set(model_inputs(example, "flash_attention_3")) == set(kwargs)


def test_model_inputs_mask_forms(example):
    sdpa = model_inputs(example, "sdpa")
    assert sdpa["attention_mask"] is example["attention_mask"]  # SDPA takes the boolean mask (True = attend)
    eager = model_inputs(example, "eager", dtype=torch.bfloat16)["attention_mask"]
    # Eager adds the mask to the scores: 0 where attending, the dtype's minimum elsewhere.
    assert eager.dtype == torch.bfloat16
    assert torch.equal(eager == 0, example["attention_mask"])
    assert (eager[~example["attention_mask"]] == torch.finfo(torch.bfloat16).min).all()
    padded = collate_padded([_sample("a", 3)], pad_token_id=PAD)
    assert model_inputs(padded, "flash_attention_2")["attention_mask"] is padded["attention_mask"]
    with pytest.raises(ValueError, match="flex_attention"):
        model_inputs(example, "flex_attention")


# -- packing policy --------------------------------------------------------------------------------------------
def test_best_fit_buffer_and_min_remaining():
    cfg = PackingConfig(max_tokens=8, max_tiles=4, min_remaining=1)
    packer = GreedyPacker(cfg)
    assert packer.add(_sample("a", 5)) == []  # row A: 3 free
    assert packer.add(_sample("b", 6)) == []  # does not fit A: row B, 2 free
    # c (2) fits A (3 free) and B (2 free); best fit takes B, which is then full and emitted.
    assert _ids(packer.add(_sample("c", 2))) == [["b", "c"]]
    assert _ids(packer.add(_sample("d", 3))) == [["a", "d"]]
    assert packer.num_open_rows == 0

    # With one open row at most, opening a second emits the fullest.
    packer = GreedyPacker(cfg.model_copy(update={"buffer_size": 1}))
    assert packer.add(_sample("a", 5)) == []
    assert _ids(packer.add(_sample("b", 6))) == [["b"]]
    assert _ids(packer.flush()) == [["a"]]

    # A row with fewer than min_remaining free tokens (64 - 50 = 14 < 16) cannot take any real sample.
    packer = GreedyPacker(PackingConfig(max_tokens=64, max_tiles=4))
    assert _ids(packer.add(_sample("long", 50))) == [["long"]]
    assert packer.add(_sample("short", 40)) == []  # 24 free >= 16: stays open


def test_max_tiles_respected_and_pixels_in_token_order():
    def with_pixels(sid: str, length: int, tiles: list[int], value: float) -> EncodedSample:
        s = _sample(sid, length, tiles=tiles)
        s.pixel_values = torch.full((sum(tiles), 3, 4, 4), value)
        return s

    samples = [with_pixels("a", 4, [2], 1.0), with_pixels("b", 4, [2], 2.0), with_pixels("c", 2, [1], 3.0)]
    packer = GreedyPacker(PackingConfig(max_tokens=32, max_tiles=3, min_remaining=0))
    # b does not fit next to a (2 + 2 tiles > 3); c (1 tile) fits both rows, equally full: the older one.
    rows = _pack_all(packer, samples)
    assert _ids(rows) == [["a", "c"], ["b"]]
    batch = pack_rows(rows, max_tokens=32, pad_token_id=PAD)
    assert batch["num_tiles"] == [2, 1, 2]
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 1.0, 3.0, 2.0, 2.0]


def test_too_long_sample_raises_and_changes_nothing():
    packer = GreedyPacker(PackingConfig(max_tokens=32, max_tiles=2, min_remaining=0))
    packer.add(_sample("ok", 10))
    with pytest.raises(SampleError) as err:
        packer.add(_sample("long", 33))
    assert err.value.reason == "too_long" and err.value.sample == "long"
    assert "max_tokens" in err.value.detail
    with pytest.raises(SampleError) as err:
        packer.add(_sample("tiles", 5, tiles=[2, 1]))
    assert err.value.reason == "too_long"
    assert _ids(packer.flush()) == [["ok"]]


def _random_stream(n: int, seed: int) -> list[EncodedSample]:
    rng = random.Random(seed)
    return [
        _sample(f"s{i}", rng.randint(8, 200), tiles=[rng.randint(1, 3)] if rng.random() < 0.5 else [])
        for i in range(n)
    ]


def test_stream_loses_nothing_and_fills_rows():
    samples = _random_stream(200, seed=0)
    cfg = PackingConfig(max_tokens=512, max_tiles=12, buffer_size=64)
    rows = _pack_all(GreedyPacker(cfg), samples)
    assert Counter(s.sample_id for row in rows for s in row) == Counter(s.sample_id for s in samples)
    assert all(sum(len(s) for s in row) <= 512 for row in rows)
    assert all(sum(sum(s.num_tiles) for s in row) <= 12 for row in rows)
    packed = token_utilisation(pack_rows(rows, cfg.max_tokens, PAD))
    assert packed >= 0.9
    assert padded_utilisation(samples, batch_size=8) < 0.7  # the baseline packing beats


def test_padded_utilisation_arithmetic():
    samples = [_sample("a", 5), _sample("b", 3), _sample("c", 4)]
    # batches [5, 3] -> 2 rows of 5, [4] -> 1 row of 4: 12 real tokens in 14 slots.
    assert padded_utilisation(samples, batch_size=2) == 12 / 14
    assert padded_utilisation(samples, batch_size=1) == 1.0


def test_resume_from_state_equals_uninterrupted():
    samples = _random_stream(200, seed=1)
    for s in samples[::3]:
        s.pixel_values = torch.randn(sum(s.num_tiles), 3, 4, 4) if s.num_tiles else None
    cfg = PackingConfig(max_tokens=512, max_tiles=12, buffer_size=16)
    expected = _ids(_pack_all(GreedyPacker(cfg), samples))

    first = GreedyPacker(cfg)
    rows = []
    for s in samples[:117]:
        rows += first.add(s)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = GreedyPacker(cfg)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.num_open_rows == first.num_open_rows > 0
    rows += _pack_all(resumed, samples[117:])
    assert _ids(rows) == expected
    restored = {s.sample_id: s for row in rows for s in row}
    for s in samples:
        r = restored[s.sample_id]
        assert torch.equal(r.input_ids, s.input_ids) and torch.equal(r.position_ids, s.position_ids)
        assert r.num_tiles == s.num_tiles
        assert (r.pixel_values is None) == (s.pixel_values is None)
        assert r.pixel_values is None or torch.equal(r.pixel_values, s.pixel_values)

    with pytest.raises(ValueError, match="same config"):
        GreedyPacker(cfg.model_copy(update={"max_tokens": 256})).load_state_dict(first.state_dict())


def test_packed_batches_groups_rows_and_counts_skips():
    samples = [_sample("a", 5), _sample("b", 3), _sample("long", 9), _sample("c", 4), _sample("d", 6)]
    cfg = PackingConfig(max_tokens=8, max_tiles=4, min_remaining=1, rows_per_batch=2)
    skipped: Counter[str] = Counter()
    batches = list(packed_batches(samples, cfg, PAD, skipped))
    # Rows: [a, b] (full at b), then flush [c], [d]; grouped two per batch.
    assert [b["sample_ids"] for b in batches] == [[["a", "b"], ["c"]], [["d"]]]
    assert skipped == Counter(too_long=1)
    with pytest.raises(SampleError):
        list(packed_batches(samples, cfg, PAD))


# -- packed = unpacked on the tiny model -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoded(tiny_tokenizer) -> list[EncodedSample]:
    enc = ConversationEncoder(tiny_tokenizer, tokens_per_tile=4, max_length=256)
    gen = torch.Generator().manual_seed(0)

    def record(i: int, n_images: int, question: str, answer: str) -> dict:
        rec = {"id": f"s{i}", "conversations": [{"from": "human", "value": "<image>\n" * n_images + question},
                                               {"from": "gpt", "value": answer}]}  # fmt: skip
        if n_images:
            rec["image"] = [f"{i}_{k}.png" for k in range(n_images)]
        return rec

    specs = [
        (record(0, 1, "How many red shapes?", "Two."), [3], 0.5),
        (record(1, 0, "Hello there", "Hi, how are you?"), [], 1.0),
        (record(2, 2, "Are they the same?", "No, they differ."), [1, 2], [0.25, 1.0]),
        (record(3, 1, "Colour?", "Blue."), [1], 1.0),
    ]
    out = []
    for rec, tiles, deltas in specs:
        pixels = torch.randn(sum(tiles), 3, 32, 32, generator=gen) if tiles else None
        out.append(enc.encode(rec, tiles, pixel_values=pixels, v2pe_deltas=deltas))
    # Fractional V2PE positions are really there (δ = 0.5, 0.25).
    assert not torch.equal(out[0].position_ids, torch.arange(len(out[0]), dtype=torch.float32))
    return out


def _rows(encoded: list[EncodedSample]) -> tuple[list[list[EncodedSample]], int]:
    rows = [[encoded[0], encoded[1], encoded[3]], [encoded[2]]]
    return rows, max(sum(len(s) for s in row) for row in rows) + 5  # every row ends in padding


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_alone(tiny_model, encoded, attn):
    tiny_model.set_attn_implementation(attn)
    assert tiny_model.config.text_config._attn_implementation == attn
    rows, length = _rows(encoded)
    batch = pack_rows(rows, length, PAD)
    with torch.no_grad():
        packed = tiny_model(**model_inputs(batch, attn)).logits
        assert not torch.isnan(packed).any()
        for r, row in enumerate(rows):
            start = 0
            for s in row:
                alone = tiny_model(
                    input_ids=s.input_ids[None],
                    position_ids=s.position_ids[None],
                    attention_mask=torch.ones(1, len(s), dtype=torch.long),
                    pixel_values=s.pixel_values,
                ).logits[0]
                assert torch.allclose(packed[r, start : start + len(s)], alone, atol=1e-5), s.sample_id
                start += len(s)

        # Control: one causal mask over the whole row lets the second sub-sample see the first.
        leaky = dict(
            batch, attention_mask=torch.ones(length, length, dtype=torch.bool).tril().expand(2, 1, -1, -1)
        )
        leaked = tiny_model(**model_inputs(leaky, attn)).logits
    first = len(rows[0][0])
    assert torch.allclose(leaked[0, :first], packed[0, :first], atol=1e-5)
    assert not torch.allclose(
        leaked[0, first : first + len(rows[0][1])], packed[0, first : first + len(rows[0][1])], atol=1e-3
    )


def test_packed_loss_and_gradients_equal_padded(tiny_model, encoded):
    rows, length = _rows(encoded)
    packed = pack_rows(rows, length, PAD)
    padded = collate_padded(encoded, pad_token_id=PAD)
    params = [p for p in tiny_model.parameters() if p.requires_grad]

    def loss_and_grads(batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits = tiny_model(**model_inputs(batch, "sdpa")).logits
        loss = lm_loss(logits, batch["labels"], batch["sample_index"], "square")
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return loss.detach(), [
            torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
        ]

    packed_loss, packed_grads = loss_and_grads(packed)
    padded_loss, padded_grads = loss_and_grads(padded)
    assert packed_loss > 0
    assert torch.allclose(packed_loss, padded_loss, atol=1e-6)
    assert sum(int(g.abs().sum() > 0) for g in packed_grads) > len(params) // 2
    for p, g in zip(packed_grads, padded_grads, strict=True):
        assert torch.allclose(p, g, atol=1e-6)
    # Without the -100 at sub-sample starts, the packed loss would train across boundaries and differ.
    leaky_labels = packed["labels"].clone()
    starts = (packed["sample_index"][:, 1:] != packed["sample_index"][:, :-1]) & (
        packed["sample_index"][:, 1:] >= 0
    )
    leaky_labels[:, 1:][starts] = packed["input_ids"][:, 1:][starts]
    with torch.no_grad():
        logits = tiny_model(**model_inputs(packed, "sdpa")).logits
    assert not torch.allclose(lm_loss(logits, leaky_labels, packed["sample_index"]), packed_loss, atol=1e-4)
