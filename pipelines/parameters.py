"""The Kubeflow pipeline parameters of a recipe: the settings a team varies between runs, editable in the
Kubeflow UI, with the recipe's values as defaults.

| parameter | recipe setting | task input |
|---|---|---|
| `mlflow_experiment` | `tracking.experiment` | start-pipeline-run `experiment` |
| `data_root` | `data.root` (recipes that read their own data) | prepare-data `data_root` |
| `<stage>_lr`, `<stage>_max_steps`, `<stage>_global_batch_size` | `stages.<stage>.config.trainer...` (and `critic`) | the stage's `lr`, `max_steps`, `global_batch_size` |
| `eval_n`, `eval_temperature` | `eval.config.n`, `eval.config.temperature` | evaluate `n`, `temperature` |
| `gate_<metric>_tolerance` | `promotion.gates[...].tolerance` | promote-model `<metric>_tolerance` |

A task validates the effective value with its stage's own config class before work starts, so a bad value typed
into the UI fails the task at once, naming the parameter and the key; the MLflow run records the value used.
`<stage>_max_steps` 0 means the recipe's epochs decide the steps. A task input the pipeline does not feed keeps its
component default (-1, or "" for strings): the compiled recipe's value. Torch- and kfp-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlpipe.pipelines.config import PipelineConfig


@dataclass(frozen=True)
class PipelineParameter:
    """One pipeline parameter.

    Attributes:
        name: the parameter's name in the pipeline (and the Kubeflow UI).
        key: the recipe setting it overrides (dotted).
        type: float, int or str.
        default: the recipe's value.
        task: the stage (stage table name) whose task takes it, or "start" for start-pipeline-run.
        input: the task input it is passed as.
    """

    name: str
    key: str
    type: type
    default: Any
    task: str
    input: str


def recipe_parameters(recipe: PipelineConfig, tasks: set[str]) -> list[PipelineParameter]:
    """The parameters of a pipeline of `recipe` that runs the stages `tasks` (stage table names; "start" too).

    Args:
        recipe: the validated recipe (its values are the defaults).
        tasks: the stages the pipeline runs.
    """
    params = [
        PipelineParameter(
            "mlflow_experiment", "tracking.experiment", str, recipe.tracking.experiment, "start", "experiment"
        )
    ]
    if "data" in tasks and recipe.data.root:
        params.append(PipelineParameter("data_root", "data.root", str, recipe.data.root, "data", "data_root"))
    for stage in recipe.trained_stages:
        if stage not in tasks:
            continue
        trainer = recipe.stage_config(stage).trainer
        where = f"{'critic' if stage == 'critic' else f'stages.{stage}'}.config.trainer"
        params += [
            PipelineParameter(
                f"{stage}_lr", f"{where}.optimizer.lr", float, trainer.optimizer.lr, stage, "lr"
            ),
            PipelineParameter(
                f"{stage}_max_steps", f"{where}.max_steps", int, trainer.max_steps or 0, stage, "max_steps"
            ),
            PipelineParameter(
                f"{stage}_global_batch_size",
                f"{where}.global_batch_size",
                int,
                trainer.global_batch_size,
                stage,
                "global_batch_size",
            ),
        ]
    if "eval" in tasks:
        evaluation = recipe.eval_config()
        params += [
            PipelineParameter("eval_n", "eval.config.n", int, evaluation.n, "eval", "n"),
            PipelineParameter(
                "eval_temperature",
                "eval.config.temperature",
                float,
                evaluation.temperature,
                "eval",
                "temperature",
            ),
        ]
    if "promote" in tasks:
        for gate in recipe.promotion.gates:
            params.append(
                PipelineParameter(
                    f"gate_{gate.metric}_tolerance",
                    f"promotion.gates.{gate.metric}.tolerance",
                    float,
                    gate.tolerance,
                    "promote",
                    f"{gate.metric}_tolerance",
                )
            )
    return params
