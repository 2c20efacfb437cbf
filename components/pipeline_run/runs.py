"""MLflow runs of a pipeline run: one parent run, one child run per step.

The parent run is opened by the first step (`start_parent_run`) or, for local runs, by `vlpipe run --local`
before the pipeline starts (the step then adopts it); it carries the Kubeflow job id as a tag, so the exit
handler (`finish_parent_run`) finds and closes it whether the body succeeded or failed. Steps that are not
training stages (data, init, mix, register) record their work in a child run (`child_run`); the training
stages and the evaluation nest their own runs under the parent through their `parent_run_id` settings.

The tracking URI comes from `MLFLOW_TRACKING_URI` (default: the local sqlite store under VLPIPE_HOME).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from components.pipeline_run.config import TrackingSettings
from components.training.tracking import ensure_experiment, git_commit, tracking_uri

log = logging.getLogger(__name__)
JOB_ID_TAG = "kfp.pipeline_job_id"
JOB_NAME_TAG = "kfp.pipeline_job_name"
PIPELINE_TAG = "vlpipe.pipeline"
RECIPE_TAG = "recipe"
_FINAL_STATES = {"SUCCEEDED": "FINISHED", "FAILED": "FAILED", "CANCELLED": "KILLED", "CANCELED": "KILLED"}


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri())


def base_tags(recipe: str) -> dict[str, str]:
    """Tags every vlpipe run carries: recipe, source commit and package version."""
    from components.release import VERSION

    return {RECIPE_TAG: recipe, "git_commit": git_commit(), "vlpipe_version": VERSION}


def start_parent_run(
    tracking: TrackingSettings,
    *,
    pipeline: str,
    recipe: str,
    parent_run_id: str = "",
    job_id: str = "",
    job_name: str = "",
) -> str:
    """Open the pipeline's parent run, or adopt the given one; returns its id.

    Idempotent: a retried first step finds the run already tagged with `job_id` and returns it.

    Args:
        tracking: the recipe's tracking settings (experiment, tags).
        pipeline: the pipeline's name (tag `vlpipe.pipeline`, and the run name).
        recipe: the recipe name (tag `recipe`).
        parent_run_id: an existing run to adopt (set by `vlpipe run --local`); empty to create one.
        job_id, job_name: the Kubeflow job's id and name (tags; the exit handler finds the run by the id).

    Raises:
        mlflow.exceptions.MlflowException: when `parent_run_id` does not exist or the server is unreachable.
    """
    client = _client()
    tags = {**base_tags(recipe), **tracking.tags, PIPELINE_TAG: pipeline}
    if job_id:
        tags[JOB_ID_TAG] = job_id
    if job_name:
        tags[JOB_NAME_TAG] = job_name
    if parent_run_id:
        client.get_run(parent_run_id)  # fails clearly for a wrong id
        for key, value in tags.items():
            client.set_tag(parent_run_id, key, value)
        return parent_run_id
    experiment_id = ensure_experiment(tracking.experiment)
    if job_id:
        existing = client.search_runs(
            [experiment_id], filter_string=f"tags.`{JOB_ID_TAG}` = '{job_id}'", max_results=1
        )
        if existing:
            return existing[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"{pipeline}-{recipe}", tags=tags)
    return run.info.run_id


def finish_parent_run(*, parent_run_id: str, job_id: str, state: str, error: str | None = None) -> str | None:
    """Close the parent run with the pipeline's final state (SUCCEEDED → FINISHED, FAILED → FAILED).

    Args:
        parent_run_id: the parent run, when known; else it is looked up by the `job_id` tag.
        job_id: the Kubeflow job id the first step tagged the run with.
        state: the body's final state as Kubeflow reports it.
        error: the error message of a failed body (tag `error`).

    Returns:
        The closed run's id, or None when no parent run was opened (the first step failed early).
    """
    client = _client()
    run_id = parent_run_id or None
    if run_id is None and job_id:
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            filter_string=f"tags.`{JOB_ID_TAG}` = '{job_id}'",
            max_results=1,
        )
        run_id = runs[0].info.run_id if runs else None
    if run_id is None:
        log.warning("no MLflow parent run found for job %s; nothing to close", job_id)
        return None
    status = _FINAL_STATES.get(state.upper(), "FAILED")
    client.set_tag(run_id, "pipeline_state", state)
    if error:
        client.set_tag(run_id, "error", error[:5000])
    client.set_terminated(run_id, status)
    return run_id


@contextlib.contextmanager
def child_run(
    parent_run_id: str, name: str, *, experiment: str, recipe: str, tags: dict[str, str] | None = None
) -> Iterator[str]:
    """An active MLflow run named `name` nested under `parent_run_id` (fluent API: `mlflow.log_*` work).

    The run goes into the parent's experiment (where MLflow shows nested runs); without a parent it is a
    top-level run in `experiment`. It ends FAILED when the body raises.

    Yields:
        The run id.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    if parent_run_id:
        experiment_id = _client().get_run(parent_run_id).info.experiment_id
    else:
        experiment_id = ensure_experiment(experiment)
    run_tags = {**base_tags(recipe), "stage": name, **(tags or {})}
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=name, parent_run_id=parent_run_id or None, tags=run_tags
    ) as run:
        yield run.info.run_id
