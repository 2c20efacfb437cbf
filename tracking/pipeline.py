"""The MLflow parent run of a pipeline run.

The parent run is opened by the first step (`start_parent_run`) or, for local runs, by `vlpipe run --local`
before the pipeline starts (the step then adopts it); it carries the Kubeflow job id as a tag, so the exit
handler (`finish_parent_run`) finds and closes it whether the body succeeded or failed. Every other step nests
its own run under it (`vlpipe.tracking.runs`).
"""

from __future__ import annotations

import logging
from typing import Any

from vlpipe.tracking.runs import base_tags, client, ensure_experiment

log = logging.getLogger(__name__)
JOB_ID_TAG = "kfp.pipeline_job_id"
JOB_NAME_TAG = "kfp.pipeline_job_name"
PIPELINE_TAG = "vlpipe.pipeline"
VERSION_TAG = "vlpipe.pipeline_version"
DIGEST_TAG = "vlpipe.pipeline_digest"
_FINAL_STATES = {"SUCCEEDED": "FINISHED", "FAILED": "FAILED", "CANCELLED": "KILLED", "CANCELED": "KILLED"}


def version_tags(pipeline_version: str) -> dict[str, str]:
    """The parent run's tags for a pipeline version `<package>+<commit12>.<digest12>` (none for "")."""
    if not pipeline_version:
        return {}
    local = pipeline_version.partition("+")[2]
    digest = local.rpartition(".")[2] if "." in local else ""
    return {VERSION_TAG: pipeline_version, **({DIGEST_TAG: digest} if digest else {})}


def start_parent_run(
    tracking: Any,
    *,
    pipeline: str,
    recipe: str,
    parent_run_id: str = "",
    job_id: str = "",
    job_name: str = "",
    pipeline_version: str = "",
) -> str:
    """Open the pipeline's parent run, or adopt the given one; returns its id.

    Idempotent: a retried first step finds the run already tagged with `job_id` and returns it.

    Args:
        tracking: the recipe's tracking settings (experiment, tags).
        pipeline: the pipeline's name (tag `vlpipe.pipeline`, and the run name).
        recipe: the recipe name (tag `recipe`).
        parent_run_id: an existing run to adopt (set by `vlpipe run --local`); empty to create one.
        job_id, job_name: the Kubeflow job's id and name (tags; the exit handler finds the run by the id).
        pipeline_version: the compiled pipeline's version (tags `vlpipe.pipeline_version` and, its digest part,
            `vlpipe.pipeline_digest`).

    Raises:
        mlflow.exceptions.MlflowException: when `parent_run_id` does not exist or the server is unreachable.
    """
    mlflow_client = client()
    tags = {**base_tags(recipe), **tracking.tags, PIPELINE_TAG: pipeline}
    if job_id:
        tags[JOB_ID_TAG] = job_id
    if job_name:
        tags[JOB_NAME_TAG] = job_name
    tags.update(version_tags(pipeline_version))
    if parent_run_id:
        mlflow_client.get_run(parent_run_id)  # fails clearly for a wrong id
        for key, value in tags.items():
            mlflow_client.set_tag(parent_run_id, key, value)
        return parent_run_id
    experiment_id = ensure_experiment(tracking.experiment)
    if job_id:
        existing = mlflow_client.search_runs(
            [experiment_id], filter_string=f"tags.`{JOB_ID_TAG}` = '{job_id}'", max_results=1
        )
        if existing:
            return existing[0].info.run_id
    run = mlflow_client.create_run(experiment_id, run_name=f"{pipeline}-{recipe}", tags=tags)
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
    mlflow_client = client()
    run_id = parent_run_id or None
    if run_id is None and job_id:
        runs = mlflow_client.search_runs(
            [e.experiment_id for e in mlflow_client.search_experiments()],
            filter_string=f"tags.`{JOB_ID_TAG}` = '{job_id}'",
            max_results=1,
        )
        run_id = runs[0].info.run_id if runs else None
    if run_id is None:
        log.warning("no MLflow parent run found for job %s; nothing to close", job_id)
        return None
    status = _FINAL_STATES.get(state.upper(), "FAILED")
    mlflow_client.set_tag(run_id, "pipeline_state", state)
    if error:
        mlflow_client.set_tag(run_id, "error", error[:5000])
    mlflow_client.set_terminated(run_id, status)
    return run_id
