"""The PRM conversation format tokenised by the model's chat template: one forward pass scores every step."""

import torch

from vlpipe.model.conversation import ConversationEncoder
from vlpipe.objectives.prm import (
    MINUS,
    PLUS,
    format_prm_conversation,
    reply_positions_from_labels,
    step_scores,
)


def test_reply_positions_point_at_the_plus_minus_tokens(tiny_tokenizer, tiny_model):
    enc = ConversationEncoder(tiny_tokenizer, tokens_per_tile=4, max_length=512)
    steps = ["I see a red circle.", "The red ones are the circle.", "So the answer is 1."]
    turns = format_prm_conversation("How many red shapes?", steps, [True, False, False])
    s = enc.encode(
        {"id": "p", "image": "a.png", "conversations": turns}, [1], pixel_values=torch.randn(1, 3, 32, 32)
    )
    positions = reply_positions_from_labels(s.labels)
    assert len(positions) == 3
    plus, minus = tiny_tokenizer.convert_tokens_to_ids([PLUS, MINUS])
    assert [int(s.input_ids[p + 1]) for p in positions] == [plus, minus, minus]
    # Only the reply tokens and their <|im_end|> carry loss: 2 tokens per step.
    assert s.num_supervised == 2 * len(steps)
    with torch.no_grad():
        logits = tiny_model(
            input_ids=s.input_ids[None], pixel_values=s.pixel_values, position_ids=s.position_ids[None],
            attention_mask=torch.ones(1, len(s)),
        ).logits[0]  # fmt: skip
    scores = step_scores(logits, positions, plus, minus)
    expected = torch.sigmoid(logits[positions, plus] - logits[positions, minus])
    assert torch.allclose(scores, expected)
