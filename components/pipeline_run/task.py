"""What the `start-pipeline-run` and `finish-pipeline-run` components call: the pipeline's MLflow parent run
(`vlpipe.tracking.pipeline`) opened from the recipe's tracking settings, and closed with the final state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlpipe.components.pipeline_run.config import TrackingSettings
from vlpipe.tracking.pipeline import finish_parent_run, run_root, start_parent_run


def start_run_task(
    tracking_json: str,
    *,
    pipeline: str,
    recipe: str,
    parent_run_id: str,
    job_id: str,
    job_name: str,
    run: Any,
    pipeline_version: str = "",
    experiment: str = "",
) -> str:
    """Open (or adopt) the parent run; returns its id. See `vlpipe.tracking.pipeline.start_parent_run`.

    `run` (an output artifact) gets the parent run id; the run's artifact root (from its URI) is tagged on the
    parent run, so that cacheable tasks find it (`vlpipe.tracking.pipeline.find_parent_run`).
    """
    tracking = json.loads(tracking_json)
    if experiment:
        tracking["experiment"] = experiment
    run_id = start_parent_run(
        TrackingSettings.model_validate(tracking),
        pipeline=pipeline,
        recipe=recipe,
        parent_run_id=parent_run_id,
        job_id=job_id,
        job_name=job_name,
        pipeline_version=pipeline_version,
        root=run_root(run.uri),
    )
    Path(run.path).parent.mkdir(parents=True, exist_ok=True)
    Path(run.path).write_text(json.dumps({"mlflow_parent_run_id": run_id}) + "\n")
    run.metadata["mlflow_parent_run_id"] = run_id
    return run_id


def finish_run_task(*, parent_run_id: str, job_id: str, state: str, error: str | None) -> None:
    """Close the parent run with the pipeline's final state. See `vlpipe.tracking.pipeline.finish_parent_run`."""
    finish_parent_run(parent_run_id=parent_run_id, job_id=job_id, state=state, error=error)


def pipeline_parent(parent_run_id: str | None, output: Any, inputs: tuple[Any, ...] = ()) -> str:
    """`parent_run_id` when given ("" means none: a top-level run), else the parent run of the Kubeflow run that
    `output` (one of the task's output artifacts) belongs to (`vlpipe.tracking.pipeline.find_parent_run`).

    In a pipeline, the runs that produced `inputs` (input artifacts: their `mlflow_run_id` and `lineage`
    metadata) are checked too: one of an earlier pipeline run (its task came from the cache) is tagged on the
    parent run as reused (`vlpipe.tracking.pipeline.record_reused`).
    """
    if parent_run_id is not None:
        return parent_run_id
    from vlpipe.tracking.pipeline import find_parent_run, record_reused

    parent = find_parent_run(output.uri)
    record_reused(parent, input_runs(*inputs))
    return parent


def input_runs(*artifacts: Any) -> list[str]:
    """The MLflow runs behind input artifacts: each one's `mlflow_run_id` and the runs of its `lineage`."""
    runs = []
    for artifact in artifacts:
        if artifact is None:
            continue
        metadata = dict(artifact.metadata)
        runs += [
            str(metadata.get("mlflow_run_id") or ""),
            *map(str, dict(metadata.get("lineage", {})).values()),
        ]
    return [run for run in runs if run]


def write_metrics_file(metrics: Any) -> None:
    """Write a `Metrics` output artifact's values into its file too (`log_metric` only sets its metadata).

    kfp.local's cache treats an entry whose local artifact file is missing as a miss, so a task with a
    file-less `Metrics` output would never be reused.
    """
    path = Path(metrics.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(metrics.metadata), indent=2, sort_keys=True) + "\n")
