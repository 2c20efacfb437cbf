"""Kubeflow components of the PRM: its base (`critic`, more SFT from the policy's SFT checkpoint), on-policy
step-labelled data (`sample-prm-data`) and the `prm` training stage (thin shells around
`components.prm.pipeline_step` and `components.training.kfp_entry`)."""

# No `from __future__ import annotations` here: kfp reads the parameter annotations as types.
from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.release import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def critic(
    config: str,
    preset: str,
    parent_run_id: str,
    run_key: str,
    work_root: str,
    world_size: int,
    init_model: Input[Model],
    data: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
):
    """The PRM's base: SFT continued from the policy's SFT checkpoint (a critic stronger than the policy).

    Args:
        config: the recipe's `critic.config` (an `SFTStageConfig` without the pipeline's paths) as JSON.
        preset: the recipe's preset (the starting checkpoint must be one).
        parent_run_id: the pipeline's MLflow run.
        run_key: the pipeline job's id (names the resumable work directory).
        work_root: the work volume's mount path ("" locally: under VLPIPE_HOME).
        world_size: training processes (GPUs) on the node.
    """
    from components.training.kfp_entry import run_training_step

    run_training_step(
        "critic",
        config,
        preset=preset,
        parent_run_id=parent_run_id,
        run_key=run_key,
        work_root=work_root,
        world_size=world_size,
        init_model=init_model,
        data=data,
        model=model,
        metrics=metrics,
    )


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def sample_prm_data(
    config: str,
    step: str,
    preset: str,
    parent_run_id: str,
    policy: Input[Model],
    data: Input[Dataset],
    steps: Output[Dataset],
    metrics: Output[Metrics],
):
    """On-policy PRM data: N sampled solutions per source item from the policy, every step labelled.

    Args:
        config: the recipe's `prm_data.config` (a `PRMSampleConfig` without policy and output) as JSON.
        step: the recipe name and tracking settings as JSON.
        preset: the recipe's preset (the policy must be one).
        parent_run_id: the pipeline's MLflow run.
    """
    from components.prm.pipeline_step import run_prm_data_step

    run_prm_data_step(
        config,
        step,
        preset=preset,
        parent_run_id=parent_run_id,
        policy=policy,
        data=data,
        steps=steps,
        metrics=metrics,
    )


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prm(
    config: str,
    preset: str,
    parent_run_id: str,
    run_key: str,
    work_root: str,
    world_size: int,
    init_model: Input[Model],
    data: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    steps: Input[Dataset] = None,
):
    """Process reward model training on step-labelled solutions (VisualPRM format).

    Args:
        config: the stage settings (a `PRMStageConfig` without the pipeline's paths) as JSON.
        preset: the recipe's preset (the starting checkpoint must be one).
        parent_run_id: the pipeline's MLflow run.
        run_key: the pipeline job's id (names the resumable work directory).
        work_root: the work volume's mount path ("" locally: under VLPIPE_HOME).
        world_size: training processes (GPUs) on the node.
        steps: the `sample-prm-data` output (on-policy solutions); without it, the prepared `prm/train.jsonl`.
    """
    from components.training.kfp_entry import run_training_step

    run_training_step(
        "prm",
        config,
        preset=preset,
        parent_run_id=parent_run_id,
        run_key=run_key,
        work_root=work_root,
        world_size=world_size,
        init_model=init_model,
        data=data,
        model=model,
        metrics=metrics,
        steps=steps,
    )
