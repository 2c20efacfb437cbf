"""What a training stage's loop uses: resumable batch sources and the per-step report.

The loop itself is written in each stage file (`components/sft/stage.py`, `components/mpo/stage.py`): the
stage takes one optimizer step's micro-batches from a source (`PackedSource`, `PaddedSource` or `IndexSource`),
runs its forward/backward/`engine.step()` over them, and hands the step's metrics (reduced over ranks) to
`StepReport`, which logs them (MLflow, `<work_dir>/metrics.jsonl`, progress) and writes periodic checkpoints.
"""

from __future__ import annotations

import json
import logging
import random
import resource
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from vlpipe.components.training.runtime import DistInfo, Engine, peak_flops, rng_state
from vlpipe.components.training.state import checkpoint_dir, save_training_state
from vlpipe.model.collate import collate_padded
from vlpipe.model.conversation import EncodedSample
from vlpipe.model.data.config import PackingConfig
from vlpipe.model.data.packing import GreedyPacker, Row, pack_rows, sample_from_dict, sample_to_dict
from vlpipe.model.errors import SampleError
from vlpipe.tracking.runs import Run

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"


# -- batch sources ------------------------------------------------------------------------------------------
class PackedSource:
    """Packed micro-batches (`vlpipe.model.data.packing`) from an endless, resumable sample stream.

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
            "pending": [[sample_to_dict(s) for s in row] for row in self.pending],
            "unpackable": dict(self.unpackable),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])
        self.packer.load_state_dict(state["packer"])
        self.pending = [[sample_from_dict(s) for s in row] for row in state["pending"]]
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


# -- per-step reporting -------------------------------------------------------------------------------------
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


class StepReport:
    """What a stage's loop does around each optimizer step besides the step itself.

    `begin()` before the step; `end(step, metrics)` after it adds lr, step time, tokens/s, MFU (GPU) and peak
    memory, logs the step to MLflow and `<work_dir>/metrics.jsonl` and shows progress; `checkpoint(step,
    rank_state)` writes and commits the resumable checkpoint every `checkpoint.every_steps` steps to the stage's
    checkpoint location (`state.py`; a collective). Steps a
    killed run logged after its last checkpoint are dropped from `metrics.jsonl` when the stage resumes.

    Args:
        cfg: the stage config (`checkpoint`, `trainer.log_every`).
        start: the stage's start (rank, work directory).
        engine: the DeepSpeed engine.
        run: the stage's MLflow run.
        total_steps: optimizer steps of the run.
        start_step: steps already done (after a resume).
        resolved: the resolved config (written into every checkpoint).
    """

    def __init__(
        self,
        cfg: Any,
        start: Any,
        engine: Engine,
        run: Run,
        total_steps: int,
        start_step: int,
        resolved: dict[str, Any],
    ) -> None:
        self.info, self.work_dir, self.engine, self.run = start.info, start.work_dir, engine, run
        self.checkpoints = start.checkpoints or str(checkpoint_dir(start.work_dir))
        self.total_steps, self.resolved = total_steps, resolved
        self.every_steps, self.keep_last = cfg.checkpoint.every_steps, cfg.checkpoint.keep_last
        self.trainer_state = {"mlflow_run_id": run.run_id, "stage": cfg.stage}
        self.flops_per_token = 6.0 * sum(p.numel() for p in engine.module.parameters())
        self.peak = peak_flops()
        self.history: list[dict[str, Any]] = []
        if self.info.is_main:
            kept = [m for m in read_metrics(self.work_dir) if m["step"] <= start_step]
            (self.work_dir / METRICS_FILE).write_text("".join(json.dumps(m) + "\n" for m in kept))
        self.progress = Progress(cfg.stage, total_steps, start_step, cfg.trainer.log_every, self.info.is_main)
        self._lr, self._started = 0.0, 0.0

    def begin(self) -> None:
        self._lr = self.engine.scheduler.get_last_lr()[0]
        self._started = time.perf_counter()

    def end(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Record optimizer step `step` (1-based) with its metrics (reduced over ranks, with "loss" and "tokens")."""
        seconds = time.perf_counter() - self._started
        metrics.update(lr=self._lr, step_seconds=seconds, tokens_per_s=metrics["tokens"] / seconds)
        metrics["peak_memory_gb"] = _peak_memory_gb()
        if self.peak:
            metrics["mfu"] = self.flops_per_token * metrics["tokens_per_s"] / self.info.world_size / self.peak
        self.run.log_metrics(metrics, step=step)
        if self.info.is_main:
            with (self.work_dir / METRICS_FILE).open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        self.history.append({"step": step, **metrics})
        self.progress.update(step, metrics)
        return metrics

    def checkpoint(self, step: int, rank_state: dict[str, Any]) -> None:
        """Write a resumable checkpoint after `step` when one is due (every rank calls this)."""
        if self.every_steps and step % self.every_steps == 0 and step < self.total_steps:
            save_training_state(
                self.checkpoints,
                step,
                self.engine,
                self.info,
                trainer_state=self.trainer_state,
                rank_state={"rng": rng_state(), **rank_state},
                resolved_config=self.resolved,
                keep_last=self.keep_last,
            )

    def close(self) -> None:
        self.progress.close()
