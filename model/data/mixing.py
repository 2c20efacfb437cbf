"""A seeded, deterministic, checkpointable stream that mixes datasets at a target *token* ratio.

Native multimodal pre-training mixes pure-text and image-text data; InternVL3 found 1 language token to 3
multimodal tokens best. Each dataset gets a target share of tokens: by default the language group gets
L/(L+M) and the multimodal group M/(L+M), split inside a group in proportion to each dataset's tokens per
epoch (size × repeat_time × mean tokens). Explicit per-dataset `weights` override that. A deficit controller
then picks, at every step, the dataset furthest below its target share (by estimated tokens), so the achieved
ratio follows the target closely and deterministically. Inside a dataset, samples come in a seeded
permutation per epoch (fractional `repeat_time` takes a seeded subset, >1 repeats).

The stream is global: rank r of a data-parallel group of size W takes global items r, r+W, r+2W, ... (no
overlap, no gap). Its whole state is a few counters (`state_dict`), so a resumed stream yields exactly the
items an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from vlpipe.model.data.meta import Dataset


class MixtureConfig(BaseModel):
    """How to mix the datasets of a meta file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    language_ratio: float = Field(default=1.0, ge=0, description="Language-only part of the token ratio.")
    multimodal_ratio: float = Field(default=3.0, ge=0, description="Multimodal part of the token ratio.")
    weights: dict[str, float] | None = Field(
        default=None, description="Per-dataset token shares; when given they replace the ratio."
    )
    seed: int = 0
    estimate_samples: int = Field(
        default=256, ge=1, description="Samples per dataset used to estimate tokens."
    )
    max_bad_fraction: float = Field(default=0.05, ge=0, le=1)

    @model_validator(mode="after")
    def _check(self) -> MixtureConfig:
        if self.language_ratio + self.multimodal_ratio <= 0:
            raise ValueError("language_ratio + multimodal_ratio must be positive")
        if self.weights is not None:
            bad = {k: v for k, v in self.weights.items() if not (v >= 0 and math.isfinite(v))}
            if bad or not any(v > 0 for v in self.weights.values()):
                raise ValueError(f"weights must be finite, >= 0 and not all zero; got {self.weights}")
        return self

    @property
    def target_language_share(self) -> float:
        return self.language_ratio / (self.language_ratio + self.multimodal_ratio)


@dataclass(frozen=True)
class MixItem:
    """One element of the stream."""

    index: int  # global position in the stream
    dataset: str
    record_index: int  # index into the dataset's records
    epoch: int


def epoch_order(n: int, repeat_time: float, seed: int, name: str, epoch: int) -> np.ndarray:
    """The record indices of one epoch of a dataset: floor(repeat_time) full copies plus a seeded subset of
    round(frac · n) records, shuffled by a generator seeded with (seed, name, epoch).

    A numpy array (4 bytes per entry below 2**31 records), not a list: at 10M records a list of ints would
    cost ~360 MB per rank.
    """
    key = hashlib.sha256(f"vlpipe-mix:{seed}:{name}:{epoch}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
    whole, frac = divmod(repeat_time, 1.0)
    dtype = np.int32 if n < 2**31 else np.int64
    parts = [np.tile(np.arange(n, dtype=dtype), int(whole))]
    subset = round(frac * n)
    if subset:
        parts.append(rng.choice(n, size=subset, replace=False).astype(dtype))
    order = np.concatenate(parts)
    rng.shuffle(order)
    return order


class MixedStream:
    """The mixture as an endless, deterministic stream of `MixItem`s for one data-parallel rank.

    Args:
        datasets: the datasets (records already read; see `vlpipe.model.data.meta.read_dataset`).
        config: ratio/weights and seed.
        estimate_tokens: tokens of record i of a dataset (text + image tokens; 0 for a bad record); called on a
            seeded sample of each dataset once, to estimate its mean tokens per sample.
        rank, world_size: this process's data-parallel rank and group size.

    Raises:
        ValueError: unknown dataset names in `weights`, empty datasets, or a ratio that asks for a group
            with no dataset.
    """

    def __init__(
        self,
        datasets: list[Dataset],
        config: MixtureConfig,
        estimate_tokens: Callable[[Dataset, int], int],
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        empty = [d.name for d in datasets if not len(d)]
        if empty:
            raise ValueError(
                f"datasets {empty} have no valid records; fix them or remove them from the meta file"
            )
        self.datasets = {d.name: d for d in datasets}
        self.names = [d.name for d in datasets]
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.mean_tokens = {d.name: self._estimate(d, estimate_tokens) for d in datasets}
        self.target_share = self._target_shares()
        self._orders: dict[tuple[str, int], np.ndarray] = {}
        self._reset()

    # -- setup ----------------------------------------------------------------------------------------------
    def _estimate(self, dataset: Dataset, estimate_tokens: Callable[[Dataset, int], int]) -> float:
        rng = random.Random(f"vlpipe-estimate:{self.config.seed}:{dataset.name}")
        n = len(dataset)
        picks = rng.sample(range(n), min(n, self.config.estimate_samples))
        return sum(estimate_tokens(dataset, i) for i in picks) / len(picks)

    def _epoch_tokens(self, name: str) -> float:
        d = self.datasets[name]
        return len(d) * d.spec.repeat_time * self.mean_tokens[name]

    def _target_shares(self) -> dict[str, float]:
        cfg = self.config
        if cfg.weights is not None:
            unknown = sorted(set(cfg.weights) - set(self.names))
            if unknown:
                raise ValueError(f"weights name unknown datasets {unknown}; known: {self.names}")
            total = sum(cfg.weights.get(n, 0.0) for n in self.names)
            return {n: cfg.weights.get(n, 0.0) / total for n in self.names}
        groups = {
            "language": [n for n in self.names if not self.datasets[n].is_multimodal],
            "multimodal": [n for n in self.names if self.datasets[n].is_multimodal],
        }
        group_share = {"language": cfg.target_language_share, "multimodal": 1 - cfg.target_language_share}
        for group, members in groups.items():
            if group_share[group] > 0 and not members:
                other = "multimodal" if group == "language" else "language"
                if not groups[other]:
                    raise ValueError("no datasets to mix")
                raise ValueError(
                    f"the ratio asks for {group} tokens ({group_share[group]:.0%}) but the meta file has no "
                    f"{group} dataset; add one or set {group}_ratio: 0"
                )
        shares = {}
        for group, members in groups.items():
            total = sum(self._epoch_tokens(n) for n in members)
            for n in members:
                shares[n] = group_share[group] * self._epoch_tokens(n) / total if total else 0.0
        return shares

    def _reset(self) -> None:
        self.index = 0
        self.tokens = {n: 0.0 for n in self.names}
        self.cursor = {n: (0, 0) for n in self.names}  # (epoch, position in epoch order)

    # -- the stream -----------------------------------------------------------------------------------------
    def _order(self, name: str, epoch: int) -> np.ndarray:
        key = (name, epoch)
        if key not in self._orders:
            d = self.datasets[name]
            self._orders = {
                k: v for k, v in self._orders.items() if k[0] != name
            }  # keep one epoch per dataset
            self._orders[key] = epoch_order(len(d), d.spec.repeat_time, self.config.seed, name, epoch)
        return self._orders[key]

    def _next_global(self) -> MixItem:
        total = sum(self.tokens.values())
        # Deficit controller: the dataset furthest below its target share of the tokens emitted so far
        # (after this sample), ties broken by meta-file order.
        name = max(
            (n for n in self.names if self.target_share[n] > 0),
            key=lambda n: self.target_share[n] * (total + self.mean_tokens[n]) - self.tokens[n],
        )
        epoch, pos = self.cursor[name]
        order = self._order(name, epoch)
        while pos >= len(order):  # a tiny fractional repeat_time can give an empty epoch
            epoch, pos = epoch + 1, 0
            order = self._order(name, epoch)
        item = MixItem(self.index, name, int(order[pos]), epoch)
        self.cursor[name] = (epoch, pos + 1)
        self.tokens[name] += self.mean_tokens[name]
        self.index += 1
        return item

    def __iter__(self) -> Iterator[MixItem]:
        while True:
            item = self._next_global()
            if item.index % self.world_size == self.rank:
                yield item

    def take(self, n: int) -> list[MixItem]:
        """The next `n` items of this rank."""
        it = iter(self)
        return [next(it) for _ in range(n)]

    # -- checkpointing --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Counters that fully determine the rest of the stream (JSON-serialisable)."""
        return {
            "index": self.index,
            "tokens": dict(self.tokens),
            "cursor": {n: list(c) for n, c in self.cursor.items()},
            "seed": self.config.seed,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state saved by `state_dict` (same datasets, seed and world size).

        Raises:
            ValueError: when the state belongs to another mixture.
        """
        if state["seed"] != self.config.seed or state["world_size"] != self.world_size:
            raise ValueError(
                "stream state was saved with another seed or world size; resume with the same ones"
            )
        if set(state["tokens"]) != set(self.names):
            raise ValueError(
                f"stream state names datasets {sorted(state['tokens'])}, this mixture has {self.names}"
            )
        self.index = int(state["index"])
        self.tokens = {n: float(v) for n, v in state["tokens"].items()}
        self.cursor = {n: (int(c[0]), int(c[1])) for n, c in state["cursor"].items()}


@dataclass
class MixtureStats:
    """What the mixture actually produced (real token counts of encoded samples)."""

    samples: dict[str, int]
    tokens: dict[str, int]

    @classmethod
    def empty(cls, names: list[str]) -> MixtureStats:
        return cls({n: 0 for n in names}, {n: 0 for n in names})

    def add(self, dataset: str, num_tokens: int) -> None:
        self.samples[dataset] += 1
        self.tokens[dataset] += num_tokens

    def language_share(self, multimodal: dict[str, bool]) -> float:
        """Achieved share of language-only tokens."""
        total = sum(self.tokens.values())
        return sum(t for n, t in self.tokens.items() if not multimodal[n]) / total if total else 0.0
