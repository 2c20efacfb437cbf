"""What the `sample-prm-data` component calls: on-policy PRM data from the pipeline's policy.

VisualPRM trains its PRM on the policy's own solutions with per-step labels; this step samples N solutions
per source item from the policy the evaluation will judge, labels every step (`vlpipe.components.prm_data.stage`) and
hands the JSONL to the `prm` stage in place of the prepared `prm/train.jsonl`. Everything is logged to an
MLflow child run `prm-data`: the settings, the counts (solutions, step labels, sample accuracy, skipped
items by reason), items/s, a summary JSON and the first solutions as a preview.

Torch-free at import. A recipe's `prm_data.config` is a `PRMSampleConfig` without `policy` and `output`
(the stage table's `owned`); a relative `source`, `image_root` or `include` path is read from the data root.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from vlpipe.components.pipeline_run.config import TaskConfig
from vlpipe.components.prm_data.stage import PRMSampleConfig

PLACEHOLDERS = {"policy": "/pipeline/policy", "output": "/pipeline/prm-data/steps.jsonl"}
IMAGE_ROOT_KEY = "image_root"
"""The output `Dataset` artifact's metadata key naming the directory its rows' `image` paths are relative to."""
PREVIEW_ROWS = 50


def wire_prm_data_config(
    settings: dict[str, Any], *, policy: str, output: str, data_root: str
) -> PRMSampleConfig:
    """The full, validated `PRMSampleConfig`: `settings` plus the policy and output, paths under `data_root`.

    Raises:
        pydantic.ValidationError: an invalid setting (the message names the key).
    """
    from vlpipe.components.data.config import under_root

    cfg = copy.deepcopy(settings)
    for key in ("source", "image_root"):
        if cfg.get(key):
            cfg[key] = under_root(data_root, cfg[key])
    if cfg.get("include"):
        cfg["include"] = [under_root(data_root, path) for path in cfg["include"]]
    cfg.update(policy=policy, output=output)
    return PRMSampleConfig.model_validate(cfg)


def _log_run(config: PRMSampleConfig, counts: dict[str, Any], output: Path) -> None:
    import mlflow

    mlflow.log_params(
        {
            key: getattr(config, key)
            for key in ("source", "n", "temperature", "top_p", "max_new_tokens", "seed", "limit", "labeler")
        }
    )
    steps = counts["positive_steps"] + counts["negative_steps"]
    derived = {
        "positive_step_fraction": counts["positive_steps"] / steps if steps else 0.0,
        "sample_accuracy": counts["final_correct"] / counts["solutions"] if counts["solutions"] else 0.0,
    }
    mlflow.log_metrics(
        {
            **{k: float(v) for k, v in counts.items() if isinstance(v, int | float) and v is not None},
            **derived,
        }
    )
    mlflow.log_dict({**counts, **derived}, "prm_data/summary.json")
    with output.open() as f:
        preview = [line for _, line in zip(range(PREVIEW_ROWS), f, strict=False)]
    mlflow.log_text("".join(preview), "prm_data/preview.jsonl")


def run_prm_data_task(
    config_json: str,
    step_json: str,
    *,
    preset: str,
    parent_run_id: str | None = None,
    policy: Any,
    data: Any,
    steps: Any,
    metrics: Any,
) -> dict[str, Any]:
    """The `sample-prm-data` component's entrypoint.

    Args:
        config_json: the recipe's `prm_data.config` (a `PRMSampleConfig` without policy and output) as JSON.
        step_json: the recipe name and tracking settings (`TaskConfig`) as JSON.
        preset: the recipe's preset (the policy must be one).
        parent_run_id: the pipeline's MLflow run; None (in a pipeline): found through steps's URI
            (`vlpipe.tracking.pipeline.find_parent_run`), so the task takes no per-run input and can be cached.
        policy: input `Model` artifact (the policy whose solutions the PRM will judge).
        data: the `prepare-data` output (root of relative paths).
        steps: output `Dataset` artifact: the step-labelled JSONL (the `prm` stage's data); its metadata holds
            the counts and `image_root`.
        metrics: output `Metrics` artifact (counts, sample accuracy, items/s).

    Returns:
        The counts of `sample_prm_data`, with `mlflow_run_id`.
    """
    from vlpipe.components.pipeline_run.task import pipeline_parent

    parent_run_id = pipeline_parent(parent_run_id, steps, (policy, data))
    from vlpipe.components.data.prepare import load_dataset_info
    from vlpipe.components.pipeline_run.model_store import checkpoint_path
    from vlpipe.components.prm_data.stage import sample_prm_data
    from vlpipe.components.training.task import check_preset

    step = TaskConfig.model_validate_json(step_json)
    info = load_dataset_info(data.path)
    policy_dir = checkpoint_path(policy.path)
    check_preset(policy_dir, preset)
    config = wire_prm_data_config(
        json.loads(config_json), policy=policy_dir, output=str(Path(steps.path)), data_root=info["root"]
    )
    return _record(config, step, parent_run_id, steps, metrics, lambda: sample_prm_data(config))


def _record(
    config: PRMSampleConfig, step: TaskConfig, parent_run_id: str, steps: Any, metrics: Any, produce: Any
) -> dict[str, Any]:
    """Run `produce` (it writes `config.output`, returns the counts) inside the `prm-data` MLflow child run, log
    the run and fill the output artifacts (what `sample-prm-data` and `merge-prm-data` both give)."""
    from vlpipe.components.pipeline_run.task import write_metrics_file
    from vlpipe.components.training.records import default_image_root
    from vlpipe.tracking.runs import child_run

    output = Path(config.output)
    with child_run(
        parent_run_id,
        "prm-data",
        experiment=step.tracking.experiment,
        recipe=step.recipe,
        tags=step.tracking.tags,
    ) as run_id:
        counts = produce()
        _log_run(config, counts, output)
    image_root = config.image_root or default_image_root(config.source)
    steps.metadata.update(
        {
            IMAGE_ROOT_KEY: image_root,
            "mlflow_run_id": run_id,
            "labeler": config.labeler,
            **{
                k: counts[k]
                for k in ("items", "solutions", "positive_steps", "negative_steps", "skipped_items")
            },
        }
    )
    for key in ("items", "solutions", "positive_steps", "negative_steps", "final_correct", "skipped_items",
                "items_per_second"):  # fmt: skip
        if isinstance(counts.get(key), int | float):
            metrics.log_metric(key, float(counts[key]))
    write_metrics_file(metrics)  # an artifact with a file: a cache entry of this task stays valid
    return {**counts, "mlflow_run_id": run_id}


def run_prm_data_shard_task(
    config_json: str, *, preset: str, index: int, count: int, policy: Any, data: Any, part: Any
) -> dict[str, Any]:
    """The `sample-prm-data-shard` component's entrypoint: shard `index` of `count` into `part` (a directory
    `merge-prm-data` reads); no MLflow run (the merge records it).

    Args:
        config_json, preset, policy, data: as `run_prm_data_task`.
        index, count: the shard.
        part: output `Dataset` artifact (`steps.jsonl`, `part.json`).
    """
    from vlpipe.components.data.prepare import load_dataset_info
    from vlpipe.components.pipeline_run.model_store import checkpoint_path
    from vlpipe.components.prm_data.stage import sample_prm_shard
    from vlpipe.components.training.task import check_preset

    info = load_dataset_info(data.path)
    policy_dir = checkpoint_path(policy.path)
    check_preset(policy_dir, preset)
    config = wire_prm_data_config(
        json.loads(config_json), policy=policy_dir, output=PLACEHOLDERS["output"], data_root=info["root"]
    )
    counts = sample_prm_shard(config, index, count, part.path, progress=False)
    part.metadata.update({"index": index, "count": count, "items": counts["items"]})
    return counts


def run_prm_data_merge_task(
    step_json: str, *, parent_run_id: str | None = None, parts: list[Any], data: Any, steps: Any, metrics: Any
) -> dict[str, Any]:
    """The `merge-prm-data` component's entrypoint: the shards' parts and the includes into `steps`, counts
    added up, logged as `sample-prm-data` logs them (the settings are the ones the shards ran, checked equal).

    Args:
        step_json: as `run_prm_data_task`.
        parent_run_id: as `run_prm_data_task`.
        parts: the `sample-prm-data-shard` outputs (`dsl.Collected`), in any order.
        data: the `prepare-data` output (where the `include` files are).
        steps, metrics: as `run_prm_data_task`.
    """
    from vlpipe.components.pipeline_run.task import pipeline_parent
    from vlpipe.components.prm_data.stage import PART_FILE, merge_prm_data

    if not parts:
        raise ValueError("merge-prm-data: no sample-prm-data-shard part to merge")
    parent_run_id = pipeline_parent(parent_run_id, steps, (*parts, data))
    ran = json.loads((Path(parts[0].path) / PART_FILE).read_text())["config"]
    config = PRMSampleConfig.model_validate({**ran, "output": str(Path(steps.path))})
    step = TaskConfig.model_validate_json(step_json)
    return _record(
        config, step, parent_run_id, steps, metrics, lambda: merge_prm_data(config, [p.path for p in parts])
    )
