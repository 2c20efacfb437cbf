"""`kfp.local` runs the recipe's pipeline end to end (a shortened `tiny` recipe) with one MLflow parent run
and a child run per step, ending with the registered version promoted to `champion`; the evaluate and
promote-deploy sub-pipelines run on its results; a failing step closes the parent run as FAILED."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from vlpipe.components.release import VERSION
from vlpipe.pipelines.config import PipelineConfig, recipe_path

pytestmark = pytest.mark.slow
STEPS = (
    "data",
    "init",
    "mix",
    "pretrain",
    "sft",
    "mpo",
    "critic",
    "prm-data",
    "prm",
    "eval",
    "register",
    "promote",
)


def _short_tiny() -> PipelineConfig:
    """The tiny recipe with a handful of steps per stage and a three-item, Best-of-2 evaluation."""
    raw = yaml.safe_load(recipe_path("tiny").read_text())
    raw["data"]["demo"]["sizes"] = {
        "text_corpus": 20, "captions": 20, "reasoning_train": 40, "reasoning_test": 6, "mpo_pairs": 8,
        "prm_solutions": 16, "reasoning_prm": 8, "video_train": 4, "video_test": 2,
    }  # fmt: skip
    raw["data"]["mix_samples"] = 8
    for stage, steps in {"pretrain": 3, "sft": 4, "mpo": 2, "prm": 3}.items():
        raw["stages"][stage]["config"]["trainer"].update(max_steps=steps, log_every=1)
    raw["critic"]["config"]["trainer"].update(max_steps=2, log_every=1)
    raw["stages"]["mpo"]["config"]["trainer"].update(global_batch_size=2, micro_batch_size=2)
    raw["prm_data"]["config"].update(limit=4, n=2, max_new_tokens=16)
    raw["eval"]["config"].update(n=2, max_new_tokens=16, batch_items=3)
    raw["eval"]["config"]["benchmarks"][0]["limit"] = 3
    raw["eval"]["config"]["benchmarks"][1]["limit"] = 2
    raw["registry"]["model_name"] = "vlpipe-test"
    raw["tracking"]["experiment"] = "vlpipe-test"
    return PipelineConfig.model_validate(raw)


@pytest.fixture(scope="module")
def local_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("local-run")
    mp = pytest.MonkeyPatch()
    mp.setenv("VLPIPE_HOME", str(home))
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    mp.setenv("VLPIPE_GIT_COMMIT", "c0ffee" * 6 + "c0ff")
    yield home
    mp.undo()


@pytest.fixture(scope="module")
def recipe_run(local_home):
    from vlpipe.pipelines.local import run_local

    return run_local(_short_tiny())


def test_the_recipe_runs_end_to_end_with_one_parent_and_a_child_run_per_step(recipe_run, local_home):
    from mlflow import MlflowClient

    summary = recipe_run
    assert summary["parent"]["status"] == "FINISHED"
    assert summary["parent"]["git_commit"] == "c0ffee" * 6 + "c0ff"
    assert list(summary["stages"]) == list(STEPS)
    assert all(stage["status"] == "FINISHED" for stage in summary["stages"].values())
    client = MlflowClient(summary["tracking_uri"])
    experiment = client.get_experiment_by_name("vlpipe-test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_id for r in parents] == [summary["parent"]["run_id"]]
    version = summary["pipeline_version"]  # <package>+<commit12>.<digest of the compiled pipeline>
    assert version.startswith(f"{VERSION}+c0ffeec0ffee.") and len(version.rpartition(".")[2]) == 12
    assert parents[0].data.tags["vlpipe.pipeline_version"] == version
    assert parents[0].data.tags["vlpipe.pipeline_digest"] == version.rpartition(".")[2]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary["parent"]["run_id"]]
    assert sorted(r.data.tags["stage"] for r in children) == sorted(STEPS)
    for stage in ("pretrain", "sft", "prm"):
        metrics = summary["stages"][stage]["metrics"]
        assert metrics["loss_first"] > 0 and metrics["loss_last"] > 0

    # The evaluation table and the registered model with its lineage and alias. The tiny recipe's gates have
    # no minimum and the store has no champion yet, so the first version is promoted: `challenger` moves to
    # `champion`.
    assert summary["eval"]["n"] == 2 and summary["eval"]["overall"]["items"] == 3 + 2  # counting + video
    assert {b: v["items"] for b, v in summary["eval"]["benchmarks"].items()} == {"counting": 3, "video": 2}
    registered = summary["registered"]
    assert registered["name"] == "vlpipe-test" and registered["aliases"] == ["champion"]
    assert summary["promotion"] == {
        "decision": "promoted",
        "name": "vlpipe-test",
        "version": registered["version"],
        "reasons": ["passed 2 gate(s)"],
        "champion_before": None,
        "champion_after": registered["version"],
        "aliases": ["champion"],
    }
    assert str(client.get_model_version_by_alias("vlpipe-test", "champion").version) == registered["version"]
    assert "deploy" not in summary["stages"]  # the tiny recipe deploys nothing: no cluster here
    version = client.get_model_version("vlpipe-test", registered["version"])
    tags = version.tags
    assert tags["pipeline_run_id"] == summary["parent"]["run_id"]
    for stage in ("init", "pretrain", "sft", "mpo", "critic", "prm-data", "prm", "eval"):
        assert tags[f"run.{stage}"] == summary["stages"][stage]["run_id"], stage
    # The PRM trained on the MPO policy's own solutions (4 items x 2 samples, duplicates written once).
    sampled = summary["stages"]["prm-data"]["metrics"]
    assert sampled["items"] == 4 and 1 <= sampled["solutions"] <= 8
    assert len(tags["data.sft_manifest_sha256"]) == 64 and tags["git_commit"] == "c0ffee" * 6 + "c0ff"

    # The artifacts of the steps: checkpoints, the evaluation files and visualisations.
    root = Path(summary["pipeline_root"])
    run_dir = max(root.glob("internvl3-recipe-*"), key=lambda p: p.stat().st_mtime)
    assert (run_dir / "mpo" / "model" / "model.safetensors").exists()
    assert json.loads((run_dir / "evaluate" / "results" / "metrics.json").read_text())["n"] == 2
    assert "Best-of-2" in (run_dir / "evaluate" / "table").read_text()
    assert "<img" in (run_dir / "evaluate" / "report").read_text()
    assert "vlpipe-test" in (run_dir / "register-model" / "card").read_text()
    promotion = (run_dir / "promote-model" / "report").read_text()
    assert f"version {registered['version']}: promoted" in promotion and "| best_of_n |" in promotion


def test_the_evaluate_sub_pipeline_runs_on_given_checkpoints(recipe_run):
    from vlpipe.pipelines.local import run_local

    run_dir = max(
        Path(recipe_run["pipeline_root"]).glob("internvl3-recipe-*"), key=lambda p: p.stat().st_mtime
    )
    summary = run_local(
        _short_tiny(),
        pipeline="evaluate",
        arguments={"policy_uri": str(run_dir / "mpo" / "model"), "prm_uri": str(run_dir / "prm" / "model")},
    )
    assert summary["parent"]["status"] == "FINISHED"
    assert list(summary["stages"]) == ["data", "eval"]
    assert summary["eval"]["overall"]["items"] == 3 + 2  # counting + video


def test_the_promote_deploy_sub_pipeline_skips_deployment_unless_promoted(recipe_run):
    """The recipe run's version is the champion already: the decision is `already_champion` and the deploy
    branch (enabled here, with no cluster to reach) is skipped, the run succeeding."""
    from vlpipe.components.deploy.config import DeploySettings
    from vlpipe.pipelines.local import run_local

    # The cluster cross-checks (MLflow server, S3) are bypassed: the deploy step must never run here.
    service = {"name": "vlpipe-test", "storage_uri": "s3://nowhere/model", "gpus": 0}
    recipe = _short_tiny().model_copy(update={"deploy": DeploySettings(enabled=True, service=service)})
    version = recipe_run["registered"]["version"]
    summary = run_local(recipe, pipeline="promote-deploy", arguments={"model_version": version})
    assert summary["parent"]["status"] == "FINISHED"
    assert list(summary["stages"]) == ["promote"]
    assert summary["promotion"]["decision"] == "already_champion"
    assert summary["promotion"]["aliases"] == ["champion"] and "deployment" not in summary


def test_a_failing_step_closes_the_parent_run_as_failed(recipe_run, tmp_path):
    from mlflow import MlflowClient

    from vlpipe.pipelines.local import run_local

    with pytest.raises(RuntimeError, match="mix-data"):
        run_local(_short_tiny(), pipeline="sft-mpo", arguments={"checkpoint_uri": str(tmp_path / "missing")})
    client = MlflowClient(recipe_run["tracking_uri"])
    experiment = client.get_experiment_by_name("vlpipe-test")
    latest = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`vlpipe.pipeline` = 'sft-mpo'", max_results=1
    )[0]
    assert latest.info.status == "FAILED" and latest.data.tags["pipeline_state"] == "FAILED"


class _Artifact:
    """What a step sees of a Kubeflow artifact: a path, metadata and (for metrics) `log_metric`."""

    def __init__(self, path: Path, metadata: dict | None = None) -> None:
        self.path, self.metadata, self.logged = str(path), dict(metadata or {}), {}

    def log_metric(self, key: str, value: float) -> None:
        self.logged[key] = value


def test_a_retried_training_step_publishes_the_completed_checkpoint_without_training(recipe_run, tmp_path):
    """A retry runs in a new pod with an empty output directory; the work directory still holds the run."""
    from vlpipe.components.training.task import run_training_task

    recipe = _short_tiny()
    run_dir = max(
        Path(recipe_run["pipeline_root"]).glob("internvl3-recipe-*"), key=lambda p: p.stat().st_mtime
    )
    work = Path(recipe_run["pipeline_root"]).parent / "work"
    job = next(p.name for p in work.iterdir() if (p / "mpo" / "complete.json").exists())
    model, metrics = _Artifact(tmp_path / "retried-model"), _Artifact(tmp_path / "metrics")
    summary = run_training_task(
        "mpo",
        json.dumps(recipe.stage_settings("mpo")),
        preset="tiny",
        parent_run_id=recipe_run["parent"]["run_id"],
        run_key=job,
        work_root="",
        world_size=1,
        init_model=_Artifact(run_dir / "sft" / "model"),
        data=_Artifact(run_dir / "prepare-data" / "data"),
        model=model,
        metrics=metrics,
    )
    assert (
        summary["mlflow_run_id"] == recipe_run["stages"]["mpo"]["run_id"]
    )  # the completed run, not a new one
    assert (tmp_path / "retried-model" / "model.safetensors").read_bytes() == (
        run_dir / "mpo" / "model" / "model.safetensors"
    ).read_bytes()


def test_a_rerun_reuses_the_finished_steps_and_still_registers_and_promotes(recipe_run):
    """Every cacheable task (data → evaluation) comes from kfp.local's cache; the tasks with side effects run."""
    from vlpipe.pipelines.local import run_local

    first = recipe_run
    again = run_local(_short_tiny())
    assert again["parent"]["status"] == "FINISHED"
    assert again["parent"]["run_id"] != first["parent"]["run_id"]
    reused = {name for name, stage in again["stages"].items() if stage.get("reused_from")}
    trained = {"init", "mix", "pretrain", "sft", "mpo", "critic", "prm-data", "prm", "eval"}
    assert trained <= reused
    for name in trained:  # the very runs of the first pipeline run, shown with their metrics
        assert again["stages"][name]["run_id"] == first["stages"][name]["run_id"]
        assert again["stages"][name]["reused_from"] == first["parent"]["run_id"]
    assert again["stages"]["sft"]["metrics"] == first["stages"]["sft"]["metrics"]
    assert again["eval"]["overall"] == first["eval"]["overall"]
    for name in ("register", "promote"):  # side effects: they run again, under the new parent
        assert "reused_from" not in again["stages"][name] and again["stages"][name]["status"] == "FINISHED"
    assert int(again["registered"]["version"]) > int(first["registered"]["version"])
    # A changed setting invalidates the stage it changes and everything downstream, not what is upstream.
    changed = _short_tiny().model_dump(mode="json")
    changed["stages"]["mpo"]["config"]["trainer"]["optimizer"]["lr"] = 1e-3
    third = run_local(PipelineConfig.model_validate(changed))
    assert third["stages"]["sft"]["run_id"] == first["stages"]["sft"]["run_id"]
    assert "reused_from" not in third["stages"]["mpo"]
    assert third["stages"]["mpo"]["run_id"] != first["stages"]["mpo"]["run_id"]
    assert "reused_from" not in third["stages"]["eval"]


def test_a_pipeline_parameter_changes_what_a_stage_trains_with_and_mlflow_records_it(recipe_run):
    from mlflow import MlflowClient

    from vlpipe.pipelines.local import run_local

    summary = run_local(_short_tiny(), arguments={"mpo_lr": "0.0005", "eval_n": "3"})
    assert summary["stages"]["sft"]["run_id"] == recipe_run["stages"]["sft"]["run_id"]  # upstream: cached
    client = MlflowClient(summary["tracking_uri"])
    mpo = client.get_run(summary["stages"]["mpo"]["run_id"])
    assert "reused_from" not in summary["stages"]["mpo"]
    assert float(mpo.data.params["trainer.optimizer.lr"]) == 0.0005  # the value actually used
    assert summary["eval"]["n"] == 3
    # A value the stage's config class refuses fails the task before any work (the parent run is FAILED).
    with pytest.raises(RuntimeError):
        run_local(_short_tiny(), arguments={"mpo_lr": "-0.5"})
