"""Process reward model scoring: every step of an answer scored in ONE forward pass.

The PRM is the VLM trained on VisualPRM conversations (`vlpipe.objectives.prm.format_prm_conversation`): the question
and step 1 in the first user turn, each later step in its own user turn, and after each a one-token assistant
reply `+`/`-`. At inference every reply is a `+` placeholder; the conversation is encoded by the same
`ConversationEncoder` (SFT mode) as in PRM training, the reply positions come from its labels, and one forward
gives all step scores P(+) = sigmoid(l+ - l-) because attention is causal: the logits at step j's reply
position only see the question and steps 1..j. `score_steps_per_prefix` is the slow reference that runs one
forward per step prefix (used by the equivalence test and the benchmark).

The N answers of an item go through one right-padded batch. Only the hidden states at reply positions are
projected onto the vocabulary, so memory does not grow with (tokens x vocabulary).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vlpipe.model.checkpoint import LoadedModel
from vlpipe.model.collate import collate_padded
from vlpipe.model.conversation import ConversationEncoder, EncodedSample
from vlpipe.model.tokenizer import single_token_id
from vlpipe.objectives.prm import (
    MINUS,
    PLUS,
    Aggregation,
    aggregate_step_scores,
    format_prm_conversation,
    reply_positions_from_labels,
    split_steps,
    step_scores,
)

# The PRM conversation is the prompt plus an answer capped by max_new_tokens, so it is never truncated here;
# the model's context length is the real limit.
_NO_TRUNCATION = 1 << 30
_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class ScoredAnswer:
    """PRM scores of one answer.

    Attributes:
        steps: the answer's steps (`vlpipe.objectives.prm.split_steps`).
        step_scores: P(+) of each step.
        score: the aggregated score; NaN for an answer without any step.
    """

    steps: tuple[str, ...]
    step_scores: tuple[float, ...]
    score: float


def answer_steps(answer: str) -> list[str]:
    """The steps of an answer as the PRM sees them: `split_steps`, with `<image>` in a step neutralised (a
    step sits in a user turn, where the placeholder would ask for an image that is not there)."""
    return [step.replace(_PLACEHOLDER, "[image]") for step in split_steps(answer)]


class PRMScorer:
    """Scores answers with a process reward model checkpoint.

    Args:
        prm: the loaded PRM checkpoint.
        aggregation: how step scores become an answer score.
    """

    def __init__(self, prm: LoadedModel, aggregation: Aggregation = "mean") -> None:
        self.prm = prm
        self.aggregation = aggregation
        tokenizer = prm.tokenizer
        self.encoder = ConversationEncoder(tokenizer, prm.tokens_per_tile, _NO_TRUNCATION, mode="sft")
        self.plus_id = single_token_id(tokenizer, PLUS)
        self.minus_id = single_token_id(tokenizer, MINUS)
        self.pad_id = int(tokenizer.pad_token_id)

    @property
    def device(self) -> torch.device:
        return next(self.prm.model.parameters()).device

    def encode(
        self,
        prompt_text: str,
        steps: Sequence[str],
        num_tiles: Sequence[int],
        pixel_values: torch.Tensor | None,
        sample_id: str = "prm",
    ) -> tuple[EncodedSample, torch.Tensor]:
        """Encode a PRM conversation and find its reply positions.

        Args:
            prompt_text: the user turn's text with its `<image>` placeholders (`BenchmarkItem.prompt_text`).
            steps: the answer's steps (non-blank).
            num_tiles: tiles per image, in order (from `vlpipe.model.image.process_image` with the PRM's settings).
            pixel_values: the PRM's processed tiles.
            sample_id: name used in errors.

        Returns:
            The encoded sample and its (S,) reply positions, one per step.
        """
        turns = format_prm_conversation(prompt_text, list(steps), None, image_placeholder=False)
        record: dict = {"id": sample_id, "conversations": turns}
        if num_tiles:
            record["image"] = [f"image-{i}" for i in range(len(num_tiles))]
        sample = self.encoder.encode(
            record, list(num_tiles), pixel_values=pixel_values, v2pe_deltas=self.prm.v2pe_delta
        )
        positions = reply_positions_from_labels(sample.labels)
        if len(positions) != len(steps):
            raise RuntimeError(
                f"{sample_id}: found {len(positions)} PRM reply positions for {len(steps)} steps"
            )
        return sample, positions

    @torch.no_grad()
    def _forward_scores(
        self, samples: Sequence[EncodedSample], positions: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """(B, S_max) step scores of right-padded samples from one forward pass; NaN past each row's steps."""
        model = self.prm.model
        batch = collate_padded(samples, self.pad_id, padding_side="right")
        inputs = {
            "input_ids": batch["input_ids"].to(self.device),
            "attention_mask": batch["attention_mask"].to(self.device),
            "position_ids": batch["position_ids"].to(self.device),
            "use_cache": False,
        }
        if "pixel_values" in batch:
            inputs["pixel_values"] = batch["pixel_values"].to(self.device, dtype=model.dtype)
        hidden = model.model(**inputs).last_hidden_state  # (B, T, H)
        width = max(len(p) for p in positions)
        index = torch.full((len(samples), width), -1, dtype=torch.long)
        for row, p in enumerate(positions):
            index[row, : len(p)] = p
        index = index.to(self.device)
        rows = torch.arange(len(samples), device=self.device).unsqueeze(1)
        reply_logits = model.lm_head(hidden[rows, index.clamp_min(0)])  # (B, S_max, V)
        steps_index = torch.arange(width, device=self.device).expand_as(index)
        return step_scores(
            reply_logits, torch.where(index >= 0, steps_index, -1), self.plus_id, self.minus_id
        ).cpu()

    def score_answers(
        self,
        prompt_text: str,
        answers: Sequence[str],
        num_tiles: Sequence[int],
        pixel_values: torch.Tensor | None,
        sample_id: str = "prm",
    ) -> list[ScoredAnswer]:
        """Score answers to one question: all steps of all answers in ONE padded forward pass.

        Args:
            prompt_text: the user turn's text with its `<image>` placeholders.
            answers: the answers (steps are lines; see `answer_steps`).
            num_tiles: tiles per image (PRM's image settings).
            pixel_values: the PRM's processed tiles of the question's images.
            sample_id: name used in errors.

        Returns:
            One `ScoredAnswer` per answer, in order; an answer without steps scores NaN (ranked last).
        """
        steps = [answer_steps(a) for a in answers]
        scored = [i for i, s in enumerate(steps) if s]
        results = [ScoredAnswer((), (), math.nan) for _ in answers]
        if not scored:
            return results
        encoded = [
            self.encode(prompt_text, steps[i], num_tiles, pixel_values, f"{sample_id}/sample-{i}")
            for i in scored
        ]
        scores = self._forward_scores([e[0] for e in encoded], [e[1] for e in encoded])
        aggregated = aggregate_step_scores(scores, self.aggregation)
        for row, i in enumerate(scored):
            n = len(steps[i])
            results[i] = ScoredAnswer(
                tuple(steps[i]), tuple(float(x) for x in scores[row, :n]), float(aggregated[row])
            )
        return results


@torch.no_grad()
def score_steps_per_prefix(
    scorer: PRMScorer,
    prompt_text: str,
    steps: Sequence[str],
    num_tiles: Sequence[int],
    pixel_values: torch.Tensor | None,
) -> list[float]:
    """Reference scoring: one full forward per step prefix (steps 1..j), reading step j's score each time.

    S forwards instead of one; used to check `PRMScorer.score_answers` and to measure its speedup.
    """
    model = scorer.prm.model
    scores = []
    for j in range(1, len(steps) + 1):
        sample, positions = scorer.encode(prompt_text, steps[:j], num_tiles, pixel_values)
        inputs = {
            "input_ids": sample.input_ids[None].to(scorer.device),
            "attention_mask": torch.ones(1, len(sample), dtype=torch.long, device=scorer.device),
            "position_ids": sample.position_ids[None].to(scorer.device),
            "use_cache": False,
        }
        if sample.pixel_values is not None:
            inputs["pixel_values"] = sample.pixel_values.to(scorer.device, dtype=model.dtype)
        logits = model(**inputs).logits[0]
        scores.append(float(step_scores(logits, positions[-1:], scorer.plus_id, scorer.minus_id)[0]))
    return scores
