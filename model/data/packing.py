"""Multimodal sequence packing (InternVL2.5-style): several samples per row, each with its own attention span.

`GreedyPacker` groups a stream of `EncodedSample`s into rows of at most `max_tokens` tokens and `max_tiles`
image tiles without splitting a sample (so never an image); `pack_rows` turns rows into a batch of rows all
exactly `max_tokens` long, padded only at the tail. Inside a row every sub-sample

* attends only to itself (block-diagonal causal attention): a 4-D mask for SDPA/eager, or `cu_seq_lens_*`
  for flash-attention varlen kernels (see `model_inputs`);
* keeps its own V2PE positions, which start at 0;
* has the label of its first token set to -100, so no token learns to predict the next sub-sample
  (`vlpipe.objectives.lm.lm_loss` relies on this), and its own `sample_index` for square averaging of the loss.

A model fed a packed batch therefore gives each sub-sample the logits it would get alone, and `lm_loss`
gives the loss and gradients of the same samples padded one per row.

The batch has the keys of `vlpipe.model.collate.collate_padded` (`input_ids`, `labels`, `attention_mask`,
`position_ids`, `sample_index`, `pixel_values`) plus `num_tiles`, `sample_ids`, `cu_seq_lens_q/k` and
`max_length_q/k`. Its `attention_mask` is 4-D, so pass the batch through `model_inputs`, not `**batch`.

Trap: transformers reads non-unit-step `position_ids` without an attention mask as packed sequences and
builds its own mask from them (wrongly, for V2PE's fractional steps). `model_inputs` always gives SDPA and
eager an explicit mask, and flash attention explicit `cu_seq_lens`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from vlpipe.model.conversation import IGNORE_INDEX, EncodedSample
from vlpipe.model.data.config import PackingConfig
from vlpipe.model.errors import SampleError

__all__ = [
    "GreedyPacker",
    "PackingConfig",
    "block_causal_mask",
    "model_inputs",
    "pack_rows",
    "packed_batches",
    "padded_utilisation",
    "token_utilisation",
]

Row = list[EncodedSample]
# The attention implementations `model_inputs` knows how to feed.
MASK_IMPLEMENTATIONS = ("sdpa", "eager")
VARLEN_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")
_STATE_VERSION = 1


class _OpenRow:
    """A row being filled, with running token and tile counts."""

    def __init__(self) -> None:
        self.samples: Row = []
        self.tokens = 0
        self.tiles = 0

    def add(self, sample: EncodedSample) -> None:
        self.samples.append(sample)
        self.tokens += len(sample)
        self.tiles += sum(sample.num_tiles)


class GreedyPacker:
    """Best-fit greedy packing of a sample stream into rows, with a bounded buffer of open rows.

    Policy (InternVL2.5-like), applied to each sample in arrival order:

    1. A sample with more than `max_tokens` tokens or more than `max_tiles` tiles cannot be packed: raise
       `SampleError(reason="too_long")` and change nothing (the caller quarantines and counts it).
    2. Among the open rows with room for the sample (tokens and tiles), put it into the one with the least
       free tokens left (best fit; ties go to the row opened first). If none has room, open a new row.
    3. A row left with fewer than `min_remaining` free tokens is emitted at once.
    4. If more than `buffer_size` rows are open, emit the fullest (most tokens; ties: opened first).

    `flush()` emits the open rows in the order they were opened. Samples keep their arrival order within a
    row. The packer is deterministic, and `state_dict()`/`load_state_dict()` carry the open rows over a
    restart, so a resumed stream yields exactly the rows of an uninterrupted one.

    Args:
        config: the packing limits.
    """

    def __init__(self, config: PackingConfig) -> None:
        self.config = config
        self._open: list[_OpenRow] = []  # in the order they were opened

    @property
    def num_open_rows(self) -> int:
        """Rows currently held in the buffer."""
        return len(self._open)

    def add(self, sample: EncodedSample) -> list[Row]:
        """Pack one sample.

        Args:
            sample: the next sample of the stream.

        Returns:
            The rows that became ready (possibly none), in the order they were completed.

        Raises:
            SampleError: reason `too_long` when the sample alone exceeds `max_tokens` or `max_tiles`.
        """
        cfg = self.config
        tokens, tiles = len(sample), sum(sample.num_tiles)
        if tokens > cfg.max_tokens or tiles > cfg.max_tiles:
            raise SampleError(
                sample.sample_id,
                "too_long",
                f"{tokens} tokens and {tiles} tiles do not fit a packed row of max_tokens={cfg.max_tokens}, "
                f"max_tiles={cfg.max_tiles}; raise max_tokens/max_tiles or lower max_dynamic_patch",
            )
        fitting = [
            row
            for row in self._open
            if row.tokens + tokens <= cfg.max_tokens and row.tiles + tiles <= cfg.max_tiles
        ]
        if fitting:
            # min() keeps the first of equal keys, i.e. the row opened first.
            target = min(fitting, key=lambda row: cfg.max_tokens - row.tokens)
        else:
            target = _OpenRow()
            self._open.append(target)
        target.add(sample)

        ready: list[Row] = []
        if cfg.max_tokens - target.tokens < cfg.min_remaining:
            ready.append(self._pop(target))
        if len(self._open) > cfg.buffer_size:
            fullest = max(self._open, key=lambda row: row.tokens)  # first of equals: opened first
            ready.append(self._pop(fullest))
        return ready

    def flush(self) -> list[Row]:
        """Emit every open row (end of the stream), in the order they were opened."""
        rows = [row.samples for row in self._open]
        self._open = []
        return rows

    def _pop(self, row: _OpenRow) -> Row:
        self._open.remove(row)
        return row.samples

    def _packing_limits(self) -> dict[str, int]:
        # The fields that decide which rows come out (rows_per_batch only groups them afterwards).
        return self.config.model_dump(include={"max_tokens", "max_tiles", "buffer_size", "min_remaining"})

    def state_dict(self) -> dict[str, Any]:
        """The open rows as plain dicts of tensors, strings and lists (loads with `torch.load(weights_only=True)`)."""
        return {
            "version": _STATE_VERSION,
            "config": self._packing_limits(),
            "rows": [[sample_to_dict(s) for s in row.samples] for row in self._open],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the open rows saved by `state_dict`.

        Raises:
            ValueError: when the state comes from another version or another packing config (a resumed
                stream would then differ from an uninterrupted one).
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"packer state version {state.get('version')!r}, expected {_STATE_VERSION}")
        if state.get("config") != self._packing_limits():
            raise ValueError(
                f"packer state was saved with packing config {state.get('config')}, but this packer uses "
                f"{self._packing_limits()}; resume with the same config or start without the packer state"
            )
        self._open = []
        for saved in state["rows"]:
            row = _OpenRow()
            for fields in saved:
                row.add(sample_from_dict(fields))
            self._open.append(row)


def sample_to_dict(sample: EncodedSample) -> dict[str, Any]:
    return {
        "sample_id": sample.sample_id,
        "input_ids": sample.input_ids,
        "labels": sample.labels,
        "position_ids": sample.position_ids,
        "num_tiles": list(sample.num_tiles),
        "pixel_values": sample.pixel_values,
    }


def sample_from_dict(fields: dict[str, Any]) -> EncodedSample:
    return EncodedSample(
        fields["sample_id"],
        fields["input_ids"],
        fields["labels"],
        fields["position_ids"],
        list(fields["num_tiles"]),
        fields["pixel_values"],
    )


def block_causal_mask(sample_index: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, L, L) mask, True = attend: causal within each run of equal `sample_index`.

    Padding (-1) forms its own block, so padding tokens attend to (earlier) padding and no row of the mask
    is empty; an empty row would make the softmax NaN.
    """
    length = sample_index.shape[1]
    same = sample_index[:, :, None] == sample_index[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=sample_index.device).tril()
    return (same & causal).unsqueeze(1)


def pack_rows(rows: Sequence[Row], max_tokens: int, pad_token_id: int) -> dict[str, Any]:
    """Build a packed batch: one row per entry of `rows`, each exactly `max_tokens` long.

    Args:
        rows: rows of samples (from `GreedyPacker`), each with at most `max_tokens` tokens in all.
        max_tokens: the row length; only each row's tail is padded.
        pad_token_id: id used for padding.

    Returns:
        `input_ids` (B, L) long; `labels` (B, L) long with -100 on padding and on the first token of every
        sub-sample; `position_ids` (B, L) float32, each sub-sample's own V2PE positions, 0 on padding;
        `sample_index` (B, L) long, 0, 1, 2... per sub-sample within its row, -1 on padding;
        `attention_mask` (B, 1, L, L) bool block-diagonal causal mask (True = attend, see
        `block_causal_mask`); `pixel_values` (all tiles in token order, only when a sample has images);
        `num_tiles` (tiles per image in token order); `sample_ids` (ids per row); and for flash-attention
        varlen `cu_seq_lens_q`/`cu_seq_lens_k` (int32 cumulative lengths of every sub-sample of every row,
        flattened row after row, each row's tail padding a segment of its own) and `max_length_q`/
        `max_length_k` (int, longest segment).

    Raises:
        ValueError: on an empty batch or row, a row longer than `max_tokens`, or samples whose images lack
            `pixel_values` while others have them.
    """
    if not rows:
        raise ValueError("cannot pack an empty list of rows")
    batch = len(rows)
    input_ids = torch.full((batch, max_tokens), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, max_tokens), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((batch, max_tokens), dtype=torch.float32)
    sample_index = torch.full((batch, max_tokens), -1, dtype=torch.long)
    segments: list[int] = []
    tiles: list[torch.Tensor] = []
    num_tiles: list[int] = []
    missing_pixels: list[str] = []
    for r, row in enumerate(rows):
        if not row:
            raise ValueError(f"row {r} is empty")
        used = sum(len(s) for s in row)
        if used > max_tokens:
            raise ValueError(f"row {r} has {used} tokens, above max_tokens {max_tokens}")
        cursor = 0
        for i, sample in enumerate(row):
            n = len(sample)
            cols = slice(cursor, cursor + n)
            input_ids[r, cols] = sample.input_ids
            labels[r, cols] = sample.labels
            labels[r, cursor] = IGNORE_INDEX  # nothing may be trained to predict a sub-sample's first token
            position_ids[r, cols] = sample.position_ids
            sample_index[r, cols] = i
            segments.append(n)
            cursor += n
            num_tiles += sample.num_tiles
            if sample.pixel_values is not None:
                tiles.append(sample.pixel_values)
            elif sum(sample.num_tiles):
                missing_pixels.append(sample.sample_id)
        if cursor < max_tokens:
            segments.append(max_tokens - cursor)
    out: dict[str, Any] = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": block_causal_mask(sample_index),
        "position_ids": position_ids,
        "sample_index": sample_index,
        "num_tiles": num_tiles,
        "sample_ids": [[s.sample_id for s in row] for row in rows],
    }
    if tiles:
        if missing_pixels:
            raise ValueError(f"samples {missing_pixels} have images but no pixel_values, unlike the others")
        out["pixel_values"] = torch.cat(tiles)
    cu_seq_lens = torch.zeros(len(segments) + 1, dtype=torch.int32)
    cu_seq_lens[1:] = torch.cumsum(torch.tensor(segments, dtype=torch.int32), 0)
    out["cu_seq_lens_q"] = cu_seq_lens
    out["cu_seq_lens_k"] = cu_seq_lens.clone()
    out["max_length_q"] = out["max_length_k"] = max(segments)
    return out


def model_inputs(
    batch: dict[str, Any], attn_implementation: str, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """The keyword arguments for `InternVLForConditionalGeneration.forward` on a packed or padded batch.

    Args:
        batch: from `pack_rows` (4-D mask) or `vlpipe.model.collate.collate_padded` (2-D mask, passed through).
        attn_implementation: the model's `config._attn_implementation`.
        dtype: the model's compute dtype; eager attention adds the mask to its scores in this dtype.

    Returns:
        `input_ids`, `position_ids`, `pixel_values` (when present) and, for a packed batch: with "sdpa" the
        boolean 4-D mask (SDPA takes True = attend); with "eager" the same mask as additive floats
        (0 = attend, dtype min = masked; eager *adds* the mask, so a boolean one would be wrong); with
        "flash_attention_2/3" no mask but `cu_seq_lens_q/k` and `max_length_q/k` for the varlen kernel.

    Raises:
        ValueError: for another attention implementation with a packed batch.
    """
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if "pixel_values" in batch:
        kwargs["pixel_values"] = batch["pixel_values"]
    mask = batch["attention_mask"]
    if mask.dim() == 2 or attn_implementation == "sdpa":
        kwargs["attention_mask"] = mask
    elif attn_implementation == "eager":
        additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        kwargs["attention_mask"] = additive.masked_fill(~mask, torch.finfo(dtype).min)
    elif attn_implementation in VARLEN_IMPLEMENTATIONS:
        for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
            kwargs[key] = batch[key]
    else:
        raise ValueError(
            f"packed batches support attn_implementation in {MASK_IMPLEMENTATIONS + VARLEN_IMPLEMENTATIONS}; "
            f"got {attn_implementation!r}"
        )
    return kwargs


def packed_batches(
    samples: Iterable[EncodedSample],
    config: PackingConfig,
    pad_token_id: int,
    skipped: Counter[str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Pack a finite sample stream into batches of `config.rows_per_batch` rows (the last may hold fewer).

    Not checkpointable by itself: a resumable loader drives a `GreedyPacker` and saves its state.

    Args:
        samples: the sample stream.
        config: packing limits.
        pad_token_id: id used for padding.
        skipped: when given, samples that cannot be packed are counted here by reason instead of raising.

    Yields:
        Batches from `pack_rows`.

    Raises:
        SampleError: for a sample that cannot be packed, when `skipped` is None.
    """
    packer = GreedyPacker(config)
    pending: list[Row] = []
    for sample in samples:
        try:
            pending += packer.add(sample)
        except SampleError as err:
            if skipped is None:
                raise
            skipped[err.reason] += 1
        while len(pending) >= config.rows_per_batch:
            yield pack_rows(pending[: config.rows_per_batch], config.max_tokens, pad_token_id)
            pending = pending[config.rows_per_batch :]
    pending += packer.flush()
    for start in range(0, len(pending), config.rows_per_batch):
        yield pack_rows(pending[start : start + config.rows_per_batch], config.max_tokens, pad_token_id)


def token_utilisation(batch: dict[str, Any]) -> float:
    """Share of real (non-padding) tokens in a packed or padded batch."""
    index = batch["sample_index"]
    return float((index >= 0).sum()) / index.numel()


def padded_utilisation(samples: Sequence[EncodedSample], batch_size: int) -> float:
    """Token utilisation of the baseline without packing: consecutive batches of `batch_size` samples, one
    sample per row, each batch padded to its longest sample (as `collate_padded` does)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lengths = [len(s) for s in samples]
    if not lengths:
        raise ValueError("no samples")
    total = 0
    for start in range(0, len(lengths), batch_size):
        chunk = lengths[start : start + batch_size]
        total += max(chunk) * len(chunk)
    return sum(lengths) / total
