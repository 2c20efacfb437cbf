"""Start anywhere: `init.checkpoint` instead of composing ViT + LLM, stages switched off (`null`), and
`vlpipe run --local` of such a recipe end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.pipelines.ir import artifact_edges, body_tasks, constant, load_ir
from vlpipe.pipelines.compile import compile_recipe
from vlpipe.pipelines.config import PipelineConfig, load_recipe, recipe_path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _tiny(**changes) -> dict:
    raw = yaml.safe_load(recipe_path("tiny").read_text())
    raw.update(changes)
    return raw


def test_the_paper_recipe_starts_from_a_published_checkpoint_without_pretraining():
    recipe = load_recipe(
        "internvl3-1b",
        [
            "init={checkpoint: s3://vlpipe-models/InternVL3-1B-hf}",
            "stages.pretrain=null",
        ],
    )
    assert recipe.init.from_checkpoint and not recipe.init.composed
    assert recipe.trained_stages == ("sft", "mpo", "prm")


def test_init_checkpoint_excludes_the_composed_init():
    raw = _tiny(init={"checkpoint": "/models/x", "vision": "/v", "llm": "/l"})
    with pytest.raises(ValueError, match="set checkpoint, or vision and llm"):
        PipelineConfig.model_validate(raw)


@pytest.mark.parametrize(
    ("off", "message"),
    [
        (["prm"], "stages.prm cannot be switched off"),
        (["pretrain", "sft"], "both switched off"),
        (["sft"], "critic is more SFT"),
    ],
)
def test_which_stages_can_be_switched_off(off, message):
    raw = _tiny()
    for stage in off:
        raw["stages"][stage] = None
    with pytest.raises(ValueError, match=message):
        PipelineConfig.model_validate(raw)


def test_switched_off_stages_leave_the_dag_and_the_next_starts_from_before(tmp_path):
    raw = _tiny(init={"checkpoint": "/models/tiny"})
    raw["stages"]["pretrain"] = None
    raw["stages"]["mpo"] = None
    recipe = PipelineConfig.model_validate(raw)
    files = compile_recipe(recipe, tmp_path, commit=COMMIT)
    assert "sft-mpo" not in files  # no MPO: no sft-mpo pipeline
    spec, _ = load_ir(files["internvl3-recipe"])
    tasks = body_tasks(spec)
    assert "pretrain" not in tasks and "mpo" not in tasks
    edges = artifact_edges(tasks)
    assert {("init-model", "sft"), ("sft", "evaluate"), ("sft", "register-model"), ("sft", "critic")} <= edges
    assert json.loads(constant(tasks["init-model"], "config"))["init"]["checkpoint"] == "/models/tiny"
    assert [m["stage"] for m in json.loads(constant(tasks["mix-data"], "config"))["mixtures"]] == ["sft"]


def test_init_from_a_published_checkpoint_keeps_it_and_checks_the_preset(tmp_path):
    from tests.published_checkpoint import published_checkpoint
    from vlpipe.model.check import check_checkpoint
    from vlpipe.model.init import init_from_checkpoint, init_random

    source = published_checkpoint(tmp_path / "published")
    init_from_checkpoint("tiny", str(tmp_path / "init"), checkpoint_uri=str(source))
    info = json.loads((tmp_path / "init/vlpipe.json").read_text())
    assert info["init"] == "checkpoint" and info["source"] == str(source) and "preset" not in info
    assert check_checkpoint(tmp_path / "init").ok
    init_random("tiny", str(tmp_path / "tiny"))
    with pytest.raises(ValueError, match="shapes of preset 'tiny', not the recipe's 'small'"):
        init_from_checkpoint("small", str(tmp_path / "x"), checkpoint_uri=str(tmp_path / "tiny"))


@pytest.mark.slow
def test_vlpipe_run_local_starts_from_a_checkpoint_without_pretraining(tmp_path, monkeypatch):
    """A recipe file on top of `tiny` (its `base`): init.checkpoint, no pre-training, a few steps per stage."""
    from vlpipe.model.init import init_random
    from vlpipe.pipelines.cli import app

    monkeypatch.setenv("VLPIPE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    init_random("tiny", str(tmp_path / "start"), seed=7)
    sizes = {"text_corpus": 20, "captions": 20, "reasoning_train": 40, "reasoning_test": 6, "mpo_pairs": 8,
             "prm_solutions": 16, "reasoning_prm": 8}  # fmt: skip
    trainer = {"max_steps": 2, "log_every": 1}
    recipe = {
        "base": "tiny",
        "name": "tiny-from-checkpoint",
        "init": {"checkpoint": str(tmp_path / "start")},
        "data": {"demo": {"sizes": sizes}, "mix_samples": 8},
        "stages": {
            "pretrain": None,
            "sft": {"config": {"trainer": trainer}},
            "mpo": {"config": {"trainer": {**trainer, "global_batch_size": 2, "micro_batch_size": 2}}},
            "prm": {"config": {"trainer": trainer}},
        },
        "critic": {"config": {"trainer": trainer}},
        "prm_data": {"config": {"limit": 4, "n": 2, "max_new_tokens": 16}},
        "eval": {
            "config": {
                "n": 2,
                "max_new_tokens": 16,
                "batch_items": 3,
                "benchmarks": [
                    {"name": "counting", "path": "reasoning/test.jsonl", "format": "demo", "limit": 3}
                ],
            }
        },  # fmt: skip
        "registry": {"model_name": "vlpipe-from-checkpoint"},
        "tracking": {"experiment": "vlpipe-from-checkpoint"},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    summary_path = tmp_path / "summary.json"
    result = CliRunner().invoke(
        app,
        ["run", "--local", "--recipe", str(path), "--summary-json", str(summary_path)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["parent"]["status"] == "FINISHED"
    assert list(summary["stages"]) == [
        "data", "init", "mix", "sft", "mpo", "critic", "prm-data", "prm", "eval", "register", "promote",
    ]  # fmt: skip
    assert all(stage["status"] == "FINISHED" for stage in summary["stages"].values())
    assert summary["registered"]["name"] == "vlpipe-from-checkpoint"
    # The registered checkpoint is the exported one: bf16, and `vlpipe model check` passes on it.
    import mlflow

    from vlpipe.model.check import check_checkpoint

    local = Path(
        mlflow.artifacts.download_artifacts(
            "models:/vlpipe-from-checkpoint/1", dst_path=str(tmp_path / "registered")
        )
    )
    checkpoint = next(p.parent for p in local.rglob("vlpipe.json"))
    assert json.loads((checkpoint / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((checkpoint / "vlpipe.json").read_text())["save_dtype"] == "bf16"
    assert check_checkpoint(checkpoint).ok
