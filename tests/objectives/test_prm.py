"""Tests of vlpipe.objectives.prm: conversation format, step scoring, aggregation."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from vlpipe.objectives.config import PRMConfig
from vlpipe.objectives.lm import IGNORE_INDEX
from vlpipe.objectives.prm import (
    MINUS,
    PLUS,
    aggregate_step_scores,
    format_prm_conversation,
    reply_positions_from_labels,
    split_steps,
    step_scores,
)

X = IGNORE_INDEX
NAN = float("nan")


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_split_steps() -> None:
    solution = "  Step 1: area = 3 * 4 \n\n Step 2: = 12\n   \nAnswer: 12\n"
    assert split_steps(solution) == ["Step 1: area = 3 * 4", "Step 2: = 12", "Answer: 12"]
    assert split_steps(" \n ") == []


def test_format_with_labels() -> None:
    turns = format_prm_conversation("What is 3*4?", ["3*4 = 12", "so 13", "Answer: 13"], [True, False, False])
    assert turns == [
        {"from": "human", "value": "<image>\nWhat is 3*4?\n3*4 = 12"},
        {"from": "gpt", "value": "+"},
        {"from": "human", "value": "so 13"},
        {"from": "gpt", "value": "-"},
        {"from": "human", "value": "Answer: 13"},
        {"from": "gpt", "value": "-"},
    ]
    assert (PLUS, MINUS) == ("+", "-")


def test_format_for_inference_without_image() -> None:
    turns = format_prm_conversation("Q", ["a", "b"], labels=None, image_placeholder=False)
    assert turns == [
        {"from": "human", "value": "Q\na"},
        {"from": "gpt", "value": "+"},
        {"from": "human", "value": "b"},
        {"from": "gpt", "value": "+"},
    ]


@pytest.mark.parametrize(
    ("steps", "labels", "match"),
    [
        ([], None, "no steps"),
        (["a", "  "], None, "step 1"),
        (["a", 3], None, "step 1"),
        (["a", "b"], [True], "2 steps but 1 labels"),
        (["a", "b"], [True, 1], "label 1"),
    ],
)
def test_format_rejects_bad_samples(steps: list, labels: list | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        format_prm_conversation("Q", steps, labels)


# Vocabulary of 4 tokens; "+" is id 2 and "-" is id 3.
PLUS_ID, MINUS_ID = 2, 3


def test_step_scores_single_sequence() -> None:
    logits = torch.zeros(6, 4)
    logits[1, PLUS_ID], logits[1, MINUS_ID] = 2.0, 0.0  # step 1 predicted at position 1
    logits[3, PLUS_ID], logits[3, MINUS_ID] = -1.0, 1.0  # step 2 at position 3
    logits[5, PLUS_ID], logits[5, MINUS_ID] = 0.5, 0.5  # step 3 at position 5
    logits[:, 0] = 100.0  # other tokens do not take part in the +/- softmax
    scores = step_scores(logits, torch.tensor([1, 3, 5]), PLUS_ID, MINUS_ID)
    # softmax([l+, l-])[0] = e^l+ / (e^l+ + e^l-) = sigmoid(l+ - l-)
    expected = [
        math.exp(2) / (math.exp(2) + math.exp(0)),
        _sigmoid(-1 - 1),
        0.5,
    ]
    assert scores.dtype == torch.float32
    assert scores.tolist() == pytest.approx(expected, rel=1e-6)


def test_step_scores_batched_with_padding() -> None:
    logits = torch.zeros(2, 5, 4, dtype=torch.bfloat16)
    logits[0, 0, PLUS_ID] = 1.0  # row 0 step at 0: sigmoid(1 - 0)
    logits[0, 4, MINUS_ID] = 2.0  # row 0 step at 4: sigmoid(0 - 2)
    logits[1, 2, PLUS_ID] = 3.0  # row 1 single step at 2: sigmoid(3 - 0)
    positions = torch.tensor([[0, 4], [2, -1]])
    scores = step_scores(logits, positions, PLUS_ID, MINUS_ID)
    assert scores.shape == (2, 2)
    assert scores[0].tolist() == pytest.approx([_sigmoid(1), _sigmoid(-2)], rel=1e-6)
    assert scores[1, 0].item() == pytest.approx(_sigmoid(3), rel=1e-6)
    assert math.isnan(scores[1, 1].item())


def test_step_scores_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"\[-1, 4\]"):
        step_scores(torch.zeros(5, 4), torch.tensor([5]), PLUS_ID, MINUS_ID)
    with pytest.raises(ValueError, match="distinct"):
        step_scores(torch.zeros(5, 4), torch.tensor([1]), PLUS_ID, PLUS_ID)
    with pytest.raises(ValueError, match="distinct"):
        step_scores(torch.zeros(5, 4), torch.tensor([1]), PLUS_ID, 4)
    with pytest.raises(ValueError, match="need"):
        step_scores(torch.zeros(5, 4), torch.tensor([[1]]), PLUS_ID, MINUS_ID)


def test_reply_positions_from_labels() -> None:
    # tokens: [q q q + e u u - e]: replies at 3 and 7 are predicted from positions 2 and 6.
    labels = torch.tensor([X, X, X, PLUS_ID, 0, X, X, MINUS_ID, 0])
    assert reply_positions_from_labels(labels).tolist() == [2, 6]
    batched = torch.stack([labels, torch.tensor([X, PLUS_ID, 0, X, X, X, X, X, X])])
    assert reply_positions_from_labels(batched).tolist() == [[2, 6], [0, -1]]


def test_one_forward_pass_scores_every_step() -> None:
    # End to end on ids: the logits predicting each reply token come from the position before it.
    labels = torch.tensor([X, X, X, PLUS_ID, 0, X, X, MINUS_ID, 0])
    logits = torch.zeros(9, 4)
    logits[2, PLUS_ID] = math.log(3)  # P(+) = 3 / (3 + 1)
    logits[6, MINUS_ID] = math.log(4)  # P(+) = 1 / (1 + 4)
    scores = step_scores(logits, reply_positions_from_labels(labels), PLUS_ID, MINUS_ID)
    assert scores.tolist() == pytest.approx([3 / 4, 1 / 5], rel=1e-6)


def test_aggregation_single_solution() -> None:
    scores = torch.tensor([0.9, 0.3, 0.6])
    assert aggregate_step_scores(scores).item() == pytest.approx((0.9 + 0.3 + 0.6) / 3)
    assert aggregate_step_scores(scores, "min").item() == pytest.approx(0.3)
    assert aggregate_step_scores(scores, "last").item() == pytest.approx(0.6)


def test_aggregation_ignores_nan_padding() -> None:
    scores = torch.tensor([[0.2, 0.8, NAN], [0.5, NAN, NAN], [NAN, NAN, NAN]])
    mean = aggregate_step_scores(scores, "mean")
    assert mean[:2].tolist() == pytest.approx([(0.2 + 0.8) / 2, 0.5])
    minimum = aggregate_step_scores(scores, "min")
    assert minimum[:2].tolist() == pytest.approx([0.2, 0.5])
    last = aggregate_step_scores(scores, "last")
    assert last[:2].tolist() == pytest.approx([0.8, 0.5])
    for result in (mean, minimum, last):
        assert math.isnan(result[2].item())  # a solution without steps has no score


def test_unknown_aggregation_fails() -> None:
    with pytest.raises(ValueError, match="mean, min, last"):
        aggregate_step_scores(torch.tensor([0.5]), "max")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        PRMConfig(aggregation="max")  # type: ignore[arg-type]
    assert PRMConfig().aggregation == "mean"
