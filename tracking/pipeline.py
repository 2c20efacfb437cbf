"""The MLflow parent run of a pipeline run.

The parent run is opened by the first step (`start_parent_run`) or, for local runs, by `vlpipe run --local`
before the pipeline starts (the step then adopts it); it carries the Kubeflow job id as a tag, so the exit
handler (`finish_parent_run`) finds and closes it whether the body succeeded or failed. Every other step nests
its own run under it (`vlpipe.tracking.runs`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from vlpipe.tracking.runs import base_tags, client, ensure_experiment

log = logging.getLogger(__name__)
JOB_ID_TAG = "kfp.pipeline_job_id"
JOB_NAME_TAG = "kfp.pipeline_job_name"
PIPELINE_TAG = "vlpipe.pipeline"
RUN_ROOT_TAG = "vlpipe.kfp_run_root"
"""The Kubeflow run's artifact root (where every task's outputs go): cached tasks find their parent run by it."""
START_TASK = "start-pipeline-run"
REUSED_TAG = "vlpipe.reused."
"""Prefix of the parent run's tags naming, per stage, the run of an earlier pipeline run whose cached result
this run reused (`vlpipe.reused.sft` = that stage run's id)."""
VERSION_TAG = "vlpipe.pipeline_version"
DIGEST_TAG = "vlpipe.pipeline_digest"
_FINAL_STATES = {"SUCCEEDED": "FINISHED", "FAILED": "FAILED", "CANCELLED": "KILLED", "CANCELED": "KILLED"}


def run_root(start_output_uri: str) -> str:
    """The run's artifact root: the start task's output URI up to its task's folder
    (`<root>/start-pipeline-run/run` → `<root>`, whatever the Kubeflow backend puts in `<root>`)."""
    marker = f"/{START_TASK}/"
    if marker not in start_output_uri:
        raise ValueError(f"{start_output_uri} is not an output of the {START_TASK} task")
    return start_output_uri.rsplit(marker, 1)[0]


def find_parent_run(output_uri: str) -> str:
    """The parent run of the Kubeflow run a task's output `output_uri` belongs to.

    Cacheable tasks take no per-run input (a run-specific value would make every cache key new), so they find
    their parent through their own output URI: it lies under the run root the start task tagged the parent
    run with. Each folder above the URI is tried, deepest first.

    Raises:
        LookupError: no parent run is tagged with a folder above `output_uri` (the start task did not run).
    """
    mlflow_client = client()
    experiments = [e.experiment_id for e in mlflow_client.search_experiments()]
    folder = output_uri.rstrip("/")
    while "/" in folder.rstrip("/").split("://")[-1]:
        folder = folder.rsplit("/", 1)[0]
        quoted = folder.replace("'", "\\'")
        runs = mlflow_client.search_runs(
            experiments, filter_string=f"tags.`{RUN_ROOT_TAG}` = '{quoted}'", max_results=1
        )
        if runs:
            return runs[0].info.run_id
    raise LookupError(
        f"no MLflow parent run is tagged {RUN_ROOT_TAG} with a folder above {output_uri}; the pipeline's "
        f"{START_TASK} task opens it (is MLFLOW_TRACKING_URI the one the pipeline uses?)"
    )


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
    root: str = "",
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
        root: the run's artifact root (`run_root`; tag `vlpipe.kfp_run_root`, how cached tasks find the run).

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
    if root:
        tags[RUN_ROOT_TAG] = root
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


def record_reused(parent_run_id: str, run_ids: Iterable[str]) -> dict[str, str]:
    """Tag `parent_run_id` with the stage runs among `run_ids` that belong to another pipeline run (their task's
    result came from the cache): `vlpipe.reused.<stage>` = the run id. Returns them (stage → run id).

    Args:
        parent_run_id: this pipeline run's parent run.
        run_ids: MLflow runs that produced this run's inputs (an artifact's `mlflow_run_id` and lineage).
    """
    mlflow_client = client()
    reused = {}
    for run_id in dict.fromkeys(r for r in run_ids if r):
        run = mlflow_client.get_run(run_id)
        earlier, stage = run.data.tags.get("mlflow.parentRunId"), run.data.tags.get("stage")
        if earlier and stage and earlier != parent_run_id:
            reused[stage] = run_id
            mlflow_client.set_tag(parent_run_id, f"{REUSED_TAG}{stage}", run_id)
    return reused
