"""VisualPRM-style generative process reward model: data format, step scoring and aggregation.

The PRM is the VLM itself, trained with SFT on a multi-turn conversation: the question and the first step
in the first user turn, each later step in its own user turn, and after every step an assistant reply of a
single token, `+` (correct) or `-` (incorrect). The SFT code tokenises the conversation with loss on the
assistant turns only. At inference the whole conversation goes through one forward pass and each step's
score is P(+) = softmax over just the `+`/`-` logits at its reply position.

The first user turn comes in two framings (`format_prm_conversation`'s `style`): vlpipe's `question\nstep 1`
(what `vlpipe.serving.scoring` scores) and VisualPRM's `### Question:\n{question}\n\n### Solution
Process:\n{step 1}` (VisualPRM400K's conversations). The question's `<image>` placeholders stay where they
are; a question without any gets one per image in front (`place_image_placeholders`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from vlpipe.objectives.config import AGGREGATIONS, Aggregation, PRMConfig
from vlpipe.objectives.lm import IGNORE_INDEX

__all__ = [
    "IMAGE_PLACEHOLDER",
    "MINUS",
    "PLUS",
    "PROMPT_STYLES",
    "VISUALPRM_QUESTION",
    "VISUALPRM_SOLUTION",
    "Aggregation",
    "PRMConfig",
    "PromptStyle",
    "aggregate_step_scores",
    "format_prm_conversation",
    "place_image_placeholders",
    "reply_positions_from_labels",
    "split_steps",
    "split_visualprm_question",
    "step_scores",
]

PLUS = "+"
MINUS = "-"
IMAGE_PLACEHOLDER = "<image>"
PromptStyle = Literal["vlpipe", "visualprm"]
PROMPT_STYLES: tuple[str, ...] = ("vlpipe", "visualprm")
# VisualPRM's converter (OpenGVLab/InternVL internvl_chat/tools/reasoning_data_pipeline/
# visualprm_data_pipeline_postprocess.py) frames the question and step 1 of the first human turn like this.
VISUALPRM_QUESTION = "### Question:\n"
VISUALPRM_SOLUTION = "\n\n### Solution Process:\n"


def split_steps(solution: str) -> list[str]:
    """Split a solution into steps: one step per line, stripped, blank lines ignored.

    Args:
        solution: the steps joined by "\\n".

    Returns:
        The non-blank lines, stripped (empty for a blank solution).
    """
    return [line.strip() for line in solution.splitlines() if line.strip()]


def place_image_placeholders(question: str, num_images: int) -> str:
    """The question with one `<image>` placeholder per image, placed where the record says.

    A question that already holds its placeholders is returned unchanged; one without any gets one
    `<image>\\n` per image in front (InternVL's convention for a single image). Text-only questions keep none.

    Args:
        question: the question text, with or without `<image>` placeholders.
        num_images: the record's image count (0 for text-only).

    Returns:
        The question with exactly `num_images` placeholders.

    Raises:
        ValueError: when the question holds placeholders but not one per image.
    """
    found = question.count(IMAGE_PLACEHOLDER)
    if found == num_images:
        return question
    if found == 0:
        return (IMAGE_PLACEHOLDER + "\n") * num_images + question
    raise ValueError(
        f"the question has {found} {IMAGE_PLACEHOLDER} placeholders for {num_images} images; "
        f"put one {IMAGE_PLACEHOLDER} where each image goes, or none to place them all in front"
    )


def format_prm_conversation(
    question: str,
    steps: list[str],
    labels: list[bool] | None,
    image_placeholder: bool = True,
    *,
    num_images: int = 1,
    style: PromptStyle = "vlpipe",
    system_prompt: str | None = None,
) -> list[dict[str, str]]:
    """Turn a question and its labelled solution steps into InternVL conversation turns.

    Style `vlpipe` (what `vlpipe.serving.scoring` scores): `[{"from": "human", "value": question + "\\n" +
    steps[0]}, {"from": "gpt", "value": "+"}, {"from": "human", "value": steps[1]}, {"from": "gpt", "value":
    "-"}, ...]`. Style `visualprm` (VisualPRM's converter): the first human turn is `"### Question:\\n" +
    question + "\\n\\n### Solution Process:\\n" + steps[0]`. A `system_prompt` becomes a leading system
    turn. The loss goes on the gpt turns only (the SFT tokeniser's job).

    Args:
        question: the question text, with its `<image>` placeholders or without any.
        steps: the solution steps, each a non-blank string.
        labels: per step True (correct, "+") or False (incorrect, "-"). None at inference: every reply is
            then a "+" placeholder; the score is read from the logits predicting the reply token, so the
            placeholder's value does not matter.
        image_placeholder: place the image placeholders the question lacks (`place_image_placeholders`);
            False when the question already holds them all.
        num_images: the record's image count (0: text-only; a question without placeholders gets one
            `<image>\\n` per image in front).
        style: `vlpipe` or `visualprm` (see above).
        system_prompt: an optional system turn before the first human turn.

    Returns:
        The turns: the optional system turn, then alternating human/gpt turns, two per step.

    Raises:
        ValueError: when steps is empty, a step is not a non-blank string or holds `<image>`, labels' length
            differs from steps', a label is not a bool, the placeholders do not match the images, or the style
            is unknown.
    """
    if not steps:
        raise ValueError("PRM sample has no steps; a solution needs at least one step")
    for i, step in enumerate(steps):
        if not isinstance(step, str) or not step.strip():
            raise ValueError(f"PRM step {i} must be a non-blank string; got {step!r}")
        if IMAGE_PLACEHOLDER in step:
            raise ValueError(f"PRM step {i} contains {IMAGE_PLACEHOLDER}; only the question may hold images")
    if labels is not None:
        if len(labels) != len(steps):
            raise ValueError(f"PRM sample has {len(steps)} steps but {len(labels)} labels; they must match")
        for i, label in enumerate(labels):
            if not isinstance(label, bool):
                raise ValueError(f"PRM label {i} must be a bool (True = correct step); got {label!r}")
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown PRM prompt style {style!r}; allowed: {', '.join(PROMPT_STYLES)}")
    if image_placeholder:
        question = place_image_placeholders(question, num_images)
    replies = [PLUS] * len(steps) if labels is None else [PLUS if ok else MINUS for ok in labels]
    turns: list[dict[str, str]] = []
    if system_prompt:
        turns.append({"from": "system", "value": system_prompt})
    for i, (step, reply) in enumerate(zip(steps, replies, strict=True)):
        if i > 0:
            value = step
        elif style == "visualprm":
            value = f"{VISUALPRM_QUESTION}{question}{VISUALPRM_SOLUTION}{step}"
        else:
            value = f"{question}\n{step}"
        turns.append({"from": "human", "value": value})
        turns.append({"from": "gpt", "value": reply})
    return turns


def split_visualprm_question(first_turn: str) -> tuple[str, str] | None:
    """(question, first step) of a first human turn in VisualPRM's framing, else None.

    `"### Question:\\n" + question + "\\n\\n### Solution Process:\\n" + step` → (question, step); the
    question ends at the first solution header.
    """
    if not first_turn.startswith(VISUALPRM_QUESTION) or VISUALPRM_SOLUTION not in first_turn:
        return None
    question, step = first_turn[len(VISUALPRM_QUESTION) :].split(VISUALPRM_SOLUTION, 1)
    return question, step


def reply_positions_from_labels(labels: Tensor) -> Tensor:
    """Reply positions of a tokenised PRM conversation, from its SFT labels.

    Assumes the loss is on the assistant turns only, each preceded by unsupervised tokens (the user turn and
    the assistant header), and that the first supervised token of each assistant turn is the `+`/`-` reply.
    A reply position t is then one where `labels[t + 1]` starts a run of supervised tokens.

    Args:
        labels: (T,) or (B, T) token ids aligned with input_ids, -100 where not supervised.

    Returns:
        (S,) or (B, S) int64 positions, in order; batched rows are right-padded with -1.

    Raises:
        ValueError: when labels is not 1-D or 2-D.
    """
    if labels.dim() not in (1, 2):
        raise ValueError(f"labels must be (seq_len,) or (batch, seq_len); got shape {tuple(labels.shape)}")
    rows = labels.unsqueeze(0) if labels.dim() == 1 else labels
    starts = (rows[:, 1:] != IGNORE_INDEX) & (rows[:, :-1] == IGNORE_INDEX)
    per_row = [torch.nonzero(row).flatten() for row in starts]
    if labels.dim() == 1:
        return per_row[0]
    width = max((len(p) for p in per_row), default=0)
    padded = torch.full((len(per_row), width), -1, dtype=torch.int64, device=labels.device)
    for i, positions in enumerate(per_row):
        padded[i, : len(positions)] = positions
    return padded


def step_scores(logits: Tensor, reply_positions: Tensor, plus_id: int, minus_id: int) -> Tensor:
    """P(+) of every step, from one forward pass over the whole conversation.

    The reply position of a step is the index of the token whose logits predict its reply token, i.e. the
    position just BEFORE the `+`/`-` token in the sequence. P(+) = softmax([l+, l-])[0] = sigmoid(l+ - l-),
    the softmax over just the `+` and `-` logits there. Computed in float32.

    Args:
        logits: (T, V) for one sequence or (B, T, V) for a batch.
        reply_positions: (S,) or (B, S) int positions (one fewer dimension than logits); -1 means "no step"
            (padding) and scores NaN.
        plus_id: token id of `+`.
        minus_id: token id of `-`.

    Returns:
        (S,) or (B, S) float32 scores in [0, 1], NaN at padded positions.

    Raises:
        ValueError: on mismatched shapes, positions outside [-1, T - 1], or token ids outside the vocabulary
            or equal to each other.
    """
    if logits.dim() not in (2, 3) or reply_positions.dim() != logits.dim() - 1:
        raise ValueError(
            f"logits (T, V) need reply_positions (S,), logits (B, T, V) need (B, S); "
            f"got {tuple(logits.shape)} and {tuple(reply_positions.shape)}"
        )
    batched_logits = logits if logits.dim() == 3 else logits.unsqueeze(0)
    positions = reply_positions if reply_positions.dim() == 2 else reply_positions.unsqueeze(0)
    batch, seq_len, vocab = batched_logits.shape
    if positions.shape[0] != batch:
        raise ValueError(f"reply_positions has {positions.shape[0]} rows but logits has {batch}")
    if plus_id == minus_id or not (0 <= plus_id < vocab and 0 <= minus_id < vocab):
        raise ValueError(f"plus_id {plus_id} and minus_id {minus_id} must be distinct ids in [0, {vocab})")
    if positions.numel() and (positions.min() < -1 or positions.max() >= seq_len):
        raise ValueError(f"reply_positions must lie in [-1, {seq_len - 1}] (-1 = padding)")
    positions = positions.to(device=batched_logits.device, dtype=torch.int64)
    is_step = positions >= 0
    rows = torch.arange(batch, device=positions.device).unsqueeze(1).expand_as(positions)
    at_reply = batched_logits[rows, positions.clamp_min(0)].float()  # (B, S, V)
    scores = torch.sigmoid(at_reply[..., plus_id] - at_reply[..., minus_id])
    scores = torch.where(is_step, scores, torch.full_like(scores, float("nan")))
    return scores if reply_positions.dim() == 2 else scores[0]


def _mean(scores: Tensor, is_step: Tensor) -> Tensor:
    return scores.nanmean(dim=-1)


def _min(scores: Tensor, is_step: Tensor) -> Tensor:
    lowest = torch.where(is_step, scores, torch.full_like(scores, float("inf"))).amin(dim=-1)
    return torch.where(is_step.any(dim=-1), lowest, torch.full_like(lowest, float("nan")))


def _last(scores: Tensor, is_step: Tensor) -> Tensor:
    index = torch.arange(scores.shape[-1], device=scores.device).expand_as(scores)
    last_index = torch.where(is_step, index, torch.full_like(index, -1)).amax(dim=-1, keepdim=True)
    last = scores.gather(-1, last_index.clamp_min(0)).squeeze(-1)
    return torch.where(is_step.any(dim=-1), last, torch.full_like(last, float("nan")))


_AGGREGATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"mean": _mean, "min": _min, "last": _last}


def aggregate_step_scores(scores: Tensor, method: Aggregation = "mean") -> Tensor:
    """Aggregate step scores into a solution score, ignoring NaN padding.

    Args:
        scores: (S,) or (B, S) step scores, NaN where there is no step.
        method: "mean" (default), "min" (the weakest step) or "last" (the last real step).

    Returns:
        A scalar for (S,) input, (B,) for (B, S); NaN for a solution without any step.

    Raises:
        ValueError: on an unknown method (the message lists the allowed ones) or scores not 1-D/2-D.
    """
    if method not in _AGGREGATORS:
        raise ValueError(f"unknown step-score aggregation {method!r}; allowed: {', '.join(AGGREGATIONS)}")
    if scores.dim() not in (1, 2):
        raise ValueError(f"scores must be (S,) or (B, S); got shape {tuple(scores.shape)}")
    return _AGGREGATORS[method](scores, ~torch.isnan(scores))
