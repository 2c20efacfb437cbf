"""DeepSpeed configs rendered from the typed `DistributedConfig`, never hand-edited.

`render_deepspeed_config` builds the full config a stage passes to `deepspeed.initialize`; the files under
`infra/deepspeed/` (one per ZeRO stage, shipped as a Kubernetes ConfigMap) are `reference_configs()` written
by `vlpipe deepspeed render`, and a test checks they equal the rendering, so they cannot drift.

The reference files leave out the batch-size keys: the stage fills them from `global_batch_size`,
`micro_batch_size` and the world size it finds at launch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlpipe.components.training.config import DistributedConfig

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "infra" / "deepspeed"
"""The reference files in the source tree (`infra/deepspeed/`)."""
_STEPS_PER_PRINT = 10**9  # DeepSpeed's own periodic prints are replaced by vlpipe's progress and MLflow


def _zero_section(dist: DistributedConfig) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": dist.zero_stage}
    if dist.zero_stage >= 1:
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_bucket_size=500_000_000)
    if dist.zero_stage == 2:
        zero.update(allgather_bucket_size=500_000_000, reduce_scatter=True)
    if dist.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=50_000_000,
            stage3_param_persistence_threshold=100_000,
            stage3_gather_16bit_weights_on_model_save=True,
        )
    if dist.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return zero


def render_deepspeed_config(
    dist: DistributedConfig,
    *,
    bf16: bool,
    grad_clip: float,
    train_batch_size: int | None = None,
    micro_batch_size: int | None = None,
    accumulation_steps: int | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config of a stage.

    Args:
        dist: ZeRO stage and offload settings.
        bf16: train in bfloat16 (DeepSpeed keeps fp32 master weights).
        grad_clip: gradient-norm clip (0 disables).
        train_batch_size, micro_batch_size, accumulation_steps: the batch keys; left out when None.

    Returns:
        A JSON-serialisable dict for `deepspeed.initialize(config=...)`.
    """
    config: dict[str, Any] = {}
    if train_batch_size is not None:
        config["train_batch_size"] = train_batch_size
    if micro_batch_size is not None:
        config["train_micro_batch_size_per_gpu"] = micro_batch_size
    if accumulation_steps is not None:
        config["gradient_accumulation_steps"] = accumulation_steps
    config.update(
        {
            "gradient_clipping": grad_clip,
            "bf16": {"enabled": bf16},
            "zero_optimization": _zero_section(dist),
            # The optimizer is torch's AdamW built by the stage (decay / no-decay groups), not DeepSpeed's.
            "zero_allow_untested_optimizer": True,
            "steps_per_print": _STEPS_PER_PRINT,
            "wall_clock_breakdown": False,
        }
    )
    return config


def reference_configs() -> dict[str, dict[str, Any]]:
    """The shipped reference configs: `zero{0,1,2,3}.json` (bf16) and `zero3-offload.json`."""
    configs = {
        f"zero{stage}.json": render_deepspeed_config(
            DistributedConfig(zero_stage=stage), bf16=True, grad_clip=1.0
        )
        for stage in (0, 1, 2, 3)
    }
    configs["zero3-offload.json"] = render_deepspeed_config(
        DistributedConfig(zero_stage=3, offload_optimizer=True), bf16=True, grad_clip=1.0
    )
    return configs


def dumps(config: dict[str, Any]) -> str:
    """Canonical JSON text of a config (sorted keys, 2-space indent, trailing newline)."""
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def write_reference_configs(out: Path = REFERENCE_DIR) -> list[Path]:
    """Write `reference_configs()` into `out`; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, config in reference_configs().items():
        path = out / name
        path.write_text(dumps(config))
        paths.append(path)
    return paths
