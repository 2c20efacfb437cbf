import random

import pytest
import torch

from vlpipe.model.conversation import ConversationEncoder
from vlpipe.model.generate import generate
from vlpipe.model.v2pe import TRAINING_DELTAS, sample_deltas, v2pe_position_ids

IMG = 9


def test_positions_by_hand():
    # text t t | image of 4 tokens, δ=0.5 | text t t | image of 2 tokens, δ=0.25 | text t
    ids = torch.tensor([1, 2, IMG, IMG, IMG, IMG, 3, 4, IMG, IMG, 5])
    pos = v2pe_position_ids(ids, IMG, [0.5, 0.25])
    # text 0, 1; visual 1+0.5k → 1.5, 2, 2.5, 3; text ceil(3)+1 = 4, 5; visual 5.25, 5.5; text ceil(5.5)+1 = 7
    assert pos.tolist() == [0, 1, 1.5, 2, 2.5, 3, 4, 5, 5.25, 5.5, 7]
    assert pos.dtype == torch.float32


def test_fractional_end_rounds_up():
    ids = torch.tensor([1, IMG, IMG, IMG, 2])
    # visual: 0.25, 0.5, 0.75 → text at ceil(0.75) + 1 = 2
    assert v2pe_position_ids(ids, IMG, [0.25]).tolist() == [0, 0.25, 0.5, 0.75, 2]


def test_delta_one_is_plain_positions():
    ids = torch.tensor([1, IMG, IMG, 2, IMG, 3])
    assert torch.equal(v2pe_position_ids(ids, IMG, 1.0), torch.arange(6, dtype=torch.float32))


def test_wrong_delta_count_and_range():
    ids = torch.tensor([1, IMG, 2, IMG])
    with pytest.raises(ValueError, match="2 image blocks"):
        v2pe_position_ids(ids, IMG, [0.5])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        v2pe_position_ids(ids, IMG, [0.5, 2.0])


def test_training_deltas_are_seeded_powers_of_two():
    assert TRAINING_DELTAS == (1, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625)
    a = sample_deltas(50, random.Random(7))
    assert a == sample_deltas(50, random.Random(7))
    assert set(a) <= set(TRAINING_DELTAS) and len(set(a)) > 3


def _prompt(tok, model, delta):
    enc = ConversationEncoder(tok, tokens_per_tile=4, max_length=256)
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 32, 32)
    rec = {
        "id": "p",
        "image": "a.png",
        "conversations": [{"from": "human", "value": "<image>\nHow many red shapes?"}],
    }
    return enc.encode(rec, [3], pixel_values=pixels, v2pe_deltas=delta, add_generation_prompt=True)


def test_float_positions_reach_rotary_unchanged(tiny_model, tiny_tokenizer):
    p = _prompt(tiny_tokenizer, tiny_model, 1.0)
    kw = {
        "input_ids": p.input_ids[None],
        "pixel_values": p.pixel_values,
        "attention_mask": torch.ones(1, len(p)),
    }
    with torch.no_grad():
        default = tiny_model(**kw).logits
        as_float = tiny_model(**kw, position_ids=p.position_ids[None]).logits
        halved = tiny_model(
            **kw, position_ids=_prompt(tiny_tokenizer, tiny_model, 0.5).position_ids[None]
        ).logits
    assert torch.allclose(default, as_float, atol=1e-5)
    assert not torch.allclose(default[0, -1], halved[0, -1], atol=1e-4)  # δ really changes the computation


def test_cached_generation_continues_from_last_position(tiny_model, tiny_tokenizer):
    p = _prompt(tiny_tokenizer, tiny_model, 0.25)
    eos = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    new = generate(
        tiny_model, [p], eos_token_id=-1, pad_token_id=tiny_tokenizer.pad_token_id, max_new_tokens=6
    )[0]
    assert len(new) == 6 and eos != -1
    # Recompute without a cache: prompt positions then last + 1, last + 2, ...; greedy argmax must reproduce
    # every generated token, which only holds if the cached decode used exactly these positions.
    full = torch.cat([p.input_ids, torch.tensor(new)])
    last = float(p.position_ids[-1])
    positions = torch.cat([p.position_ids, last + torch.arange(1, len(new) + 1, dtype=torch.float32)])
    with torch.no_grad():
        logits = tiny_model(input_ids=full[None], pixel_values=p.pixel_values, position_ids=positions[None],
                            attention_mask=torch.ones(1, len(full))).logits[0]  # fmt: skip
        assert logits[len(p) - 1 : -1].argmax(-1).tolist() == new
        # ...and a different continuation rule (positions restarting at len(prompt)) gives other logits.
        naive = torch.cat([p.position_ids, len(p) + torch.arange(len(new), dtype=torch.float32)])
        other = tiny_model(input_ids=full[None], pixel_values=p.pixel_values, position_ids=naive[None],
                           attention_mask=torch.ones(1, len(full))).logits[0]  # fmt: skip
    assert not torch.allclose(other[len(p) :], logits[len(p) :], atol=1e-4)


def test_batched_sampling_is_seeded_and_left_padded(tiny_model, tiny_tokenizer):
    p = _prompt(tiny_tokenizer, tiny_model, 1.0)
    enc = ConversationEncoder(tiny_tokenizer, tokens_per_tile=4, max_length=256)
    q = enc.encode(
        {"id": "q", "conversations": [{"from": "human", "value": "Hi"}]}, [], add_generation_prompt=True
    )
    kw = {"eos_token_id": -1, "pad_token_id": tiny_tokenizer.pad_token_id, "max_new_tokens": 5}
    greedy_alone = generate(tiny_model, [q], **kw)[0]
    greedy_batched = generate(tiny_model, [p, q], **kw)[1]
    assert greedy_alone == greedy_batched  # left padding + attention mask leave the shorter prompt unchanged
    s1 = generate(tiny_model, [p, p, p], do_sample=True, seed=1, temperature=1.5, **kw)
    s2 = generate(tiny_model, [p, p, p], do_sample=True, seed=1, temperature=1.5, **kw)
    assert s1 == s2 and len({tuple(x) for x in s1}) > 1
