"""Kubeflow component of the promote step (a thin shell around `promote.promote_task`).

Its output (`promoted`, `rejected` or `already_champion`) gates the deploy step:
`dsl.If(promote_task.outputs["Output"] == "promoted")`.
"""

# No `from __future__ import annotations` here: kfp reads the parameter annotations as types.
from kfp import dsl
from kfp.dsl import Markdown, Output

from vlpipe.components.release import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote_model(
    config: str,
    parent_run_id: str,
    model_uri: str,
    report: Output[Markdown],
    pass_at_1_tolerance: float = -1.0,
    best_of_n_tolerance: float = -1.0,
    majority_tolerance: float = -1.0,
    oracle_tolerance: float = -1.0,
) -> str:
    """Promote the registered version to `champion` if it passes every gate against the current champion.

    Args:
        config: `vlpipe.components.promote.config.PromoteConfig` as JSON.
        parent_run_id: the pipeline's MLflow run.
        model_uri: the registered version, `models:/<name>/<version>`.
        pass_at_1_tolerance, best_of_n_tolerance, majority_tolerance, oracle_tolerance: the pipeline parameters
            `gate_<metric>_tolerance` of the recipe's gates (-1: the recipe's value).

    Returns:
        The decision: `promoted`, `rejected` or `already_champion` (a rejection is not a failure).
    """
    from vlpipe.components.promote.promote import promote_task

    return promote_task(
        config,
        parent_run_id=parent_run_id,
        model_uri=model_uri,
        report=report,
        tolerances={
            "pass_at_1": pass_at_1_tolerance,
            "best_of_n": best_of_n_tolerance,
            "majority": majority_tolerance,
            "oracle": oracle_tolerance,
        },
    )
