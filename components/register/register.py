"""The `register-model` step: the trained policy into the MLflow model registry.

validate settings → child MLflow run → log the policy checkpoint as a pyfunc model and register a new version
(`vlpipe.serving.pyfunc.log_checkpoint_model`) → lineage tags on the version (pipeline run and Kubeflow job, every
stage's run, data manifests, PRM, evaluation results, git commit) → alias (`challenger`). Stage results that a
cached task reused from an earlier pipeline run are tagged on the parent run (`vlpipe.reused.<stage>`).

Promotion (`challenger` → `champion`) and deployment are later steps that take this step's model URI.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from vlpipe.components.register.config import RegisterConfig
from vlpipe.tracking.pipeline import JOB_ID_TAG, record_reused
from vlpipe.tracking.runs import child_run

log = logging.getLogger(__name__)


def lineage_tags(
    *,
    parent_run_id: str,
    job_id: str,
    policy_meta: dict[str, Any],
    prm_meta: dict[str, Any],
    mixture_meta: dict[str, Any],
    eval_metrics: dict[str, Any],
) -> dict[str, str]:
    """Tags that tie a model version to the runs, data and results that produced it."""
    from vlpipe.tracking.runs import git_commit

    tags = {"pipeline_run_id": parent_run_id, JOB_ID_TAG: job_id, "git_commit": git_commit()}
    for stage, run_id in dict(policy_meta.get("lineage", {})).items():
        tags[f"run.{stage}"] = str(run_id)
    if prm_meta.get("mlflow_run_id"):
        tags["run.prm"] = str(prm_meta["mlflow_run_id"])
    prm_lineage = dict(prm_meta.get("lineage", {}))
    for stage in ("critic", "prm-data"):  # the PRM's base and its on-policy training data
        if prm_lineage.get(stage):
            tags[f"run.{stage}"] = str(prm_lineage[stage])
    # Where the checkpoints are in the model store (`cluster.model_store`), when the recipe has one.
    for name, meta in (("policy", policy_meta), ("prm", prm_meta)):
        if meta.get("checkpoint_uri"):
            tags[f"checkpoint.{name}"] = str(meta["checkpoint_uri"])
    for key, value in mixture_meta.items():
        if key.endswith("_manifest_sha256"):
            tags[f"data.{key}"] = str(value)
    overall = eval_metrics.get("overall", {})
    if eval_metrics.get("mlflow", {}).get("run_id"):
        tags["run.eval"] = eval_metrics["mlflow"]["run_id"]
    for key in ("pass_at_1", "best_of_n", "majority", "oracle"):
        if overall.get(key) is not None:
            tags[f"eval.{key}"] = f"{overall[key]:.4f}"
    if "n" in eval_metrics:
        tags["eval.n"] = str(eval_metrics["n"])
    if eval_metrics.get(
        "protocol"
    ):  # what the promotion gate compares (`vlpipe.serving.promote.PROTOCOL_TAG`)
        tags["eval_protocol"] = str(eval_metrics["protocol"])
    return {k: v for k, v in tags.items() if v}


def register_model(
    config: RegisterConfig,
    *,
    policy_dir: str,
    tags: dict[str, str],
    parent_run_id: str,
) -> dict[str, Any]:
    """Log, register and alias the policy; returns name, version, alias, model URI and the run id.

    Raises:
        FileNotFoundError: `policy_dir` is not a checkpoint.
    """
    from mlflow import MlflowClient

    from vlpipe.serving.pyfunc import log_checkpoint_model
    from vlpipe.tracking.runs import tracking_uri

    config = RegisterConfig.model_validate(config.model_dump())
    registry = config.registry
    started = time.perf_counter()
    with child_run(
        parent_run_id,
        "register",
        experiment=config.tracking.experiment,
        recipe=config.recipe,
        tags={**config.tracking.tags, "preset": config.preset},
    ) as run_id:
        import tempfile

        import mlflow

        from vlpipe.model.checkpoint import export_checkpoint

        # The registered checkpoint is the exported one (`registry.save_dtype`, bf16 by default, as published
        # InternVL3 checkpoints are); the stage checkpoints keep the training precision.
        exported = Path(tempfile.mkdtemp(prefix="vlpipe-export-")) / "checkpoint"
        try:
            export_checkpoint(policy_dir, exported, save_dtype=registry.save_dtype)
            mlflow.log_param("save_dtype", registry.save_dtype)
            info = log_checkpoint_model(
                str(exported),
                name="model",
                registered_model_name=registry.model_name,
                metadata={
                    "recipe": config.recipe,
                    "save_dtype": registry.save_dtype,
                    "vlpipe_checkpoint": policy_dir,
                    **tags,
                },
            )
        finally:
            shutil.rmtree(exported.parent, ignore_errors=True)
        version = str(info.registered_model_version)
        client = MlflowClient(tracking_uri())
        for key, value in {**tags, "recipe": config.recipe, "preset": config.preset}.items():
            client.set_model_version_tag(registry.model_name, version, key, value)
        client.set_registered_model_alias(registry.model_name, registry.alias, version)
        mlflow.set_tags({"registered_model": registry.model_name, "registered_version": version, **tags})
        mlflow.log_metric("seconds", time.perf_counter() - started)
    return {
        "name": registry.model_name,
        "version": version,
        "alias": registry.alias,
        "model_uri": f"models:/{registry.model_name}/{version}",
        "mlflow_run_id": run_id,
    }


def register_markdown(result: dict[str, Any], tags: dict[str, str]) -> str:
    """A model card: the registered version, its alias and lineage."""
    lines = [
        f"### Registered `{result['name']}` version {result['version']} (alias `{result['alias']}`)",
        "",
        f"Model URI: `{result['model_uri']}`",
        "",
        "| lineage | value |",
        "|---|---|",
        *(f"| {k} | `{v}` |" for k, v in sorted(tags.items())),
    ]
    return "\n".join(lines) + "\n"


def register_task(
    config_json: str,
    *,
    parent_run_id: str,
    job_id: str,
    policy: Any,
    prm: Any,
    mixture: Any,
    eval_results: Any,
    card: Any,
) -> str:
    """The component's entrypoint; returns the registered model URI (`models:/<name>/<version>`).

    Args:
        config_json: `RegisterConfig` as JSON.
        parent_run_id: the pipeline's MLflow run.
        job_id: the Kubeflow job id.
        policy: input `Model` artifact to register (the MPO policy).
        prm: input `Model` artifact of the PRM used in the evaluation (lineage).
        mixture: input `Dataset` artifact of the mix step (data manifests).
        eval_results: input `Dataset` artifact of the evaluation (`metrics.json`).
        card: output `Markdown` artifact (the model card).
    """
    from vlpipe.components.pipeline_run.model_store import checkpoint_path
    from vlpipe.components.pipeline_run.task import input_runs
    from vlpipe.components.training.task import check_preset

    config = RegisterConfig.model_validate_json(config_json)
    policy_dir = checkpoint_path(policy.path)
    check_preset(policy_dir, config.preset)
    eval_metrics = json.loads((Path(eval_results.path) / "metrics.json").read_text())
    tags = lineage_tags(
        parent_run_id=parent_run_id,
        job_id=job_id,
        policy_meta=dict(policy.metadata),
        prm_meta=dict(prm.metadata),
        mixture_meta=dict(mixture.metadata),
        eval_metrics=eval_metrics,
    )
    stage_runs = [value for key, value in tags.items() if key.startswith("run.")]
    stage_runs += input_runs(policy, prm, mixture)
    reused = record_reused(parent_run_id, stage_runs) if parent_run_id else {}
    if reused:
        log.info("results reused from earlier pipeline runs (cached tasks): %s", reused)
    result = register_model(config, policy_dir=policy_dir, tags=tags, parent_run_id=parent_run_id)
    Path(card.path).parent.mkdir(parents=True, exist_ok=True)
    Path(card.path).write_text(register_markdown(result, tags))
    return result["model_uri"]
