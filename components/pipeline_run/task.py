"""What the `start-pipeline-run` and `finish-pipeline-run` components call: the pipeline's MLflow parent run
(`vlpipe.tracking.pipeline`) opened from the recipe's tracking settings, and closed with the final state."""

from __future__ import annotations

from vlpipe.components.pipeline_run.config import TrackingSettings
from vlpipe.tracking.pipeline import finish_parent_run, start_parent_run


def start_run_task(
    tracking_json: str,
    *,
    pipeline: str,
    recipe: str,
    parent_run_id: str,
    job_id: str,
    job_name: str,
    pipeline_version: str = "",
) -> str:
    """Open (or adopt) the parent run; returns its id. See `vlpipe.tracking.pipeline.start_parent_run`."""
    return start_parent_run(
        TrackingSettings.model_validate_json(tracking_json),
        pipeline=pipeline,
        recipe=recipe,
        parent_run_id=parent_run_id,
        job_id=job_id,
        job_name=job_name,
        pipeline_version=pipeline_version,
    )


def finish_run_task(*, parent_run_id: str, job_id: str, state: str, error: str | None) -> None:
    """Close the parent run with the pipeline's final state. See `vlpipe.tracking.pipeline.finish_parent_run`."""
    finish_parent_run(parent_run_id=parent_run_id, job_id=job_id, state=state, error=error)
