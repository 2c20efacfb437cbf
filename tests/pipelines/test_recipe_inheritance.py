"""Recipes inherit (`base:`, deep merge, lists replace) and take `--set` overrides; `vlpipe recipe show`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from vlpipe.pipelines.cli import app
from vlpipe.pipelines.config import apply_overrides, deep_merge, list_recipes, load_recipe, read_recipe

SNAPSHOTS = Path(__file__).parent / "recipe_snapshots"
runner = CliRunner()


@pytest.mark.parametrize("name", list_recipes())
def test_shipped_recipes_resolve_to_the_settings_they_had_before_inheritance(name):
    """Snapshots taken before internvl3-2b/8b became `base: internvl3-1b` files."""
    snapshot = json.loads((SNAPSHOTS / f"{name}.json").read_text())
    assert load_recipe(name).model_dump(mode="json") == snapshot


def test_the_larger_recipes_hold_only_what_differs():
    for name in ("internvl3-2b", "internvl3-8b"):
        raw = yaml.safe_load(Path(f"pipelines/recipes/{name}.yaml").read_text())
        assert raw["base"] == "internvl3-1b" and "eval" not in raw and "promotion" not in raw


def test_deep_merge_merges_mappings_and_replaces_lists():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    assert deep_merge(base, {"a": {"c": [3]}, "e": 2}) == {"a": {"b": 1, "c": [3]}, "d": 1, "e": 2}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 1}  # not modified


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_base_chain_by_shipped_name_and_relative_file(tmp_path):
    middle = _write(
        tmp_path / "middle.yaml",
        {"base": "tiny", "name": "middle", "eval": {"config": {"n": 4}}},
    )
    child = _write(
        tmp_path / "child.yaml",
        {
            "base": middle.name,  # relative to the child's directory
            "name": "child",
            "promotion": {"gates": [{"metric": "best_of_n", "tolerance": 0.5}]},
        },
    )
    recipe = load_recipe(child)
    tiny = load_recipe("tiny")
    assert recipe.name == "child" and recipe.eval.config["n"] == 4
    assert recipe.eval.config["temperature"] == tiny.eval.config["temperature"]  # merged, not replaced
    assert [g.metric for g in recipe.promotion.gates] == ["best_of_n"]  # lists replace
    assert recipe.stages == tiny.stages
    assert "base" not in read_recipe(child)


def test_base_errors_name_the_file(tmp_path):
    a = tmp_path / "a.yaml"
    b = _write(tmp_path / "b.yaml", {"base": "a.yaml", "name": "b"})
    _write(a, {"base": "b.yaml", "name": "a"})
    with pytest.raises(ValueError, match=r"bases form a cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_recipe(a)
    missing = _write(tmp_path / "m.yaml", {"base": "nope", "name": "m"})
    with pytest.raises(FileNotFoundError, match=r"m\.yaml: base: no recipe 'nope'"):
        load_recipe(missing)
    bad = _write(tmp_path / "bad.yaml", {"base": ["tiny"], "name": "bad"})
    with pytest.raises(ValueError, match=r"bad\.yaml: base must name a recipe"):
        load_recipe(bad)
    assert b.exists()


def test_overrides_set_typed_values_and_create_missing_mappings():
    data = {"stages": {"sft": {"config": {"trainer": {"max_steps": 3}}}}}
    out = apply_overrides(
        data,
        [
            "stages.sft.config.trainer.optimizer.lr=1e-5",  # YAML 1.1 would read a string
            "stages.sft.config.trainer.max_steps=7",
            "eval.config.benchmarks=[]",
            "description=a b",
        ],
    )
    assert out["stages"]["sft"]["config"]["trainer"] == {"max_steps": 7, "optimizer": {"lr": 1e-5}}
    assert out["eval"]["config"]["benchmarks"] == [] and out["description"] == "a b"
    assert data == {"stages": {"sft": {"config": {"trainer": {"max_steps": 3}}}}}  # not modified


def test_override_errors_name_the_override_and_the_key():
    with pytest.raises(ValueError, match=r"--set 'lr': expected KEY=VALUE"):
        apply_overrides({}, ["lr"])
    with pytest.raises(ValueError, match=r"name is 'tiny', not a mapping"):
        apply_overrides({"name": "tiny"}, ["name.x=1"])
    with pytest.raises(
        ValueError, match=r"--set stages\.sft\.config\.trainer\.bogus=1: .*trainer\.bogus: Extra"
    ):
        load_recipe("tiny", ["stages.sft.config.trainer.bogus=1"])
    with pytest.raises(ValueError, match=r"optimizer\.lr: Input should be greater than 0"):
        load_recipe("tiny", ["stages.sft.config.trainer.optimizer.lr=-1"])


def test_recipe_show_prints_the_resolved_recipe_with_overrides():
    result = runner.invoke(
        app, ["recipe", "show", "internvl3-8b", "--set", "stages.sft.config.trainer.optimizer.lr=3e-5"]
    )
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    assert shown["name"] == "internvl3-8b" and shown["preset"] == "8b"
    assert shown["stages"]["sft"]["config"]["trainer"]["optimizer"]["lr"] == 3e-5
    assert shown["stages"]["mpo"]["config"]["trainer"]["optimizer"]["lr"] == 2e-7  # from internvl3-1b
    assert shown["eval"]["config"]["n"] == 8
    bad = runner.invoke(app, ["recipe", "show", "tiny", "--set", "nonsense=1"])
    assert bad.exit_code == 2 and "nonsense: Extra inputs are not permitted" in bad.output


def test_compile_takes_overrides(tmp_path):
    result = runner.invoke(
        app,
        ["compile", "--recipe", "tiny", "--out", str(tmp_path), "--set", "eval.config.n=4"],
    )
    assert result.exit_code == 0, result.output
    (recipe_file,) = tmp_path.glob("internvl3-recipe-*.yaml")
    assert '"stage":"eval"}},"n":4,' in recipe_file.read_text()  # the evaluation task's settings constant
