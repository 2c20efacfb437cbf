"""InternVL JSONL conversations → `input_ids`, `labels` and V2PE `position_ids`.

A record looks like
`{"id": ..., "image": "a.jpg" | ["a.jpg", "b.jpg"], "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}]}`; pure-text records have no "image". The ChatML template of InternVL2.5/3 is
used; each `<image>` becomes `<img>` + tokens_per_tile·tiles `<IMG_CONTEXT>` + `</img>`.

Labels: in `sft` mode only assistant replies (and their `<|im_end|>`) carry loss; in `pretrain` mode every
text token does. Image tokens never carry loss. Truncation never cuts through an image block: such a sample is
rejected with a `SampleError` (reason `too_long`), so callers can count it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from vlpipe.model.errors import SampleError
from vlpipe.model.record import ROLES as _ROLES
from vlpipe.model.record import describe as _describe
from vlpipe.model.record import image_list

__all__ = ["ConversationEncoder", "EncodedSample", "image_list", "normalise_turns"]
from vlpipe.model.tokenizer import (
    IM_END,
    IM_START,
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    template_system_prompt,
)
from vlpipe.model.v2pe import TRAINING_DELTAS, sample_deltas, v2pe_position_ids

IGNORE_INDEX = -100
TEMPLATE_SYSTEM_PROMPT = "template"
"""`system_prompt` value meaning: whatever the checkpoint's chat template adds by default."""
# InternVL's grounding markup: `<ref>object</ref><box>[[x1, y1, x2, y2]]</box>`, `<quad>...</quad>`.
GROUNDING_TOKENS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>")
_GROUNDING = re.compile("(" + "|".join(re.escape(t) for t in GROUNDING_TOKENS) + ")")
IMAGE_PLACEHOLDER = "<image>"
LabelMode = Literal["sft", "pretrain"]


@dataclass
class EncodedSample:
    """One tokenised sample, ready for collation or packing."""

    sample_id: str
    input_ids: torch.Tensor  # (T,) long
    labels: torch.Tensor  # (T,) long, IGNORE_INDEX where no loss
    position_ids: torch.Tensor  # (T,) float32, V2PE
    num_tiles: list[int] = field(default_factory=list)  # tiles per image, in order
    pixel_values: torch.Tensor | None = None  # (sum(num_tiles), 3, S, S)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_supervised(self) -> int:
        """Number of tokens that carry loss."""
        return int((self.labels != IGNORE_INDEX).sum())


def normalise_turns(record: dict, sample_id: str) -> list[tuple[str, str]]:
    """Validate a record's turns and return (role, text) pairs with roles user/assistant/system.

    A single-image record without any `<image>` placeholder gets one prepended to its first user turn
    (InternVL's convention). Raises `SampleError` on malformed turns or placeholder/image count mismatch.
    """
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise SampleError(sample_id, "malformed", 'missing or empty "conversations" list')
    out: list[tuple[str, str]] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise SampleError(sample_id, "malformed", f'turn {i} needs "from" and "value" keys')
        role = _ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            raise SampleError(
                sample_id, "malformed", f"turn {i} has unknown role {_describe(turn['from'])}; use human/gpt"
            )
        if not isinstance(turn["value"], str):
            raise SampleError(sample_id, "malformed", f"turn {i} value must be a string")
        if role != "user" and IMAGE_PLACEHOLDER in turn["value"]:
            raise SampleError(sample_id, "image_count_mismatch", f"turn {i} ({role}) contains <image>")
        out.append((role, turn["value"]))
    n_images = len(image_list(record))
    n_placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in out)
    if n_images == 1 and n_placeholders == 0:
        first_user = next((i for i, (r, _) in enumerate(out) if r == "user"), None)
        if first_user is None:
            raise SampleError(sample_id, "malformed", "no human turn to attach the image to")
        out[first_user] = ("user", f"{IMAGE_PLACEHOLDER}\n{out[first_user][1]}")
        n_placeholders = 1
    if n_placeholders != n_images:
        raise SampleError(
            sample_id,
            "image_count_mismatch",
            f"{n_placeholders} <image> placeholders but {n_images} images; add or remove placeholders so they match",
        )
    return out


class ConversationEncoder:
    """Turns InternVL conversation records into token ids and labels with the ChatML template.

    Args:
        tokenizer: a tokenizer carrying InternVL's image tokens (see `vlpipe.model.tokenizer`).
        tokens_per_tile: visual tokens per tile (256 for the real presets).
        max_length: the longest sample kept; longer text is truncated, but never through an image.
        mode: `sft` (loss on assistant replies) or `pretrain` (loss on every text token).
        system_prompt: the system message prepended to a conversation that has none: `"template"` (the
            default) takes the one the tokenizer's chat template adds by default (InternVL's message for
            OpenGVLab's checkpoints, none for vlpipe's own), so training, evaluation and serving encode what a
            runtime renders; a string sets it; None or "" sets none.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        tokens_per_tile: int,
        max_length: int,
        mode: LabelMode = "sft",
        system_prompt: str | None = TEMPLATE_SYSTEM_PROMPT,
    ) -> None:
        if mode not in ("sft", "pretrain"):
            raise ValueError(f"mode must be 'sft' or 'pretrain', got {mode!r}")
        self.tokenizer = tokenizer
        self.tokens_per_tile = tokens_per_tile
        self.max_length = max_length
        self.mode = mode
        if system_prompt == TEMPLATE_SYSTEM_PROMPT:
            system_prompt = template_system_prompt(tokenizer)
        self.system_prompt = system_prompt or None
        ids = tokenizer.convert_tokens_to_ids(
            [IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN, IM_START, IM_END]
        )
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            raise ValueError(
                "tokenizer lacks InternVL's special tokens; call vlpipe.model.tokenizer.add_internvl_tokens"
            )
        self.img_start_id, self.img_end_id, self.img_context_id, self.im_start_id, self.im_end_id = ids
        self._image_ids = torch.tensor(sorted({self.img_start_id, self.img_end_id, self.img_context_id}))
        # Template pieces are tokenised once here, not per turn of every sample (the data pipeline's hot path).
        self._headers = {
            role: self._template(f"{IM_START}{role}\n") for role in ("system", "user", "assistant")
        }
        self._newline = self._template("\n")
        # Grounding tokens the tokenizer holds as single tokens (InternVL's ids with InternVL's tokenizer).
        vocab = tokenizer.get_vocab()
        self._grounding_ids = {t: vocab[t] for t in GROUNDING_TOKENS if t in vocab}

    # -- tokenisation helpers -------------------------------------------------------------------------------
    def _template(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _content(self, text: str) -> list[int]:
        # User/assistant text never produces control tokens: a literal "<|im_end|>" or "<img>" in data stays
        # text. InternVL's grounding tokens are the exception: data is meant to hold them, as single tokens.
        if not text:
            return []
        if not self._grounding_ids or "<" not in text:
            return self._plain(text)
        ids: list[int] = []
        for piece in _GROUNDING.split(text):
            if piece in self._grounding_ids:
                ids.append(self._grounding_ids[piece])
            elif piece:
                ids += self._plain(piece)
        return ids

    def _plain(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def _user_content(self, text: str, tiles: Sequence[int], image_cursor: int) -> tuple[list[int], int]:
        ids: list[int] = []
        parts = text.split(IMAGE_PLACEHOLDER)
        for j, part in enumerate(parts):
            ids += self._content(part)
            if j < len(parts) - 1:
                n = tiles[image_cursor] * self.tokens_per_tile
                ids += [self.img_start_id] + [self.img_context_id] * n + [self.img_end_id]
                image_cursor += 1
        return ids, image_cursor

    # -- public API -----------------------------------------------------------------------------------------
    def encode(
        self,
        record: dict,
        num_tiles: Sequence[int],
        *,
        sample_id: str | None = None,
        pixel_values: torch.Tensor | None = None,
        v2pe_deltas: Sequence[float] | float = 1.0,
        add_generation_prompt: bool = False,
    ) -> EncodedSample:
        """Encode one record.

        Args:
            record: an InternVL conversation record.
            num_tiles: tiles of each image, in order (from `vlpipe.model.image.process_image` or `num_tiles`).
            sample_id: name used in errors; defaults to the record's "id".
            pixel_values: the processed tiles, stored on the result unchanged.
            v2pe_deltas: one δ per image (or one float for all); see `vlpipe.model.v2pe`.
            add_generation_prompt: end with the assistant header for generation (inference); the last turn
                must then be a user turn.

        Raises:
            SampleError: malformed record, image/placeholder mismatch, or a sample that cannot be truncated
                to `max_length` without cutting an image, or that has no supervised token left.
        """
        sid = str(sample_id or record.get("id", "<no id>"))
        turns = normalise_turns(record, sid)
        if len(num_tiles) != len(image_list(record)):
            raise SampleError(
                sid,
                "image_count_mismatch",
                f"{len(num_tiles)} tile counts for {len(image_list(record))} images",
            )
        if self.system_prompt and turns[0][0] != "system":
            turns = [("system", self.system_prompt), *turns]
        if self.mode == "sft" and not add_generation_prompt and not any(r == "assistant" for r, _ in turns):
            raise SampleError(sid, "malformed", "SFT sample has no gpt turn to learn from")
        if add_generation_prompt and turns[-1][0] != "user":
            raise SampleError(sid, "malformed", "a generation prompt must end with a human turn")

        input_ids: list[int] = []
        labels: list[int] = []
        image_cursor = 0
        for role, text in turns:
            header = self._headers[role]
            if role == "user":
                body, image_cursor = self._user_content(text, num_tiles, image_cursor)
            else:
                body = self._content(text)
            end = [self.im_end_id]
            newline = self._newline
            input_ids += header + body + end + newline
            if self.mode == "pretrain":
                labels += header + body + end + newline
            elif role == "assistant":
                labels += [IGNORE_INDEX] * len(header) + body + end + [IGNORE_INDEX] * len(newline)
            else:
                labels += [IGNORE_INDEX] * (len(header) + len(body) + len(end) + len(newline))
        if add_generation_prompt:
            header = self._headers["assistant"]
            input_ids += header
            labels += [IGNORE_INDEX] * len(header)

        ids = torch.tensor(input_ids, dtype=torch.long)
        lab = torch.tensor(labels, dtype=torch.long)
        lab[torch.isin(ids, self._image_ids)] = IGNORE_INDEX
        ids, lab = self._truncate(sid, ids, lab, add_generation_prompt)
        positions = v2pe_position_ids(ids, self.img_context_id, v2pe_deltas)
        return EncodedSample(sid, ids, lab, positions, list(num_tiles), pixel_values)

    def _truncate(
        self, sid: str, ids: torch.Tensor, labels: torch.Tensor, for_generation: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if ids.shape[0] > self.max_length:
            if for_generation:
                raise SampleError(
                    sid, "too_long", f"prompt has {ids.shape[0]} tokens, above max_length {self.max_length}"
                )
            image_positions = torch.nonzero(ids == self.img_end_id).flatten()
            if image_positions.numel() and int(image_positions.max()) >= self.max_length:
                raise SampleError(
                    sid,
                    "too_long",
                    f"{ids.shape[0]} tokens and truncating to max_length {self.max_length} would cut an image; "
                    "raise max_length or lower max_tiles",
                )
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        if not for_generation and not bool((labels != IGNORE_INDEX).any()):
            raise SampleError(
                sid, "too_long", f"no supervised token left within max_length {self.max_length}"
            )
        return ids, labels

    def training_deltas(self, num_images: int, rng: random.Random) -> list[float]:
        """V2PE δ per image for training, drawn from {1, 1/2, ..., 1/256}."""
        return sample_deltas(num_images, rng, TRAINING_DELTAS)
