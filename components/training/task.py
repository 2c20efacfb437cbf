"""What the training components call: wire the recipe's stage settings to the pipeline's artifacts, validate
them with the stage's own config class, run the stage, fill the output artifacts.

Torch-free at import (pipeline definitions and recipe validation import this module); the stage itself is
imported when it runs.

A recipe's stage settings are a stage config without the keys the pipeline owns (the stage table's `owned`): where
the model starts (`init`, the upstream `Model` artifact), the resumable `work_dir` (`<work root>/<pipeline
job id>/<stage>`, on the recipe's volume in a cluster), where the checkpoint goes (`output`,
`<work_dir>/final`, then copied into this step's `Model` artifact), the data file (`data.meta` or
`data.path`, from the `prepare-data` artifact) and the MLflow parent run. Keeping `output` in the work
directory makes a retried task (a new pod, an empty artifact directory) find the completed run there
(`run_stage` is idempotent) and publish its checkpoint again instead of training again. `wire_stage_config` adds them and validates the result with `parse_stage_config`; recipe
validation calls it with placeholders, the component with the real values.

One GPU (or the CPU) trains in-process; `world_size > 1` launches `torch.distributed.run` with one process
per GPU on this node. A stage with `nodes > 1` (the recipe's `stages.<name>.nodes`; the component's `launch`
input) runs as a Kubeflow Trainer TrainJob across the nodes instead (`vlpipe.components.training.trainjob`):
the step creates it, streams its logs and waits, and then publishes the checkpoint the same way.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FINAL_CHECKPOINT = "final"
"""The stage's output checkpoint directory inside its work directory."""
PLACEHOLDERS = {
    "init": "/pipeline/init-model",
    "output": "/pipeline/output-model",
    "work_dir": "/pipeline/work",
    "data": "/pipeline/data-file",
}


def wire_stage_config(
    stage: str,
    settings: dict[str, Any],
    *,
    init: str,
    output: str,
    work_dir: str,
    data_file: str,
    parent_run_id: str | None,
) -> Any:
    """The full, validated stage config: `settings` plus the pipeline's paths and parent run.

    Args:
        stage: pretrain, sft, mpo, prm or critic (trained as sft).
        settings: the stage settings as the component receives them (recipe settings + tracking).
        init, output, work_dir: checkpoint in, checkpoint out, resumable work directory.
        data_file: the meta file (pretrain, sft), or a JSONL or meta file (mpo, prm).
        parent_run_id: the pipeline's MLflow run (None: a top-level run).

    Returns:
        The stage's config object (`PretrainStageConfig`, ...).

    Raises:
        pydantic.ValidationError: an invalid setting (the message names the key).
    """
    from vlpipe.components.stages import STAGES, parse_stage_config

    entry = STAGES[stage]
    cfg = copy.deepcopy(settings)
    data_key = entry.data[0]
    cfg["data"] = {**cfg.get("data", {}), data_key: data_file}
    cfg["tracking"] = {
        "run_name": stage,
        **cfg.get("tracking", {}),
        "parent_run_id": parent_run_id or None,
    }
    trained = entry.trains_as or stage
    if trained != stage:
        cfg["tracking"]["tags"] = {**cfg["tracking"].get("tags", {}), "stage": stage}
    cfg.update(stage=trained, init=init, output=output, work_dir=work_dir)
    return parse_stage_config(cfg, trained)


def wire_task_config(
    stage: str, settings: dict[str, Any], *, parameters: dict[str, Any], **wiring: Any
) -> Any:
    """`wire_stage_config` of the settings with the values the task's pipeline parameters passed: `lr`,
    `max_steps` (a step count replaces the epochs; 0: the recipe's epochs, else one, decide) and
    `global_batch_size`; -1 keeps the recipe's value.

    Raises:
        ValueError: an invalid setting, naming the key and the pipeline parameters `<stage>_<name>` given.
    """
    given = {name: value for name, value in parameters.items() if value != -1}
    trainer = dict(settings.get("trainer", {}))
    if "lr" in given:
        trainer["optimizer"] = {**trainer.get("optimizer", {}), "lr": given["lr"]}
    if given.get("max_steps"):  # a step count replaces the epochs
        trainer.update(max_steps=given["max_steps"], epochs=None)
    elif "max_steps" in given:  # 0: the epochs decide (the recipe's, else one pass)
        trainer.update(max_steps=None, epochs=trainer.get("epochs") or 1)
    if "global_batch_size" in given:
        trainer["global_batch_size"] = given["global_batch_size"]
    try:
        return wire_stage_config(stage, {**settings, "trainer": trainer}, **wiring)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        named = {f"{stage}_{name}": value for name, value in given.items()}
        with_params = f" with the pipeline parameters {named}" if named else ""
        raise ValueError(f"{stage}: invalid settings{with_params}: {exc}") from exc


def stage_work_dir(work_root: str, run_key: str, stage: str) -> str:
    """`<work root>/<run key>/<stage>`; an empty work root means `<VLPIPE_HOME>/work` (local runs)."""
    from vlpipe.model.storage import vlpipe_home

    root = Path(work_root) if work_root else vlpipe_home() / "work"
    return str(root / (run_key or "standalone") / stage)


def checkpoint_preset(checkpoint_dir: str) -> str | None:
    """The preset recorded in a vlpipe checkpoint's `vlpipe.json` (None when absent)."""
    path = Path(checkpoint_dir) / "vlpipe.json"
    return json.loads(path.read_text()).get("preset") if path.exists() else None


def check_preset(checkpoint_dir: str, preset: str) -> None:
    """Refuse a starting checkpoint of another preset than the recipe's.

    Raises:
        ValueError: naming both presets.
    """
    found = checkpoint_preset(checkpoint_dir)
    if found is not None and found != preset:
        raise ValueError(
            f"the starting checkpoint {checkpoint_dir} is a {found!r} model but the recipe's preset is "
            f"{preset!r}; pass a {preset} checkpoint or use the {found} recipe"
        )


def run_stage_processes(
    stage: str, config: Any, world_size: int, *, launch: str = "", task: str = "", run_key: str = ""
) -> dict[str, Any]:
    """Run the stage in this process (`world_size` 1), one process per GPU under `torch.distributed.run`, or,
    when `launch` asks for more than one node, as a TrainJob across the nodes.

    Args:
        launch: a `TrainJobLaunch` as JSON ("" or one node: on this node).
        task, run_key: name the TrainJob (a retried step finds its own).

    Raises:
        subprocess.CalledProcessError: a distributed run failed (its output is in the step's log).
        vlpipe.components.training.trainjob.TrainJobFailed: the TrainJob failed (its reason in the message).
    """
    if launch:
        from vlpipe.components.training.entrypoint import COMPLETE_FILE, run_stage
        from vlpipe.components.training.trainjob import TrainJobLaunch, run_stage_trainjob

        spec = TrainJobLaunch.model_validate_json(launch)
        if spec.nodes > 1:
            # a global batch (e.g. from the `<stage>_global_batch_size` parameter) that does not divide over the
            # nodes fails here, before any GPU is held, not on every node
            config.trainer.accumulation_steps(spec.nodes * spec.processes_per_node)
            if (Path(config.resolved_work_dir) / COMPLETE_FILE).exists():
                return run_stage(stage, config)  # finished (a retried step): its summary, no TrainJob, no GPU
            return run_stage_trainjob(
                stage, config, spec, task=task or stage, run_key=run_key or "standalone"
            )
    if world_size <= 1:
        from vlpipe.components.training.entrypoint import run_stage

        return run_stage(stage, config)
    work = Path(config.resolved_work_dir)
    work.mkdir(parents=True, exist_ok=True)
    config_file, summary_file = work / "stage_config.json", work / "stage_summary.json"
    config_file.write_text(config.model_dump_json(indent=2))
    command = [
        # --standalone: a c10d rendezvous on a port the launcher binds itself (no port probed, then bound later)
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
        "-m", "vlpipe.components.training", config.stage, "--config", str(config_file), "--summary", str(summary_file),
    ]  # fmt: skip
    log.info("launching %s", " ".join(command))
    subprocess.run(command, check=True, env=os.environ.copy())
    return json.loads(summary_file.read_text())


def run_training_task(
    stage: str,
    config_json: str,
    *,
    preset: str,
    parent_run_id: str | None = None,
    run_key: str | None = None,
    work_root: str,
    world_size: int,
    init_model: Any,
    data: Any,
    model: Any,
    metrics: Any,
    mixture: Any | None = None,
    steps: Any | None = None,
    lr: float = -1.0,
    max_steps: int = -1,
    global_batch_size: int = -1,
    launch: str = "",
) -> dict[str, Any]:
    """The training components' entrypoint.

    Args:
        stage: pretrain, sft, mpo or prm.
        config_json: the stage settings (recipe settings + tracking) as JSON.
        preset: the recipe's preset; the starting checkpoint must be one.
        parent_run_id: the pipeline's MLflow run; None (in a pipeline): found through `model`'s URI
            (`vlpipe.tracking.pipeline.find_parent_run`), so the task takes no per-run input and can be cached.
        run_key: names the work directory, so a retried task resumes; default the parent run's id.
        work_root: the work volume's mount path ("" locally).
        world_size: processes (GPUs) on this node.
        init_model: input `Model` artifact (the starting checkpoint).
        data: input `Dataset` artifact of the `prepare-data` step.
        model: output `Model` artifact (the stage's HF checkpoint).
        metrics: output `Metrics` artifact.
        mixture: input `Dataset` artifact of the `mix-data` step (pretrain, sft): the stage must train on the
            mixture whose manifest the mix step recorded.
        steps: input `Dataset` artifact of the `sample-prm-data` step (prm): the on-policy step-labelled
            JSONL to train on instead of the prepared one; its images are under its metadata's `image_root`.
        lr, max_steps, global_batch_size: the pipeline parameters `<stage>_lr`, ... (-1: the recipe's value;
            `max_steps` 0: the recipe's epochs decide), validated with the stage's config class.
        launch: the stage's TrainJob settings (`TrainJobLaunch` JSON) when the recipe gives it `nodes > 1`
            ("": train on this node).

    Returns:
        The stage's summary.

    Raises:
        ValueError: a starting checkpoint of another preset, or data other than the mix step checked.
    """
    from vlpipe.components.data.prepare import load_dataset_info
    from vlpipe.components.pipeline_run.model_store import checkpoint_path, publish_checkpoint
    from vlpipe.components.pipeline_run.task import pipeline_parent, write_metrics_file
    from vlpipe.components.stages import STAGES

    parent_run_id = pipeline_parent(parent_run_id, model, (init_model, data, mixture, steps))
    run_key = run_key or parent_run_id

    info = load_dataset_info(data.path)
    work_dir = stage_work_dir(work_root, run_key, stage)
    init_dir = checkpoint_path(init_model.path)
    settings = json.loads(config_json)
    data_file = info["files"][STAGES[stage].data[1]]
    if steps is not None:
        from vlpipe.components.prm_data.task import IMAGE_ROOT_KEY

        data_file = steps.path
        image_root = steps.metadata.get(IMAGE_ROOT_KEY)
        if image_root and not settings.get("data", {}).get("image_root"):
            settings["data"] = {**settings.get("data", {}), "image_root": image_root}
    config = wire_task_config(
        stage,
        settings,
        parameters={"lr": lr, "max_steps": max_steps, "global_batch_size": global_batch_size},
        init=init_dir,
        output=str(Path(work_dir) / FINAL_CHECKPOINT),
        work_dir=work_dir,
        data_file=data_file,
        parent_run_id=parent_run_id,
    )
    check_preset(init_dir, preset)
    summary = run_stage_processes(  # the critic trains as sft
        config.stage, config, world_size, launch=launch, task=STAGES[stage].task, run_key=run_key
    )
    publish_checkpoint(config.output, model)
    if mixture is not None:
        expected = mixture.metadata.get(f"{stage}_manifest_sha256")
        if expected and summary.get("data_manifest_sha256") != expected:
            raise ValueError(
                f"{stage} trained on data with manifest {summary.get('data_manifest_sha256')} but the mix "
                f"step recorded {expected}; the stage and mix settings disagree"
            )
    lineage = {**init_model.metadata.get("lineage", {}), stage: summary["mlflow_run_id"]}
    if steps is not None and steps.metadata.get("mlflow_run_id"):
        lineage["prm-data"] = steps.metadata["mlflow_run_id"]
    model.metadata.update(
        {
            "preset": preset,
            "stage": stage,
            "mlflow_run_id": summary["mlflow_run_id"],
            "lineage": lineage,
            **(
                {"data_manifest_sha256": summary["data_manifest_sha256"]}
                if "data_manifest_sha256" in summary
                else {}
            ),
        }
    )
    for key in ("steps", "loss_first", "loss_last", "reward_shift", "quarantined"):
        if isinstance(summary.get(key), int | float):
            metrics.log_metric(key, float(summary[key]))
    write_metrics_file(metrics)  # an artifact with a file: a cache entry of this task stays valid
    return summary
