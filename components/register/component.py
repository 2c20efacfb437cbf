"""Kubeflow component of the register step (a thin shell around `register.register_task`).

The promote and deploy steps take this step's output, the registered model URI.
"""

# No `from __future__ import annotations` here: kfp reads the parameter annotations as types.
from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Model, Output

from vlpipe.components.release import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register_model(
    config: str,
    parent_run_id: str,
    job_id: str,
    policy: Input[Model],
    prm: Input[Model],
    mixture: Input[Dataset],
    eval_results: Input[Dataset],
    card: Output[Markdown],
) -> str:
    """Register the policy in MLflow with lineage tags and the alias; returns `models:/<name>/<version>`.

    Args:
        config: `vlpipe.components.register.config.RegisterConfig` as JSON.
        parent_run_id: the pipeline's MLflow run.
        job_id: the Kubeflow job id.
    """
    from vlpipe.components.register.register import register_task

    return register_task(
        config,
        parent_run_id=parent_run_id,
        job_id=job_id,
        policy=policy,
        prm=prm,
        mixture=mixture,
        eval_results=eval_results,
        card=card,
    )
