"""The optimizer-step loop shared by every stage, the resumable batch sources, and progress reporting.

A stage supplies a batch source (`PackedSource`, `PaddedSource` or `IndexSource`) and a step function that
runs forward/backward/`engine.step()` over one optimizer step's micro-batches and returns that step's metrics,
already reduced over ranks. `train_loop` adds lr, grad norm, tokens/s, MFU (GPU) and memory, logs every step
to MLflow and to `<work_dir>/metrics.jsonl`, shows progress, and writes periodic checkpoints.
"""

from __future__ import annotations

import json
import logging
import random
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from components.training.runtime import DistInfo, Engine, peak_flops, rng_state
from components.training.state import save_training_state
from components.training.tracking import Tracker
from model.collate import collate_padded
from model.conversation import EncodedSample
from model.data.config import PackingConfig
from model.data.packing import GreedyPacker, Row, _sample_from_dict, _sample_to_dict, pack_rows
from model.errors import SampleError

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"


# -- batch sources ------------------------------------------------------------------------------------------
class PackedSource:
    """Packed micro-batches (`model.data.packing`) from an endless, resumable sample stream.

    Args:
        loader: a `MixtureLoader` (iterable of `EncodedSample`, with `state_dict`/`load_state_dict`).
        packing: the packing settings.
        rows_per_micro_batch: packed rows per micro-batch (the trainer's `micro_batch_size`).
        pad_token_id: padding id.
    """

    def __init__(
        self, loader: Any, packing: PackingConfig, rows_per_micro_batch: int, pad_token_id: int
    ) -> None:
        self.loader = loader
        self.packing = packing
        self.rows = rows_per_micro_batch
        self.pad_token_id = pad_token_id
        self.packer = GreedyPacker(packing)
        self.pending: list[Row] = []
        self.unpackable: Counter[str] = Counter()
        self._samples: Iterator[EncodedSample] = iter(loader)

    def next(self, n: int) -> list[dict[str, Any]]:
        """The next `n` micro-batches."""
        need = n * self.rows
        while len(self.pending) < need:
            sample = next(self._samples)
            try:
                self.pending += self.packer.add(sample)
            except SampleError as err:  # e.g. more tiles than max_tiles: counted, reported in the manifest
                self.unpackable[err.reason] += 1
        rows, self.pending = self.pending[:need], self.pending[need:]
        per = self.rows
        return [
            pack_rows(rows[i : i + per], self.packing.max_tokens, self.pad_token_id)
            for i in range(0, need, per)
        ]

    def state_dict(self) -> dict[str, Any]:
        return {
            "loader": self.loader.state_dict(),
            "packer": self.packer.state_dict(),
            "pending": [[_sample_to_dict(s) for s in row] for row in self.pending],
            "unpackable": dict(self.unpackable),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])
        self.packer.load_state_dict(state["packer"])
        self.pending = [[_sample_from_dict(s) for s in row] for row in state["pending"]]
        self.unpackable = Counter(state["unpackable"])
        self._samples = iter(self.loader)


class PaddedSource:
    """Micro-batches of `micro_batch_size` samples, each row one sample padded to the batch's longest.

    Args:
        loader: a `MixtureLoader`.
        micro_batch_size: samples per micro-batch.
        pad_token_id: padding id.
    """

    def __init__(self, loader: Any, micro_batch_size: int, pad_token_id: int) -> None:
        self.loader = loader
        self.micro_batch_size = micro_batch_size
        self.pad_token_id = pad_token_id
        self._samples: Iterator[EncodedSample] = iter(loader)

    def next(self, n: int) -> list[dict[str, Any]]:
        """The next `n` micro-batches."""
        return [
            collate_padded([next(self._samples) for _ in range(self.micro_batch_size)], self.pad_token_id)
            for _ in range(n)
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])
        self._samples = iter(self.loader)


class IndexSource:
    """Record indices of a fixed-size dataset: a seeded permutation per epoch, sharded r, r+W, ... .

    The global stream is epoch 0's permutation, then epoch 1's, and so on; rank r takes global positions
    r, r + W, r + 2W, ..., so ranks never overlap and a resumed source continues exactly.

    Args:
        size: number of records (> 0).
        micro_batch_size: indices per micro-batch.
        seed: permutation seed.
        info: this rank.
    """

    def __init__(self, size: int, micro_batch_size: int, seed: int, info: DistInfo) -> None:
        if size <= 0:
            raise ValueError("the dataset has no usable records")
        self.size = size
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.rank, self.world_size = info.rank, info.world_size
        self.taken = 0  # indices this rank has taken
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            self._orders = {
                epoch: random.Random(f"vlpipe-records:{self.seed}:{epoch}").sample(
                    range(self.size), self.size
                )
            }
        return self._orders[epoch]

    def _take(self) -> int:
        position = self.rank + self.world_size * self.taken
        self.taken += 1
        epoch, offset = divmod(position, self.size)
        return self._order(epoch)[offset]

    def next(self, n: int) -> list[list[int]]:
        """The next `n` micro-batches of record indices."""
        return [[self._take() for _ in range(self.micro_batch_size)] for _ in range(n)]

    def state_dict(self) -> dict[str, Any]:
        return {"taken": self.taken, "size": self.size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["size"] != self.size or state["seed"] != self.seed:
            raise ValueError(
                f"the checkpoint's record stream had {state['size']} records and seed {state['seed']}; "
                f"this run has {self.size} and {self.seed}: the data changed, start a new run"
            )
        self.taken = int(state["taken"])


# -- progress -----------------------------------------------------------------------------------------------
class Progress:
    """A rich progress bar with loss and tokens/s on a terminal; plain log lines every `every` steps else."""

    def __init__(self, stage: str, total: int, start: int, every: int, enabled: bool) -> None:
        self.stage, self.total, self.every, self.enabled = stage, total, every, enabled
        self.interactive = enabled and sys.stderr.isatty()
        self._bar = None
        if self.interactive:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn(f"[bold]{stage}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
            )
            self._task = self._bar.add_task(stage, total=total, completed=start, info="")
            self._bar.start()

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        info = f"loss {metrics['loss']:.4f}  {metrics.get('tokens_per_s', 0):,.0f} tok/s"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        elif step % self.every == 0 or step == self.total:
            log.info("%s step %d/%d  %s  lr %.3g", self.stage, step, self.total, info, metrics.get("lr", 0))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


# -- the loop -----------------------------------------------------------------------------------------------
StepFn = Callable[[list[Any]], dict[str, float]]


@dataclass
class LoopContext:
    """Everything the loop needs besides the source and the step function."""

    stage: str
    info: DistInfo
    engine: Engine
    tracker: Tracker
    work_dir: Path
    total_steps: int
    every_steps: int
    keep_last: int
    log_every: int
    resolved_config: dict[str, Any]
    trainer_state: dict[str, Any] = field(default_factory=dict)
    flops_per_token: float | None = None  # 6 x trainable-forward params, for MFU


def _peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def read_metrics(work_dir: str | Path) -> list[dict[str, Any]]:
    """The per-step metrics a stage wrote to `<work_dir>/metrics.jsonl`."""
    path = Path(work_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_metrics(work_dir: Path, after_step: int) -> None:
    """Drop logged steps past `after_step` (steps a killed run did after its last checkpoint)."""
    kept = [m for m in read_metrics(work_dir) if m["step"] <= after_step]
    (work_dir / METRICS_FILE).write_text("".join(json.dumps(m) + "\n" for m in kept))


def train_loop(
    ctx: LoopContext,
    source: Any,
    step_fn: StepFn,
    *,
    start_step: int = 0,
    extra_state: Callable[[], dict[str, Any]] = dict,
) -> list[dict[str, Any]]:
    """Run optimizer steps `start_step .. total_steps - 1`.

    Args:
        ctx: the stage's loop context.
        source: a batch source with `next(n)` and `state_dict()`.
        step_fn: runs one optimizer step over the given micro-batches; returns metrics reduced over ranks,
            including "loss" and "tokens" (real tokens processed by all ranks).
        start_step: steps already done (after a resume).
        extra_state: more per-rank state for checkpoints (e.g. MPO's reward shift).

    Returns:
        The metrics of the steps run here.
    """
    if ctx.info.is_main:
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(ctx.work_dir, start_step)
    peak = peak_flops()
    progress = Progress(ctx.stage, ctx.total_steps, start_step, ctx.log_every, ctx.info.is_main)
    history = []
    try:
        for step in range(start_step, ctx.total_steps):
            lr = ctx.engine.scheduler.get_last_lr()[0]
            started = time.perf_counter()
            metrics = step_fn(source.next(ctx.engine.accumulation_steps))
            seconds = time.perf_counter() - started
            metrics["lr"] = lr
            metrics["step_seconds"] = seconds
            metrics["tokens_per_s"] = metrics["tokens"] / seconds
            metrics["peak_memory_gb"] = _peak_memory_gb()
            if peak and ctx.flops_per_token:
                achieved = ctx.flops_per_token * metrics["tokens_per_s"] / ctx.info.world_size
                metrics["mfu"] = achieved / peak
            done = step + 1
            ctx.tracker.log_metrics(metrics, step=done)
            if ctx.info.is_main:
                with (ctx.work_dir / METRICS_FILE).open("a") as f:
                    f.write(json.dumps({"step": done, **metrics}) + "\n")
            history.append({"step": done, **metrics})
            progress.update(done, metrics)
            if ctx.every_steps and done % ctx.every_steps == 0 and done < ctx.total_steps:
                save_training_state(
                    ctx.work_dir,
                    done,
                    ctx.engine,
                    ctx.info,
                    trainer_state=ctx.trainer_state,
                    rank_state={"rng": rng_state(), "data": source.state_dict(), **extra_state()},
                    resolved_config=ctx.resolved_config,
                    keep_last=ctx.keep_last,
                )
    finally:
        progress.close()
    return history
