"""The stage table is the one declaration of each stage: every reader uses it and it names real code."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from vlpipe.components.stages import (
    STAGES,
    TRAIN_COMMANDS,
    TRAINING_STAGES,
    load_stage_config,
    owned_keys_in,
    parse_stage_config,
)

ROOT = Path(__file__).resolve().parents[2]
NOT_STAGES = {"training", "pipeline_run"}
"""Folders of components/ that hold shared helpers (training) and the parent-run tasks, not a stage."""


@pytest.mark.parametrize("name", list(STAGES))
def test_each_entry_names_a_component_with_its_task_name_and_an_entry_function(name):
    stage = STAGES[name]
    component = stage.load_component()
    assert component.name == stage.task
    assert callable(stage.load_entry())
    if stage.config is not None:
        trained = stage.trains_as or name
        assert typing.get_args(stage.config.model_fields["stage"].annotation) == (trained,)
        assert stage.data is not None and f"data.{stage.data[0]}" in stage.owned


def test_every_stage_folder_is_in_the_table_and_has_its_stage_file():
    folders = {
        p.parent.name for p in (ROOT / "components").glob("*/component.py") if p.parent.name not in NOT_STAGES
    }
    in_table = {stage.component.split(".")[2].split(":")[0] for stage in STAGES.values() if stage.component}
    assert folders == in_table
    for name in ("pretrain", "sft", "mpo", "prm", "prm_data", "evaluate"):
        assert (ROOT / "components" / name / "stage.py").exists(), name


def test_the_readers_use_the_table():
    from vlpipe.pipelines.config import STAGES as RECIPE_STAGES
    from vlpipe.pipelines.config import PipelineConfig, Stages
    from vlpipe.pipelines.summary import STAGE_ORDER

    assert tuple(STAGES) == STAGE_ORDER
    under_stages = [n for n in TRAINING_STAGES if STAGES[n].recipe_key == f"stages.{n}"]
    assert list(RECIPE_STAGES) == under_stages == list(Stages.model_fields)
    top_level = {
        STAGES[n].recipe_key for n in STAGES if STAGES[n].recipe_key and "." not in STAGES[n].recipe_key
    }
    assert top_level <= set(PipelineConfig.model_fields)
    assert TRAIN_COMMANDS == ("pretrain", "sft", "mpo", "prm")


def test_the_compiled_recipe_runs_the_table_s_tasks():
    from vlpipe.pipelines.config import PipelineConfig, load_recipe
    from vlpipe.pipelines.dag import RECIPE_PIPELINE, build_pipelines

    # small.yaml as shipped (one pod per step) and with evaluation and PRM data in 2 shards each.
    small = load_recipe("small")
    raw = small.model_dump(mode="json", exclude_unset=True)
    raw["eval"]["config"]["benchmarks"][0]["shards"] = 2
    raw["prm_data"]["config"]["shards"] = 2
    tasks: set[str] = set()
    for recipe in (small, PipelineConfig.model_validate(raw)):
        spec = build_pipelines(recipe, commit="abc", version="0+test")[RECIPE_PIPELINE].pipeline_spec
        tasks |= set(spec.root.dag.tasks) | {
            t for c in spec.components.values() for t in c.dag.tasks if c.HasField("dag")
        }
    table_tasks = {stage.task for stage in STAGES.values()}
    parent_run_tasks = {"start-pipeline-run", "finish-pipeline-run"}
    assert table_tasks - {"deploy-model"} <= tasks  # small.yaml deploys nothing
    groups = tasks - table_tasks - parent_run_tasks  # the exit handler's group and the two shard loops'
    assert {g for g in groups if not g.startswith("for-loop-")} == {"exit-handler-1"} and len(groups) == 3


def test_owned_keys_are_dotted_paths():
    assert owned_keys_in({"a": {"b": 1}, "c": 2}, ("a.b", "a.x", "c", "d")) == ["a.b", "c"]
    assert owned_keys_in({"a": 1}, ("a.b",)) == []


def test_stage_configs_are_parsed_by_the_table(tmp_path):
    with pytest.raises(ValueError, match="unknown stage 'critic'; choose one of pretrain, sft, mpo, prm"):
        parse_stage_config({}, "critic")
    with pytest.raises(FileNotFoundError):
        load_stage_config(tmp_path / "none.yaml", "sft")


def test_readme_says_what_a_new_stage_touches():
    text = (ROOT / "README.md").read_text()
    for place in ("components/stages.py", "component.py", "stage.py", "pipelines/dag.py"):
        assert place in text, place
