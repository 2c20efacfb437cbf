"""Kubeflow component of the `mpo` stage (a thin shell around `vlpipe.components.training.task`)."""

# No `from __future__ import annotations` here: kfp reads the parameter annotations as types.
from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from vlpipe.components.release import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def mpo(
    config: str,
    preset: str,
    work_root: str,
    world_size: int,
    init_model: Input[Model],
    data: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Mixed preference optimisation (DPO + BCO + LM) against the frozen starting policy.

    Args:
        config: the stage settings (an `MPOStageConfig` without the pipeline's paths) as JSON.
        preset: the recipe's preset (the starting checkpoint must be one).
        work_root: the work volume's mount path ("" locally: under VLPIPE_HOME).
        world_size: training processes (GPUs) on the node.
    """
    from vlpipe.components.training.task import run_training_task

    run_training_task(
        "mpo",
        config,
        preset=preset,
        work_root=work_root,
        world_size=world_size,
        init_model=init_model,
        data=data,
        model=model,
        metrics=metrics,
    )
