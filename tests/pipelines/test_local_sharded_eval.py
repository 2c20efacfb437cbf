"""`kfp.local` runs a sharded evaluation: the `evaluate` sub-pipeline with K = 3 (counting) and K = 2 (video)
fans out into `evaluate-shard` tasks and `merge-evaluation`, and gives exactly the metrics, per-item table and
plot data of the one-pod run on the same checkpoints, items and seeds."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
import yaml

from vlpipe.pipelines.config import PipelineConfig, recipe_path

pytestmark = pytest.mark.slow
TIMING = ("seconds", "items_per_second")


def _tiny(counting_shards: int, video_shards: int) -> PipelineConfig:
    """The tiny recipe with a small demo dataset and a 6 + 4 item, Best-of-2 evaluation in batches of 2."""
    raw = yaml.safe_load(recipe_path("tiny").read_text())
    raw["data"]["demo"]["sizes"] = {
        "text_corpus": 20, "captions": 5, "reasoning_train": 8, "reasoning_test": 6, "mpo_pairs": 2,
        "prm_solutions": 2, "reasoning_prm": 2, "video_train": 2, "video_test": 4,
    }  # fmt: skip
    raw["data"]["mix_samples"] = 4
    raw["eval"]["config"].update(n=2, max_new_tokens=8, batch_items=2, temperature=1.0)
    counting, video = raw["eval"]["config"]["benchmarks"]
    counting.update(limit=6, shards=counting_shards)
    video.update(limit=4, shards=video_shards)
    raw["tracking"]["experiment"] = "vlpipe-test"
    return PipelineConfig.model_validate(raw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The evaluate pipeline run twice through kfp.local on the same tiny checkpoints: unsharded, then sharded."""
    from vlpipe.model.data.demo import DemoSizes, iter_demo_texts, write_demo_dataset
    from vlpipe.model.init import init_random
    from vlpipe.pipelines.local import run_local

    home = tmp_path_factory.mktemp("sharded-eval")
    mp = pytest.MonkeyPatch()
    mp.setenv("VLPIPE_HOME", str(home))
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    mp.setenv("VLPIPE_GIT_COMMIT", "c0ffee" * 6 + "c0ff")
    try:
        write_demo_dataset(str(home / "corpus"), seed=0, sizes=DemoSizes(text_corpus=20, captions=5))
        corpus = list(iter_demo_texts(str(home / "corpus")))
        arguments = {
            "policy_uri": init_random("tiny", str(home / "policy"), corpus=corpus, seed=0),
            "prm_uri": init_random("tiny", str(home / "prm"), corpus=corpus, seed=1),
        }
        print_before = builtins.print
        whole = run_local(_tiny(1, 1), pipeline="evaluate", arguments=arguments)
        sharded = run_local(_tiny(3, 2), pipeline="evaluate", arguments=arguments)
        # kfp.local swaps builtins.print per task from a thread pool; run_local puts it back
        assert builtins.print is print_before
    finally:
        mp.undo()
    return home, whole, sharded


def _eval_files(summary: dict, tmp: Path) -> tuple[dict, str]:
    from mlflow import MlflowClient

    client = MlflowClient(summary["tracking_uri"])
    run_id = summary["stages"]["eval"]["run_id"]
    metrics = json.loads(Path(client.download_artifacts(run_id, "eval/metrics.json", str(tmp))).read_text())
    items = Path(client.download_artifacts(run_id, "eval/items.jsonl", str(tmp))).read_text()
    return metrics, items


def test_the_sharded_pipeline_fans_out_and_merges(runs):
    home, whole, sharded = runs
    assert whole["parent"]["status"] == sharded["parent"]["status"] == "FINISHED"
    # One `eval` run in the summary either way: the merge records it, the shards record none (prepare-data
    # came from the cache the second time).
    assert list(whole["stages"]) == ["data", "eval"] and list(sharded["stages"]) == ["eval"]
    root = Path(sharded["pipeline_root"])
    run_dir = max(root.glob("evaluate-*"), key=lambda p: p.stat().st_mtime)
    parts = sorted(run_dir.glob("*-iteration-*/evaluate-shard/part/part.json"))
    shards = [json.loads(p.read_text())["shards"][0] for p in parts]
    assert sorted((s["benchmark"], s["index"], s["count"], s["items"]) for s in shards) == [
        ("counting", 0, 3, 2), ("counting", 1, 3, 2), ("counting", 2, 3, 2),
        ("video", 0, 2, 2), ("video", 1, 2, 2),
    ]  # fmt: skip
    assert (run_dir / "merge-evaluation" / "results" / "metrics.json").exists()
    assert "Best-of-2" in (run_dir / "merge-evaluation" / "table").read_text()


def test_sharded_equals_unsharded_metrics_items_and_plot_data(runs, tmp_path):
    from vlpipe.components.evaluate.plot import plot_data

    _, whole, sharded = runs
    (m1, items1), (m2, items2) = _eval_files(whole, tmp_path / "1"), _eval_files(sharded, tmp_path / "2")
    assert items1 == items2 and len(items1.splitlines()) == 10
    assert m1["shards"] == {"counting": 1, "video": 1} and m2["shards"] == {"counting": 3, "video": 2}
    for m in (m1, m2):
        for key in (*TIMING, "mlflow", "output_dir", "shards"):
            m.pop(key)
        for scope in (m["overall"], *m["benchmarks"].values()):
            scope.pop("items_per_second")
    assert m1 == m2
    for scope in ("counting", "video"):
        assert plot_data(m1["benchmarks"][scope], scope) == plot_data(m2["benchmarks"][scope], scope)
    assert whole["eval"] == sharded["eval"]  # the summary's table (from the MLflow metrics)
