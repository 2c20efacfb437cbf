"""Every shipped recipe validates; wrong recipes fail at load time with the key in the message."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from pipelines.config import PipelineConfig, list_recipes, load_recipe, recipe_path

SHIPPED = ("internvl3-1b", "internvl3-2b", "internvl3-8b", "small", "tiny")


def _raw(name: str) -> dict:
    return yaml.safe_load(recipe_path(name).read_text())


def _invalid(raw: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        PipelineConfig.model_validate(raw)


def test_the_shipped_recipes_are_the_five_of_the_issue():
    assert tuple(list_recipes()) == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_validates_with_every_stage_class(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    for stage in ("pretrain", "sft", "mpo", "prm"):
        cfg = recipe.stage_config(stage)  # the stage's own class, with placeholder paths
        assert cfg.stage == stage and cfg.tracking.experiment == recipe.tracking.experiment
        assert cfg.tracking.recipe == name
    assert recipe.eval_config().n >= 2
    assert recipe.mix_config().mixtures[0].stage == "pretrain"


@pytest.mark.parametrize("name", ["internvl3-1b", "internvl3-2b", "internvl3-8b"])
def test_paper_recipes_use_gpus_bf16_checkpointing_and_composed_init(name):
    recipe = load_recipe(name)
    assert recipe.init.composed and recipe.data.source == "meta"
    for stage in ("pretrain", "sft", "mpo", "prm"):
        step = getattr(recipe.stages, stage)
        trainer = recipe.stage_config(stage).trainer
        assert step.resources.gpus == 8
        assert trainer.precision == "bf16" and trainer.gradient_checkpointing
        assert trainer.accumulation_steps(8) >= 1
    mpo = recipe.stage_config("mpo")
    assert mpo.trainer.optimizer.lr == 2e-7 and mpo.trainer.global_batch_size == 256
    assert (mpo.mpo.preference_weight, mpo.mpo.quality_weight, mpo.mpo.generation_weight) == (0.8, 0.2, 1.0)
    assert recipe.eval_config().n == 8
    assert recipe.cluster.work_volume is not None and recipe.cluster.tolerations


def test_8b_uses_zero3():
    recipe = load_recipe("internvl3-8b")
    assert {
        recipe.stage_config(s).trainer.distributed.zero_stage for s in ("pretrain", "sft", "mpo", "prm")
    } == {3}


def test_unknown_recipe_names_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match="tiny"):
        load_recipe("nope")


def test_recipe_file_path_is_accepted(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(Path(recipe_path("tiny")).read_text())
    assert load_recipe(path).name == "tiny"


def test_recipes_are_frozen():
    recipe = load_recipe("tiny")
    with pytest.raises(ValidationError):
        recipe.preset = "small"


def test_unknown_keys_fail_at_every_level():
    raw = _raw("tiny")
    _invalid({**raw, "typo": 1}, "typo")
    bad = copy.deepcopy(raw)
    bad["stages"]["sft"]["config"]["trainer"]["max_stepz"] = 3
    _invalid(bad, "stages.sft.config.*max_stepz")
    bad = copy.deepcopy(raw)
    bad["eval"]["config"]["temprature"] = 0.5
    _invalid(bad, "eval.config.*temprature")


def test_pipeline_owned_keys_are_rejected():
    for stage, key, value in [("sft", "init", "/x"), ("mpo", "output", "/y"), ("prm", "work_dir", "/z")]:
        bad = _raw("tiny")
        bad["stages"][stage]["config"][key] = value
        _invalid(bad, f"stages.{stage}.config sets .*{key}")
    bad = _raw("tiny")
    bad["stages"]["pretrain"]["config"]["data"]["meta"] = "/my/meta.json"
    _invalid(bad, "data.meta")
    bad = _raw("tiny")
    bad["stages"]["sft"]["config"]["tracking"] = {"parent_run_id": "abc"}
    _invalid(bad, "tracking.parent_run_id")
    bad = _raw("tiny")
    bad["eval"]["config"]["policy"] = "/my/model"
    _invalid(bad, "eval.config sets .*policy")


def test_preset_and_init_must_agree():
    bad = _raw("tiny")
    bad["init"] = {"vision": "/v", "llm": "/l"}
    _invalid(bad, "initialised randomly")
    bad = _raw("internvl3-1b")
    bad["init"] = {"seed": 0}
    _invalid(bad, "set init.vision and init.llm")
    bad = _raw("tiny")
    bad["preset"] = "3b"
    _invalid(bad, "unknown model preset")


def test_global_batch_must_divide_over_the_gpus():
    bad = _raw("internvl3-8b")
    bad["stages"]["mpo"]["config"]["trainer"]["global_batch_size"] = 12  # 12 pairs over 8 GPUs x micro 1
    _invalid(bad, "stages.mpo.*not divisible")


def test_bf16_needs_gpus():
    bad = _raw("tiny")
    bad["stages"]["sft"]["config"]["trainer"]["precision"] = "bf16"
    _invalid(bad, "bf16 needs GPUs")


def test_eval_and_prm_must_agree():
    bad = _raw("tiny")
    bad["eval"]["config"]["n"] = 1
    _invalid(bad, "n must be at least 2")
    bad = _raw("tiny")
    bad["eval"]["config"]["max_length"] = 4096  # the PRM trained on 512-token conversations
    _invalid(bad, "exceeds the PRM's training length")
    bad = _raw("tiny")
    bad["eval"]["config"]["dtype"] = "bfloat16"
    _invalid(bad, "need GPUs")


def test_retries_need_the_work_volume():
    bad = _raw("tiny")
    bad["stages"]["sft"]["resources"] = {"retries": 2}
    _invalid(bad, "retries needs cluster.work_volume")


def test_credentials_cannot_be_written_into_a_recipe():
    bad = _raw("internvl3-8b")
    bad["cluster"]["env"]["AWS_SECRET_ACCESS_KEY"] = "hunter2"
    _invalid(bad, "looks like a credential")
    bad = _raw("internvl3-8b")
    bad["cluster"]["tracking_uri"] = "http://admin:hunter2@mlflow:5000"
    _invalid(bad, "user info")
    bad = _raw("internvl3-8b")
    bad["cluster"]["env"]["MLFLOW_TRACKING_URI"] = "http://elsewhere:5000"
    _invalid(bad, "set by the pipeline")


def test_demo_source_needs_relative_paths_and_meta_source_a_root():
    bad = _raw("tiny")
    bad["data"]["sft_meta"] = "/abs/meta.json"
    _invalid(bad, "relative to the demo root")
    bad = _raw("internvl3-1b")
    del bad["data"]["root"]
    _invalid(bad, "data.root is required")
