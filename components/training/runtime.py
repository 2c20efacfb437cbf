"""Process group, device, precision, freezing, optimizer, LR schedule and the DeepSpeed engine of a stage.

The same code runs as one CPU process, under `torchrun` or the `deepspeed` launcher, on one GPU or many
nodes: the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) is read when present,
otherwise a one-process group on a free loopback port is set up. Without CUDA the backend is gloo.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from vlpipe.components.training.config import DistributedConfig, FreezeConfig, OptimizerConfig, TrainerConfig
from vlpipe.components.training.deepspeed import render_deepspeed_config
from vlpipe.objectives.distributed import all_reduce_sum

log = logging.getLogger(__name__)

PROCESS_GROUP_TIMEOUT_ENV = "VLPIPE_PROCESS_GROUP_TIMEOUT_S"
_DEFAULT_PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)


def process_group_timeout() -> timedelta:
    """How long a collective waits for a missing rank before failing: `$VLPIPE_PROCESS_GROUP_TIMEOUT_S`
    seconds, default 30 minutes (a node that lost its peer gives up after this and its pod restarts).

    Raises:
        ValueError: a value that is not a positive number of seconds.
    """
    raw = os.environ.get(PROCESS_GROUP_TIMEOUT_ENV)
    if raw is None or raw == "":
        return _DEFAULT_PROCESS_GROUP_TIMEOUT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{PROCESS_GROUP_TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return timedelta(seconds=seconds)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size and local rank (GPU index on its node)."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(config: DistributedConfig) -> DistInfo:
    """Join (or create) the default process group; idempotent.

    Args:
        config: the stage's distributed settings ("auto" backend: nccl with CUDA, else gloo).

    Returns:
        This process's `DistInfo`.
    """
    import deepspeed

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        group_of_one = "RANK" not in os.environ  # not under a launcher: a group of one on a free port
        if group_of_one:
            os.environ.update(
                RANK="0",
                WORLD_SIZE="1",
                LOCAL_RANK="0",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(_free_port()),
            )
        backend = config.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        try:
            deepspeed.init_distributed(dist_backend=backend, timeout=process_group_timeout())
        finally:
            if group_of_one:
                # Child processes (pipeline tasks, launchers) must not join this process's group; DeepSpeed
                # only needs LOCAL_RANK later (at `deepspeed.initialize`).
                for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                    os.environ.pop(key, None)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def device_for(info: DistInfo) -> torch.device:
    """The device this rank trains on."""
    return torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def use_bf16(precision: str) -> bool:
    """Whether to train in bfloat16: "bf16" always, "auto" on a GPU that supports it, "fp32" never."""
    if precision == "bf16":
        return True
    return precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's RNG states (Python, NumPy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states saved by `rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- which parameters train ---------------------------------------------------------------------------------
def model_parts(model: nn.Module) -> dict[str, list[nn.Module]]:
    """InternVL's three parts: vision tower, MLP projector, and the LLM (with its output head)."""
    inner = model.model
    return {
        "vision": [inner.vision_tower],
        "projector": [inner.multi_modal_projector],
        "llm": [inner.language_model, model.lm_head],
    }


def apply_freeze(model: nn.Module, freeze: FreezeConfig) -> dict[str, int]:
    """Set `requires_grad` per part.

    Returns:
        Trainable parameter count per part (0 for a frozen part).
    """
    counts = {}
    for part, modules in model_parts(model).items():
        frozen = getattr(freeze, part)
        seen = set()
        total = 0
        for module in modules:
            for param in module.parameters():
                param.requires_grad_(not frozen)
                if id(param) not in seen:
                    seen.add(id(param))
                    total += param.numel()
        counts[part] = 0 if frozen else total
    return counts


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into decayed (matrices) and not decayed (biases, norms, 1-D)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_factor(step: int, total_steps: int, config: OptimizerConfig) -> float:
    """LR multiplier at optimizer step `step` (0-based): linear warmup, then cosine to `min_lr_ratio`.

    Worked values for warmup 2, total 6, min ratio 0: steps 0,1 → 1/2, 2/2; then cosine over the 4 remaining
    steps: 2 → 1.0, 3 → (1 + cos(pi/4))/2, 4 → 0.5, 5 → (1 + cos(3pi/4))/2.
    """
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    decay_steps = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine


class Schedule:
    """The LR multiplier as a callable object (its horizon can be set once the data is known; LambdaLR
    saves and restores its attributes with the scheduler state)."""

    def __init__(self, total_steps: int, config: OptimizerConfig) -> None:
        self.total_steps = total_steps
        self.warmup_steps = config.warmup_steps
        self.min_lr_ratio = config.min_lr_ratio

    def __call__(self, step: int) -> float:
        cfg = OptimizerConfig(warmup_steps=self.warmup_steps, min_lr_ratio=self.min_lr_ratio)
        return lr_factor(step, self.total_steps, cfg)


@dataclass
class Engine:
    """The DeepSpeed engine with what a stage needs around it."""

    engine: Any  # deepspeed.DeepSpeedEngine
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    accumulation_steps: int
    ds_config: dict[str, Any]
    bf16: bool
    schedule: Schedule

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32


class TextOnlyVisionPass:
    """Run the vision tower and projector on one blank tile in every forward pass that has no image.

    Without it, two things break on text-only micro-batches (measured here with DeepSpeed 0.19 on gloo):
    - with several ranks under ZeRO-3, a rank without images skips the vision tower's parameter gathers that a
      rank with images makes, so the ranks' collectives disagree (gloo: "collective mismatch"; NCCL: a hang);
    - even in one process, ZeRO-3 gets the step's gradient wrong when a micro-batch of the accumulation leaves
      the vision tower unused (the gradient norm differs from ZeRO-0/2 on the same data, and so does the update).
    As InternVL does for its pure-text samples (a blank image with `image_flags` 0), the blank tile's features
    join the input embeddings multiplied by 0: the activations and the loss stay exactly what they were, the
    vision parameters get zero gradients (what ZeRO-1/2's flat buffers hold for unused parameters anyway), and
    the pass runs where real image features are computed (right after the token embedding), so every rank
    gathers and reduces the same parameters in the same order. ZeRO-0, 2 and 3, one rank or several, then give
    the same steps (tested).

    Installed by `build_engine` as hooks on the DeepSpeed-wrapped module, after DeepSpeed's own.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.pending = False  # the current forward pass has no images and has not run the blank tile yet
        self.logged = False
        vision = model.config.vision_config
        size = vision.image_size
        self.size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        model.register_forward_pre_hook(self._before, with_kwargs=True)
        model.get_input_embeddings().register_forward_hook(self._after_embedding)

    def _before(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self.pending = kwargs.get("pixel_values") is None and kwargs.get("inputs_embeds") is None

    def _after_embedding(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not self.pending:
            return None
        self.pending = False
        inner, config = self.model.model, self.model.config
        blank = torch.zeros(1, 3, *self.size, dtype=output.dtype, device=output.device)
        features = inner.get_image_features(
            pixel_values=blank,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            return_dict=True,
        ).pooler_output
        if not self.logged:
            self.logged = True
            log.info(
                "a forward pass without images: the vision tower runs on a blank tile (x 0) on this rank"
            )
        return output + features.sum().to(output.dtype) * 0.0


def build_engine(model: nn.Module, trainer: TrainerConfig, info: DistInfo, total_steps: int) -> Engine:
    """Wrap `model` in a DeepSpeed engine with AdamW and the warmup + cosine schedule.

    Args:
        model: the model, already frozen per the stage (its trainable params get the optimizer).
        trainer: the trainer settings.
        info: this process's place in the group.
        total_steps: optimizer steps of the whole run (for the cosine).

    Returns:
        The `Engine`.
    """
    import deepspeed

    gas = trainer.accumulation_steps(info.world_size)
    bf16 = use_bf16(trainer.precision)
    if trainer.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if bf16:
        model = model.to(torch.bfloat16)
    model.config.use_cache = False
    optim = trainer.optimizer
    optimizer = torch.optim.AdamW(
        param_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas, eps=optim.eps
    )
    schedule = Schedule(total_steps, optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    ds_config = render_deepspeed_config(
        trainer.distributed,
        bf16=bf16,
        grad_clip=optim.grad_clip,
        train_batch_size=trainer.global_batch_size,
        micro_batch_size=trainer.micro_batch_size,
        accumulation_steps=gas,
    )
    engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    # After DeepSpeed's own hooks, so that its ZeRO-3 wrappers see the embedding's output as they do when the real
    # image features join it: the same modules, gathered in the same order, forward and backward.
    TextOnlyVisionPass(engine.module)  # lives on in its hooks
    return Engine(engine, ds_optimizer, ds_scheduler, gas, ds_config, bf16, schedule)


def grad_norm(engine: Engine) -> float:
    """Global gradient norm of the last step (before clipping)."""
    norm = engine.engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def local_grad_norm(model: nn.Module) -> float:
    """Gradient norm from the parameters' `.grad` (ZeRO 0, where DeepSpeed does not report one)."""
    grads = [p.grad.detach().float() for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


@contextlib.contextmanager
def full_parameters(engine: Engine) -> Iterator[nn.Module]:
    """The unwrapped module with every parameter whole (ZeRO-3 gathers its shards for the duration)."""
    module = engine.module
    if engine.ds_config["zero_optimization"]["stage"] == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield module
    else:
        yield module


# Dense bf16 peak of common accelerators, for model FLOPs utilisation (FLOP/s).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops() -> float | None:
    """Peak dense bf16 FLOP/s of this GPU, None on CPU or an unknown GPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def sum_over_ranks(values: list[float]) -> list[float]:
    """Sum floats over ranks (step totals for logging and normalisation); a collective on every rank."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    return all_reduce_sum(tensor).cpu().tolist()
