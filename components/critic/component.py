"""Kubeflow component of the `critic` stage: the PRM's base, SFT continued from the policy's SFT checkpoint (a thin
shell around `vlpipe.components.training.task`)."""

# No `from __future__ import annotations` here: kfp reads the parameter annotations as types.
from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from vlpipe.components.release import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def critic(
    config: str,
    preset: str,
    work_root: str,
    world_size: int,
    init_model: Input[Model],
    data: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    lr: float = -1.0,
    max_steps: int = -1,
    global_batch_size: int = -1,
    launch: str = "",
):
    """The PRM's base: SFT continued from the policy's SFT checkpoint (a critic stronger than the policy).

    Args:
        config: the recipe's `critic.config` (an `SFTStageConfig` without the pipeline's paths) as JSON.
        preset: the recipe's preset (the starting checkpoint must be one).
        work_root: the work volume's mount path ("" locally: under VLPIPE_HOME).
        world_size: training processes (GPUs) on the node.
        lr, max_steps, global_batch_size: the pipeline parameters of this stage (-1: the recipe's value).
        launch: the stage's TrainJob settings when it trains on several nodes ("": on this step's node).
    """
    from vlpipe.components.training.task import run_training_task

    run_training_task(
        "critic",
        config,
        preset=preset,
        work_root=work_root,
        world_size=world_size,
        init_model=init_model,
        data=data,
        model=model,
        metrics=metrics,
        lr=lr,
        max_steps=max_steps,
        global_batch_size=global_batch_size,
        launch=launch,
    )
