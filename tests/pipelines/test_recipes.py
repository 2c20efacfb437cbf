"""Every shipped recipe validates; wrong recipes fail at load time with the key in the message."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from pydantic import ValidationError

from vlpipe.pipelines.config import PipelineConfig, list_recipes, load_recipe, read_recipe, recipe_path

SHIPPED = ("internvl3-1b", "internvl3-2b", "internvl3-8b", "small", "tiny")


def _raw(name: str) -> dict:
    return read_recipe(name)  # the recipe's settings, its base chain merged


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


@pytest.mark.parametrize("name", SHIPPED)
def test_every_recipe_ships_promotion_gates_and_deploys_only_on_a_cluster(name):
    recipe = load_recipe(name)
    assert {gate.metric for gate in recipe.promotion.gates} == {"best_of_n", "pass_at_1"}
    assert recipe.promote_config().promotion == recipe.promotion
    if name in ("tiny", "small"):  # no cluster with KServe locally
        assert not recipe.deploy.enabled
        return
    assert recipe.deploy.enabled
    service = recipe.deploy_config().deploy.serving_deployment()  # validated with the deploy step's class
    assert (
        service.name == name
        and service.gpus == 1
        and service.s3.endpoint_url == (recipe.cluster.env["AWS_ENDPOINT_URL"])
    )


def test_promotion_gates_must_name_recorded_metrics_once():
    bad = _raw("tiny")
    bad["promotion"] = {"gates": [{"metric": "accuracy"}]}
    _invalid(bad, "unknown metrics \\['accuracy'\\]")
    bad["promotion"] = {"gates": [{"metric": "pass_at_1"}, {"metric": "pass_at_1", "tolerance": 0.1}]}
    _invalid(bad, "one gate per metric")
    bad["promotion"] = {"gates": [{"metric": "pass_at_1", "minimum": 30}]}
    _invalid(bad, "pass_at_1.minimum must be an accuracy")
    bad["promotion"] = {"gates": [{"metric": "pass_at_1", "tolrance": 0.1}]}
    _invalid(bad, "tolrance")


def test_deploy_settings_are_validated_with_the_serving_classes():
    bad = _raw("internvl3-1b")
    bad["deploy"]["service"]["gpu"] = 1
    _invalid(bad, "deploy.service: gpu: Extra inputs")
    bad = _raw("internvl3-1b")
    bad["deploy"]["service"]["name"] = "InternVL3_1B"
    _invalid(bad, "deploy.service: name")
    bad = _raw("internvl3-1b")
    bad["deploy"]["service"]["canary_traffic_percent"] = 10
    _invalid(bad, "the rollout sets it")
    bad = _raw("internvl3-1b")
    bad["deploy"]["canary"] = {"steps": [50, 10, 100]}
    _invalid(bad, "canary.steps must increase")
    bad["deploy"]["canary"] = {"steps": [10, 50]}
    _invalid(bad, "end at 100")


def test_deploy_needs_s3_storage_the_cluster_registry_and_the_pipeline_s3():
    bad = _raw("internvl3-1b")
    del bad["deploy"]["artifacts_destination"]
    _invalid(bad, "deploy needs S3 storage")
    fixed = copy.deepcopy(bad)
    fixed["deploy"]["service"]["storage_uri"] = "s3://models/internvl3-1b/mpo"
    assert PipelineConfig.model_validate(fixed).deploy_config().deploy.serving_deployment().storage_uri == (
        "s3://models/internvl3-1b/mpo"
    )
    fixed["deploy"]["service"]["storage_uri"] = "/local/checkpoint"
    _invalid(fixed, "storage_uri")
    bad = _raw("internvl3-1b")
    del bad["cluster"]["tracking_uri"]
    _invalid(bad, "deploy.enabled needs cluster.tracking_uri")
    bad = _raw("internvl3-1b")
    bad["deploy"]["service"]["s3"]["use_https"] = True
    _invalid(bad, "must read the S3 the pipeline writes")
    # Disabled deployment needs no cluster (tiny, small).
    tiny = _raw("tiny")
    tiny["deploy"] = {"enabled": False, "service": {"name": "vlpipe-tiny"}}
    assert not PipelineConfig.model_validate(tiny).deploy.enabled


def test_on_policy_prm_data_is_validated_with_the_sampler_config():
    recipe = load_recipe("tiny")
    cfg = recipe.prm_data_config()  # PRMSampleConfig with placeholder policy and output
    assert cfg.labeler == "final_answer" and cfg.source == "/pipeline/data/reasoning/prm.jsonl"
    settings, step = recipe.prm_data_settings()
    assert settings == recipe.prm_data.config and step.recipe == "tiny"
    assert step.tracking == recipe.tracking
    raw = _raw("tiny")
    bad = copy.deepcopy(raw)
    bad["prm_data"]["config"]["policy"] = "/somewhere"
    _invalid(bad, r"prm_data.config sets \['policy'\]; the pipeline sets them")
    bad = copy.deepcopy(raw)
    bad["prm_data"]["config"]["labeler"] = "majority"
    _invalid(bad, r"prm_data.config: labeler: Input should be")
    bad = copy.deepcopy(raw)
    bad["prm_data"]["config"]["labeler"] = "reference_steps"
    _invalid(bad, "use demo_local")
    bad = copy.deepcopy(raw)
    bad["prm_data"]["config"]["max_new_tokens"] = 512
    _invalid(bad, r"max_new_tokens \(512\) leaves no room for the prompt")
    bad = copy.deepcopy(raw)
    bad["prm_data"]["configs"] = {}
    _invalid(bad, "configs")
    del raw["prm_data"]
    assert PipelineConfig.model_validate(raw).prm_data is None  # the PRM trains on the prepared file


def test_a_critic_is_validated_as_an_sft_stage():
    raw = _raw("tiny")
    raw["critic"] = copy.deepcopy(raw["stages"]["sft"])
    recipe = PipelineConfig.model_validate(raw)
    assert recipe.trained_stages[-1] == "critic"
    cfg = recipe.stage_config("critic")
    assert cfg.stage == "sft" and cfg.tracking.run_name == "critic" and cfg.tracking.tags["stage"] == "critic"
    bad = copy.deepcopy(raw)
    bad["critic"]["config"]["trainer"]["optimizer"]["lr"] = -1
    _invalid(bad, r"critic.config: trainer.optimizer.lr")
    bad = copy.deepcopy(raw)
    bad["critic"]["config"]["init"] = "/x"
    _invalid(bad, r"critic.config sets \['init'\]")
    bad = copy.deepcopy(raw)
    bad["critic"]["config"]["trainer"]["precision"] = "bf16"
    _invalid(bad, "critic: trainer.precision bf16 needs GPUs")
