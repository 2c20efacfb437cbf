"""Kubeflow components that open and close the pipeline's MLflow parent run (thin shells)."""

# No `from __future__ import annotations` here: kfp reads the parameter annotations as types.
from kfp import dsl
from kfp.dsl import Artifact, Output

from vlpipe.components.release import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def start_pipeline_run(
    tracking: str,
    pipeline: str,
    recipe: str,
    parent_run_id: str,
    job_id: str,
    job_name: str,
    run: Output[Artifact],
    pipeline_version: str = "",
    experiment: str = "",
) -> str:
    """Open (or adopt) the pipeline's MLflow parent run; returns its id for every later step.

    Args:
        tracking: the recipe's `TrackingSettings` as JSON.
        pipeline: the pipeline's name.
        recipe: the recipe's name.
        parent_run_id: a run to adopt (local runs), or empty.
        job_id, job_name: the Kubeflow job's id and name.
        run: where the run's parent run id is written; its URI names the run's artifact root, by which the
            cacheable tasks (which take no per-run input) find the parent run.
        pipeline_version: the pipeline's version (`<package>+<commit12>.<digest12>`), when the submitter set it.
        experiment: the pipeline parameter `mlflow_experiment` ("": the recipe's `tracking.experiment`).
    """
    from vlpipe.components.pipeline_run.task import start_run_task

    return start_run_task(
        tracking,
        pipeline=pipeline,
        recipe=recipe,
        parent_run_id=parent_run_id,
        job_id=job_id,
        job_name=job_name,
        pipeline_version=pipeline_version,
        run=run,
        experiment=experiment,
    )


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def finish_pipeline_run(parent_run_id: str, job_id: str, status: dsl.PipelineTaskFinalStatus):
    """Exit handler: close the parent run with the pipeline's final state."""
    from vlpipe.components.pipeline_run.task import finish_run_task

    finish_run_task(
        parent_run_id=parent_run_id, job_id=job_id, state=status.state, error=status.error_message
    )
