"""Generation with a KV cache that keeps V2PE positions, batched, streamable, one random generator per row.

`GenerationEngine` is the decoding loop `generate` and the predictor's batcher share. It is built on the model's
own forward and transformers' `DynamicCache`; what transformers lacks is written here:

- V2PE: a prompt keeps its float V2PE position ids (from the encoded sample); every new token sits at the
  previous position + 1 (what transformers' `generate` does with float `position_ids`).
- Rows join and leave between decode steps (continuous batching): new prompts are prefilled as one
  left-padded batch and their cache rows are merged into the running cache (left-padded to a common length,
  padding masked out); finished or cancelled rows are dropped from the cache, and cache columns that only hold
  padding of rows that left are trimmed, so a cancelled row stops costing compute.
- Prompts are prefilled once: N rows that sample the same prompt (Best-of-N, `n`, evaluation's samples) share
  one vision-encoder pass and one prefill, whose cache row is copied to the N rows (`share_prompts=True`).
  Identical prompts are recognised by identity (the same `EncodedSample` object, as `[prompt] * n` gives).
- Sampling: each row has its own `torch.Generator`, seeded from the row's seed (`row_seed(seed, index)`: the
  request seed and the row's sample index), so a row's samples do not depend on its batch companions.
  Greedy rows take the arg-max. Temperature and top-p are applied as transformers' logits warpers do.

Greedy answers equal a one-at-a-time run up to CPU float noise (batch shape changes the summation order).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, InternVLForConditionalGeneration

from vlpipe.model.collate import collate_padded
from vlpipe.model.conversation import EncodedSample

# Sampling settings `generate` accepts. Below MIN_TEMPERATURE the logits divided by the temperature overflow
# (1e-45 gives inf, then NaN probabilities); the seed range is what torch.manual_seed takes.
MIN_TEMPERATURE = 1e-3
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1


def check_sampling(temperature: float, top_p: float, seed: int | None) -> None:
    """Refuse sampling settings that would overflow or fail inside generation.

    Raises:
        ValueError: for a temperature that is neither 0 nor a finite number >= MIN_TEMPERATURE, a top_p outside
            (0, 1], or a seed outside [SEED_MIN, SEED_MAX].
    """
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature < float("inf")):
        raise ValueError(f"temperature must be 0 (greedy) or a finite number of at least {MIN_TEMPERATURE}")
    if not 0 < top_p <= 1:
        raise ValueError("top_p must be in (0, 1]")
    if seed is not None and (isinstance(seed, bool) or not SEED_MIN <= seed <= SEED_MAX):
        raise ValueError(f"seed must be an integer from {SEED_MIN} to {SEED_MAX}")


def row_seed(seed: int | None, index: int) -> int:
    """The seed of sample `index` of a request seeded with `seed` (a fresh draw from torch's global RNG when
    `seed` is None): a 63-bit hash of both, so neighbouring rows get unrelated streams."""
    if seed is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass(frozen=True)
class SamplingParams:
    """How one row is decoded.

    Attributes:
        max_new_tokens: length cap of the answer (at least 1).
        temperature: 0 for greedy decoding, else at least MIN_TEMPERATURE.
        top_p: nucleus mass kept when sampling.
        seed: the row's own seed (see `row_seed`); None draws one from torch's global RNG.
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        check_sampling(self.temperature, self.top_p if self.temperature > 0 else 1.0, self.seed)


def row_params(
    count: int, max_new_tokens: int, temperature: float, top_p: float, seed: int | None
) -> list[SamplingParams]:
    """The sampling settings of a request's `count` rows: greedy at temperature 0, else row i samples with
    `row_seed(seed, i)`, whatever other requests share the batch.

    Raises:
        ValueError: settings `check_sampling` refuses.
    """
    sample = temperature > 0
    check_sampling(temperature, top_p if sample else 1.0, seed if sample else None)
    return [
        SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature if sample else 0.0,
            top_p=top_p if sample else 1.0,
            seed=row_seed(seed, i) if sample else 0,
        )
        for i in range(count)
    ]


@dataclass(eq=False)
class Row:
    """One answer being generated. `tokens` grows as the engine steps (the end token is not included);
    `finish_reason` is `stop` (end token), `length` (max_new_tokens) or `cancelled` once the row is done."""

    prompt: EncodedSample
    params: SamplingParams
    on_token: Callable[[Row, int], None] | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    cancelled: bool = False

    @property
    def done(self) -> bool:
        """Whether the row has finished (or was cancelled)."""
        return self.finish_reason is not None


class GenerationEngine:
    """A running batch of rows sharing one KV cache (see the module docstring).

    Not thread-safe: one thread calls `add`, `step` and reads rows; `Row.cancelled` may be set from any thread
    (the engine drops the row at its next step).

    Args:
        model: the VLM (eval mode; its device and dtype are used).
        eos_token_id: the end token (`<|im_end|>`).
        pad_token_id: the padding id of prefill batches.
        share_prompts: prefill each distinct prompt once and copy its cache to the rows that sample it
            (False: one prefill per row, as a baseline).
    """

    def __init__(
        self,
        model: InternVLForConditionalGeneration,
        *,
        eos_token_id: int,
        pad_token_id: int,
        share_prompts: bool = True,
    ) -> None:
        self.model = model
        self.eos_token_id = int(eos_token_id)
        self.pad_token_id = int(pad_token_id)
        self.share_prompts = share_prompts
        self.device = next(model.parameters()).device
        self.rows: list[Row] = []  # the rows in the cache, in cache order
        self.pending: list[Row] = []  # rows added since the last step
        self._cache: DynamicCache | None = None
        self._mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self._last_pos = torch.zeros(0, dtype=torch.float32, device=self.device)
        self._logits: torch.Tensor | None = None  # next-token logits of every row in the cache
        self.prefill_prompts = 0  # prompts run through prefill (and the vision encoder): a work counter

    # -- rows ----------------------------------------------------------------------------------------------------
    def add(
        self,
        prompt: EncodedSample,
        params: Sequence[SamplingParams],
        on_token: Callable[[Row, int], None] | None = None,
    ) -> list[Row]:
        """Queue one row per `params` entry, all answering `prompt`; they join the batch at the next `step`.

        Returns:
            The rows, in `params` order.
        """
        rows = [Row(prompt, p, on_token) for p in params]
        for row in rows:
            row.generator = torch.Generator(device=self.device)
            seed = row.params.seed if row.params.seed is not None else row_seed(None, 0)
            row.generator.manual_seed(seed % 2**64)
        self.pending.extend(rows)
        return rows

    @property
    def active(self) -> int:
        """Rows in the batch or waiting to join it."""
        return len(self.rows) + len(self.pending)

    def context_length(self) -> int:
        """Columns of the running KV cache (the longest row's prompt + answer, padded)."""
        return int(self._mask.shape[1])

    # -- the loop ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[tuple[Row, int | None]]:
        """Admit pending rows, pick one token per row, retire finished rows and run one decode step.

        Returns:
            (row, token) per row that produced a token this step, and (row, None) for each row that finished
            without one (end token, or cancelled). A row's `on_token` is called for each of its tokens.
        """
        events: list[tuple[Row, int | None]] = []
        for row in [r for r in self.pending if r.cancelled]:  # cancelled before they joined: no prefill
            row.finish_reason = "cancelled"
            self.pending.remove(row)
            events.append((row, None))
        if self.pending:
            self._admit()
        if not self.rows:
            return events
        assert self._logits is not None
        tokens = self._sample(self._logits)
        keep: list[int] = []
        for i, (row, token) in enumerate(zip(self.rows, tokens, strict=True)):
            if row.cancelled:
                row.finish_reason = "cancelled"
                events.append((row, None))
                continue
            if token == self.eos_token_id:
                row.finish_reason = "stop"
                events.append((row, None))
                continue
            row.tokens.append(token)
            events.append((row, token))
            if row.on_token is not None:
                row.on_token(row, token)
            if len(row.tokens) >= row.params.max_new_tokens:
                row.finish_reason = "length"
                continue
            keep.append(i)
        if len(keep) < len(self.rows):
            self._select(keep)
        if self.rows:
            ids = torch.tensor([tokens[i] for i in keep], dtype=torch.long, device=self.device)
            self._decode(ids)
        return events

    def run(self) -> Iterator[list[tuple[Row, int | None]]]:
        """`step` until every row is done; yields each step's events (a stream of new tokens per row)."""
        while self.active:
            yield self.step()

    # -- internals ---------------------------------------------------------------------------------------------------
    def _admit(self) -> None:
        """Prefill the pending rows' distinct prompts in one left-padded batch and merge them into the cache."""
        rows, self.pending = self.pending, []
        prompts: list[EncodedSample] = []
        index: dict[int, int] = {}
        which: list[int] = []
        for row in rows:
            key = id(row.prompt) if self.share_prompts else id(row)
            if key not in index:
                index[key] = len(prompts)
                prompts.append(row.prompt)
            which.append(index[key])
        batch = collate_padded(prompts, self.pad_token_id, padding_side="left")
        cache = DynamicCache()
        kwargs = {}
        if "pixel_values" in batch:
            kwargs["pixel_values"] = batch["pixel_values"].to(self.device, dtype=self.model.dtype)
        mask = batch["attention_mask"].to(self.device)
        positions = batch["position_ids"].to(self.device)
        out = self.model(
            input_ids=batch["input_ids"].to(self.device),
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            **kwargs,
        )
        self.prefill_prompts += len(prompts)
        logits = out.logits[:, -1, :].float()
        select = torch.tensor(which, dtype=torch.long, device=self.device)
        if len(prompts) != len(rows) or which != list(range(len(rows))):
            cache.batch_select_indices(select)  # copies each prompt's cache row to the rows that sample it
        self._merge(rows, cache, mask[select], positions[select, -1], logits[select])

    def _merge(
        self,
        rows: list[Row],
        cache: DynamicCache,
        mask: torch.Tensor,
        last: torch.Tensor,
        logits: torch.Tensor,
    ) -> None:
        if self._cache is None or not self.rows:
            self._cache, self._mask, self._last_pos, self._logits = cache, mask, last, logits
            self.rows = list(rows)
            return
        width = max(self._mask.shape[1], mask.shape[1])
        old_pad, new_pad = width - self._mask.shape[1], width - mask.shape[1]
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_pad_left(old.keys, old_pad), _pad_left(new.keys, new_pad)])
            old.values = torch.cat([_pad_left(old.values, old_pad), _pad_left(new.values, new_pad)])
        self._mask = torch.cat([_pad_left(self._mask, old_pad), _pad_left(mask, new_pad)])
        self._last_pos = torch.cat([self._last_pos, last])
        assert self._logits is not None
        self._logits = torch.cat([self._logits, logits])
        self.rows.extend(rows)

    def _select(self, keep: list[int]) -> None:
        """Keep only the rows at `keep`; trim cache columns that are padding in every remaining row."""
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self._cache, self._logits = None, None
            self._mask = self._mask[:0, :0]
            self._last_pos = self._last_pos[:0]
            return
        assert self._cache is not None
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        self._last_pos = self._last_pos[index]
        start = int(self._mask.any(dim=0).int().argmax())  # first column some row attends to
        if start > 0:
            self._mask = self._mask[:, start:]
            for layer in self._cache.layers:
                layer.keys = layer.keys[:, :, start:]
                layer.values = layer.values[:, :, start:]

    def _decode(self, ids: torch.Tensor) -> None:
        ones = torch.ones((len(ids), 1), dtype=self._mask.dtype, device=self.device)
        self._mask = torch.cat([self._mask, ones], dim=1)
        self._last_pos = self._last_pos + 1
        out = self.model(
            input_ids=ids[:, None],
            attention_mask=self._mask,
            position_ids=self._last_pos[:, None],
            past_key_values=self._cache,
            use_cache=True,
        )
        self._logits = out.logits[:, -1, :].float()

    def _sample(self, logits: torch.Tensor) -> list[int]:
        tokens = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(self.rows):
            p = row.params
            if p.temperature == 0 or row.cancelled:
                continue
            scores = logits[i] / p.temperature
            if p.top_p < 1.0:  # transformers' TopPLogitsWarper: drop the low tail of mass 1 - top_p
                ordered, order = torch.sort(scores)
                cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
                remove = cumulative <= 1 - p.top_p
                remove[-1] = False
                scores = scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))
            probs = scores.softmax(dim=-1)
            tokens[i] = int(torch.multinomial(probs, 1, generator=row.generator).item())
        return tokens


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros prepended along the sequence axis (dim 1 of a mask, dim 2 of a cache tensor)."""
    if width == 0:
        return tensor
    dim = 1 if tensor.dim() == 2 else 2
    shape = list(tensor.shape)
    shape[dim] = width
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


@torch.no_grad()
def generate(
    model: InternVLForConditionalGeneration,
    prompts: Sequence[EncodedSample],
    *,
    eos_token_id: int,
    pad_token_id: int,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 1.0,
    seed: int | None = None,
    seeds: Sequence[int] | None = None,
    share_prompts: bool = True,
) -> list[list[int]]:
    """Generate a continuation for each prompt (one row per prompt; repeat a prompt to sample it N times).

    Args:
        model: the VLM.
        prompts: samples encoded with `add_generation_prompt=True`, with their `pixel_values`. Repeating the
            same object (`[prompt] * n`) prefills it once (see `share_prompts`).
        eos_token_id: stop token (`<|im_end|>`).
        pad_token_id: padding id.
        max_new_tokens: length cap of each answer.
        do_sample: sample instead of greedy decoding.
        temperature, top_p: sampling settings.
        seed: row i samples with its own generator seeded `row_seed(seed, i)`; sampling does not touch the
            global RNG state (except to draw seeds when `seed` is None).
        seeds: explicit per-row seeds instead (one per prompt).
        share_prompts: prefill each distinct prompt object once (False: once per row; same results).

    Returns:
        The new token ids of each row, without the prompt, cut before the first `eos_token_id`.

    Raises:
        ValueError: for sampling settings `check_sampling` refuses, or a `seeds` list of the wrong length
            (checked before any work).
    """
    check_sampling(temperature if do_sample else 0.0, top_p if do_sample else 1.0, seed)
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; pass one per prompt")
    for s in seeds or ():
        check_sampling(0.0, 1.0, s)
    if not prompts:
        raise ValueError("cannot generate for an empty batch")
    engine = GenerationEngine(
        model, eos_token_id=eos_token_id, pad_token_id=pad_token_id, share_prompts=share_prompts
    )
    params = row_params(len(prompts), max_new_tokens, temperature if do_sample else 0.0, top_p, seed)
    if seeds is not None:
        params = [dataclasses.replace(p, seed=s) for p, s in zip(params, seeds, strict=True)]
    rows = [row for prompt, p in zip(prompts, params, strict=True) for row in engine.add(prompt, [p])]
    for _ in engine.run():
        pass
    return [row.tokens for row in rows]
