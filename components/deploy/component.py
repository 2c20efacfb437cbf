"""Kubeflow component of the deploy step (a thin shell around `deploy.deploy_task`).

The pipelines add it only when the recipe enables deployment, inside
`dsl.If(promote_task.outputs["Output"] == "promoted")`.
"""

# No `from __future__ import annotations` here: kfp reads the parameter annotations as types.
from kfp import dsl
from kfp.dsl import Markdown, Output

from vlpipe.components.release import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def deploy_model(config: str, parent_run_id: str, model_uri: str, report: Output[Markdown]) -> str:
    """Serve the champion with KServe: create its InferenceService or roll it out as a canary.

    Args:
        config: `vlpipe.components.deploy.config.DeployConfig` as JSON.
        parent_run_id: the pipeline's MLflow run.
        model_uri: the promoted version, `models:/<name>/<version>`.

    Returns:
        `created` or `rolled_out` (a failed rollout is rolled back and fails the step).
    """
    from vlpipe.components.deploy.deploy import deploy_task

    return deploy_task(config, parent_run_id=parent_run_id, model_uri=model_uri, report=report)
