"""Kubeflow component of the Best-of-N evaluation (a thin shell around `vlpipe.components.evaluate.task.run_eval_task`)."""

# No `from __future__ import annotations` here: kfp reads the parameter annotations as types.
from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from vlpipe.components.release import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    config: str,
    preset: str,
    policy: Input[Model],
    prm: Input[Model],
    data: Input[Dataset],
    results: Output[Dataset],
    metrics: Output[Metrics],
    table: Output[Markdown],
    report: Output[HTML],
    n: int = -1,
    temperature: float = -1.0,
):
    """Greedy pass@1 and Best-of-N answers of the policy on the benchmarks, every step scored by the PRM.

    Args:
        config: the evaluation settings (an `EvalConfig` without policy, prm and output_dir) as JSON.
        preset: the recipe's preset (policy and PRM must be ones).
        n, temperature: the pipeline parameters `eval_n`, `eval_temperature` (-1: the recipe's value).
    """
    from vlpipe.components.evaluate.task import run_eval_task

    run_eval_task(
        config,
        preset=preset,
        policy=policy,
        prm=prm,
        data=data,
        results=results,
        metrics=metrics,
        table=table,
        report=report,
        n=n,
        temperature=temperature,
    )


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate_shard(
    config: str,
    preset: str,
    shard: str,
    policy: Input[Model],
    prm: Input[Model],
    data: Input[Dataset],
    part: Output[Dataset],
    n: int = -1,
    temperature: float = -1.0,
):
    """One shard of a sharded evaluation: the `index`-th of `count` runs of whole generation batches of a
    benchmark, its per-item results in `part` (merged by `merge-evaluation`).

    Args:
        config, preset, n, temperature: as `evaluate`.
        shard: the shard, an `EvalShard` (`{"benchmark", "index", "count"}`) as JSON.
    """
    from vlpipe.components.evaluate.task import run_eval_shard_task

    run_eval_shard_task(
        config,
        preset=preset,
        shard=shard,
        policy=policy,
        prm=prm,
        data=data,
        part=part,
        n=n,
        temperature=temperature,
    )


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def merge_evaluation(
    parts: Input[list[Dataset]],
    results: Output[Dataset],
    metrics: Output[Metrics],
    table: Output[Markdown],
    report: Output[HTML],
):
    """The metrics, Best-of-k curve, tables, plots and MLflow run of a sharded evaluation, from the union of
    its `evaluate-shard` parts: the outputs `evaluate` gives for the same items and seeds."""
    from vlpipe.components.evaluate.task import run_eval_merge_task

    run_eval_merge_task(parts=parts, results=results, metrics=metrics, table=table, report=report)
