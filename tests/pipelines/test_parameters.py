"""Pipeline parameters: the settings teams vary, typed Kubeflow inputs with the recipe's values as defaults."""

from __future__ import annotations

import json

import pytest

from tests.pipelines.ir import body_tasks, load_ir, sub_dag_tasks
from vlpipe.components.training.task import PLACEHOLDERS, wire_task_config
from vlpipe.pipelines.compile import compile_recipe
from vlpipe.pipelines.config import load_recipe
from vlpipe.pipelines.dag import RECIPE_PIPELINE, SFT_MPO_PIPELINE, build_pipelines, typed_arguments
from vlpipe.pipelines.parameters import recipe_parameters

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_the_compiled_recipe_exposes_the_parameters_with_the_recipe_defaults(tmp_path):
    recipe = load_recipe("internvl3-8b")
    spec, _ = load_ir(compile_recipe(recipe, tmp_path, commit=COMMIT)[RECIPE_PIPELINE])
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["sft_lr"]["defaultValue"] == 2e-5 and inputs["sft_lr"]["parameterType"] == "NUMBER_DOUBLE"
    assert (
        inputs["sft_lr"]["description"]
        == "stages.sft.config.trainer.optimizer.lr (default: the recipe's value)."
    )
    assert (
        inputs["mpo_lr"]["defaultValue"] == 2e-7
        and inputs["pretrain_global_batch_size"]["defaultValue"] == 256
    )
    assert inputs["sft_max_steps"]["defaultValue"] == 0  # the recipe trains 1 epoch: no step count
    assert inputs["eval_n"]["defaultValue"] == 8 and inputs["eval_n"]["parameterType"] == "NUMBER_INTEGER"
    assert inputs["eval_temperature"]["defaultValue"] == 0.7
    assert inputs["gate_best_of_n_tolerance"]["defaultValue"] == 0.01
    assert inputs["gate_pass_at_1_tolerance"]["defaultValue"] == 0.0
    assert inputs["mlflow_experiment"]["defaultValue"] == "internvl3-8b"
    assert inputs["data_root"]["defaultValue"] == "s3://vlpipe-data/internvl3"
    tasks = body_tasks(spec)
    sft = tasks["sft"]["inputs"]["parameters"]
    assert sft["lr"] == {"componentInputParameter": "pipelinechannel--sft_lr"}
    assert sft["global_batch_size"] == {"componentInputParameter": "pipelinechannel--sft_global_batch_size"}
    loop = next(task for name, task in tasks.items() if name.startswith("for-loop-"))  # the eval shards
    assert sub_dag_tasks(spec, loop)["evaluate-shard"]["inputs"]["parameters"]["n"] == {
        "componentInputParameter": "pipelinechannel--eval_n"
    }
    assert tasks["prepare-data"]["inputs"]["parameters"]["data_root"] == {
        "componentInputParameter": "pipelinechannel--data_root"
    }
    assert tasks["start-pipeline-run"]["inputs"]["parameters"]["experiment"] == {
        "componentInputParameter": "pipelinechannel--mlflow_experiment"
    }
    names = {p.name for p in recipe_parameters(recipe, {"start", "data", "sft", "mpo", "eval", "promote"})}
    assert {"sft_lr", "mpo_max_steps", "eval_temperature", "gate_best_of_n_tolerance"} <= names
    assert not any(name.startswith("pretrain_") for name in names)  # only the pipeline's own stages


def test_sub_pipelines_take_only_their_stages_parameters():
    pipelines = build_pipelines(load_recipe("tiny"), commit=COMMIT, version="v")
    inputs = set(pipelines[SFT_MPO_PIPELINE].component_spec.inputs)
    assert {"checkpoint_uri", "sft_lr", "mpo_lr", "mlflow_experiment"} <= inputs
    assert not {"pretrain_lr", "eval_n", "prm_lr"} & inputs


def test_parameter_values_are_typed_and_unknown_names_refused():
    pipeline = build_pipelines(load_recipe("tiny"), commit=COMMIT, version="v")[RECIPE_PIPELINE]
    assert typed_arguments(pipeline, {"sft_lr": "1e-4", "eval_n": "4", "mlflow_experiment": "x"}) == {
        "sft_lr": 1e-4,
        "eval_n": 4,
        "mlflow_experiment": "x",
    }
    with pytest.raises(
        ValueError, match="has no parameter 'sft_learning_rate'; its parameters: parent_run_id"
    ):
        typed_arguments(pipeline, {"sft_learning_rate": "1"})
    with pytest.raises(ValueError, match="parameter eval_n='four': not a Integer"):
        typed_arguments(pipeline, {"eval_n": "four"})


def _wire(stage: str, **parameters):
    recipe = load_recipe("tiny")
    return wire_task_config(
        stage,
        recipe.stage_settings(stage),
        parameters={"lr": -1, "max_steps": -1, "global_batch_size": -1, **parameters},
        init=PLACEHOLDERS["init"],
        output=PLACEHOLDERS["output"],
        work_dir=PLACEHOLDERS["work_dir"],
        data_file=PLACEHOLDERS["data"],
        parent_run_id=None,
    )


def test_a_task_applies_its_parameters_and_validates_them_with_the_stage_class():
    recipe = load_recipe("tiny")
    unchanged = _wire("mpo")
    assert unchanged == recipe.stage_config("mpo")  # -1: the recipe's values
    changed = _wire("mpo", lr=5e-4, max_steps=3, global_batch_size=8)
    assert (changed.trainer.optimizer.lr, changed.trainer.max_steps, changed.trainer.global_batch_size) == (
        5e-4,
        3,
        8,
    )
    epochs = _wire("sft", max_steps=0).trainer  # 0: the epochs decide (tiny counts steps: one epoch)
    assert (epochs.max_steps, epochs.epochs) == (None, 1)
    with pytest.raises(
        ValueError, match=r"(?s)mpo: invalid settings with the pipeline parameters \{'mpo_lr': -0\.5\}: .*lr"
    ):
        _wire("mpo", lr=-0.5)
    with pytest.raises(ValueError, match=r"(?s)'mpo_global_batch_size': 3\}.*global_batch_size"):
        _wire("mpo", global_batch_size=3)  # tiny's MPO micro-batch of 4 does not divide it


def test_the_evaluate_and_promote_tasks_name_a_bad_parameter(tmp_path):
    from types import SimpleNamespace

    from vlpipe.components.promote.promote import promote_task

    config = load_recipe("tiny").promote_config().model_dump_json()
    with pytest.raises(ValueError, match=r"(?s)gate_best_of_n_tolerance': -0\.5.*tolerance"):
        promote_task(
            config,
            parent_run_id="",
            model_uri="models:/m/1",
            report=SimpleNamespace(path=str(tmp_path / "r.md"), metadata={}),
            tolerances={"best_of_n": -0.5},
        )
    assert json.loads(config)["promotion"]["gates"][0]["metric"] == "best_of_n"
