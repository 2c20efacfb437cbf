"""The PRM is trained as it is scored: reply tokens in the input are `+` placeholders, labels keep the truth."""

from __future__ import annotations

import torch

from vlpipe.components.prm.stage import reply_placeholders, single_token_id
from vlpipe.model.conversation import ConversationEncoder
from vlpipe.objectives.lm import IGNORE_INDEX
from vlpipe.objectives.prm import format_prm_conversation, reply_positions_from_labels


def _encoded(tokenizer, labels):
    steps = ["I see a red square and a blue circle.", "The red one is the square.", "So the answer is 1."]
    encoder = ConversationEncoder(tokenizer, tokens_per_tile=4, max_length=512, mode="sft")
    turns = format_prm_conversation("How many red shapes are there?", steps, labels, image_placeholder=False)
    return encoder.encode({"id": "s", "conversations": turns}, [])


def test_replies_become_placeholders_in_the_input_only(tiny_tokenizer):
    plus, minus = single_token_id(tiny_tokenizer, "+"), single_token_id(tiny_tokenizer, "-")
    a = _encoded(tiny_tokenizer, [True, False, False])
    b = _encoded(tiny_tokenizer, [True, True, True])  # what the scorer feeds: all `+`
    batch = {
        "input_ids": torch.stack([a.input_ids, b.input_ids]),
        "labels": torch.stack([a.labels, b.labels]),
    }

    out = reply_placeholders(tiny_tokenizer)(batch)

    reply_tokens = reply_positions_from_labels(a.labels) + 1
    assert a.input_ids[reply_tokens].tolist() == [plus, minus, minus]
    assert out["input_ids"][0, reply_tokens].tolist() == [plus, plus, plus]
    # The model now sees exactly the scorer's input, while the targets are unchanged.
    assert torch.equal(out["input_ids"][0], b.input_ids)
    assert torch.equal(out["labels"], batch["labels"])
    assert out["labels"][0, reply_tokens].tolist() == [plus, minus, minus]
    assert torch.equal(batch["input_ids"][0], a.input_ids)  # the input batch is not modified in place
    changed = (out["input_ids"] != batch["input_ids"]).nonzero()[:, 1].tolist()
    assert sorted(changed) == sorted(reply_tokens[1:].tolist())


def test_packed_rows_and_padding_are_handled(tiny_tokenizer):
    plus = single_token_id(tiny_tokenizer, "+")
    a = _encoded(tiny_tokenizer, [False, False, False])
    row_ids = torch.cat([a.input_ids, a.input_ids, torch.zeros(5, dtype=torch.long)])
    row_labels = torch.cat([a.labels, a.labels, torch.full((5,), IGNORE_INDEX)])
    out = reply_placeholders(tiny_tokenizer)({"input_ids": row_ids[None], "labels": row_labels[None]})
    replies = reply_positions_from_labels(row_labels) + 1
    assert len(replies) == 6
    assert out["input_ids"][0, replies].tolist() == [plus] * 6
    assert out["input_ids"][0, -5:].tolist() == [0] * 5
