"""Kubeflow component of the `prm-data` stage (`sample-prm-data` task): on-policy step-labelled data for the PRM (a
thin shell around `vlpipe.components.prm_data.task`)."""

# No `from __future__ import annotations` here: kfp reads the parameter annotations as types.
from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from vlpipe.components.release import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def sample_prm_data(
    config: str,
    step: str,
    preset: str,
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
    """
    from vlpipe.components.prm_data.task import run_prm_data_task

    run_prm_data_task(
        config,
        step,
        preset=preset,
        policy=policy,
        data=data,
        steps=steps,
        metrics=metrics,
    )


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def sample_prm_data_shard(
    config: str,
    preset: str,
    index: int,
    count: int,
    policy: Input[Model],
    data: Input[Dataset],
    part: Output[Dataset],
):
    """One shard of on-policy PRM data: the `index`-th of `count` runs of whole generation batches, into
    `part` (merged by `merge-prm-data`).

    Args:
        config, preset: as `sample-prm-data`.
        index, count: the shard.
    """
    from vlpipe.components.prm_data.task import run_prm_data_shard_task

    run_prm_data_shard_task(
        config, preset=preset, index=index, count=count, policy=policy, data=data, part=part
    )


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def merge_prm_data(
    step: str,
    parts: Input[list[Dataset]],
    data: Input[Dataset],
    steps: Output[Dataset],
    metrics: Output[Metrics],
):
    """The step-labelled JSONL of a sharded `sample-prm-data` from its parts (in shard order, then the
    includes), with the counts and MLflow run `sample-prm-data` gives.

    Args:
        step: as `sample-prm-data`.
    """
    from vlpipe.components.prm_data.task import run_prm_data_merge_task

    run_prm_data_merge_task(step, parts=parts, data=data, steps=steps, metrics=metrics)
