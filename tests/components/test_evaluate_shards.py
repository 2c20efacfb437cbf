"""Sharded evaluation: K shards of whole generation batches, merged, give exactly the one-pod run's metrics,
per-item table, skipped rows and plot data; the merge refuses incomplete or mismatched parts."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from vlpipe.components.evaluate.benchmarks import BenchmarkError
from vlpipe.components.evaluate.config import EvalConfig, EvalShard
from vlpipe.components.evaluate.plot import plot_data
from vlpipe.components.evaluate.stage import evaluate_shards, merge_evaluation, run_evaluation
from vlpipe.model.data.demo import DemoSizes, iter_demo_texts, write_demo_dataset
from vlpipe.model.init import init_random

TIMING = ("seconds", "items_per_second")
"""Wall-clock numbers: the only ones that may differ between a sharded and a one-pod run."""


def _base(**change) -> dict:
    return {
        "policy": "p",
        "prm": "q",
        "output_dir": "o",
        "batch_items": 2,
        "benchmarks": [{"name": "a", "path": "x", "format": "demo", "limit": 7, "shards": 3}],
        **change,
    }


# -- config ------------------------------------------------------------------------------------------------------
def test_shards_cut_whole_batches_into_balanced_contiguous_runs():
    # 7 batches in 3 shards: 7*0//3=0, 7*1//3=2, 7*2//3=4, 7*3//3=7 -> [0,2) [2,4) [4,7).
    runs = [EvalShard(benchmark="a", index=i, count=3).batch_range(7) for i in range(3)]
    assert runs == [range(0, 2), range(2, 4), range(4, 7)]
    assert EvalShard(benchmark="a", index=0, count=1).batch_range(5) == range(0, 5)
    with pytest.raises(ValueError, match=r"shards \(3\) exceeds its 2 generation batches"):
        EvalShard(benchmark="a", index=0, count=3).batch_range(2)
    with pytest.raises(ValidationError, match="must be below its count 3"):
        EvalShard(benchmark="a", index=3, count=3)


def test_the_config_plans_the_fan_out_and_refuses_more_shards_than_batches():
    cfg = EvalConfig.model_validate(
        _base(benchmarks=[{"name": "a", "path": "x", "format": "demo", "limit": 7, "shards": 3},
                          {"name": "b", "path": "y", "format": "demo"}])
    )  # fmt: skip
    assert cfg.sharded and cfg.benchmarks[1].shards == 1
    assert [(s.benchmark, s.index, s.count) for s in cfg.shard_plan] == [
        ("a", 0, 3), ("a", 1, 3), ("a", 2, 3), ("b", 0, 1)
    ]  # fmt: skip
    assert not EvalConfig.model_validate(
        _base(benchmarks=[{"name": "a", "path": "x", "format": "demo"}])
    ).sharded
    # limit 7 / batch_items 2 -> 4 batches: 5 shards cannot each have a whole batch.
    with pytest.raises(
        ValidationError, match=r"'a': shards \(5\) exceeds its generation batches \(4 = limit 7"
    ):
        EvalConfig.model_validate(
            _base(benchmarks=[{"name": "a", "path": "x", "format": "demo", "limit": 7, "shards": 5}])
        )
    for bad, message in [(0, "greater than or equal to 1"), (257, "less than or equal to 256")]:
        with pytest.raises(ValidationError, match=message):
            EvalConfig.model_validate(
                _base(benchmarks=[{"name": "a", "path": "x", "format": "demo", "shards": bad}])
            )


# -- equivalence -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Demo data (7 test items), a tiny policy and a tiny PRM, and a 3-row TSV with one corrupt image."""
    root = tmp_path_factory.mktemp("eval-shards")
    sizes = DemoSizes(
        text_corpus=20, captions=5, reasoning_train=8, reasoning_test=7, mpo_pairs=1, prm_solutions=1,
        reasoning_prm=1,
    )  # fmt: skip
    write_demo_dataset(str(root / "data"), seed=0, sizes=sizes)
    corpus = list(iter_demo_texts(str(root / "data")))
    init_random("tiny", str(root / "policy"), corpus=corpus, seed=0, v2pe_delta=0.25)
    init_random("tiny", str(root / "prm"), corpus=corpus, seed=1)
    png = base64.b64encode((root / "data/images/reasoning/test/000000.png").read_bytes()).decode()
    rows = [
        ["index", "image", "question", "A", "B", "answer"],
        ["10", png, "Is there a shape?", "yes", "no", "A"],
        ["11", "bad base64 !!!", "Is there a shape?", "yes", "no", "A"],
        ["12", "10", "How many shapes?", "", "", "3"],
    ]
    (root / "mini.tsv").write_text("\n".join("\t".join(r) for r in rows) + "\n")
    return root


def _config(workdir: Path, out: Path, demo_shards: int, mini_shards: int = 1) -> EvalConfig:
    return EvalConfig(
        policy=str(workdir / "policy"),
        prm=str(workdir / "prm"),
        benchmarks=[
            {
                "name": "demo",
                "path": str(workdir / "data/reasoning/test.jsonl"),
                "format": "demo",
                "shards": demo_shards,
            },
            {"name": "mini", "path": str(workdir / "mini.tsv"), "format": "tsv", "shards": mini_shards},
        ],  # fmt: skip
        n=3,
        temperature=1.0,
        max_new_tokens=8,
        batch_items=2,
        output_dir=str(out),
    )


def _without_timing(metrics: dict) -> dict:
    cleaned = {k: v for k, v in metrics.items() if k not in (*TIMING, "mlflow", "output_dir", "shards")}
    for scope in (cleaned["overall"], *cleaned["benchmarks"].values()):
        scope.pop("items_per_second")
    return cleaned


def _plots(metrics: dict) -> dict:
    return {name: plot_data(summary, name) for name, summary in [("all", metrics["overall"]),
                                                                 *metrics["benchmarks"].items()]}  # fmt: skip


@pytest.mark.slow
def test_three_shards_merged_equal_the_one_pod_run(workdir, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    whole = run_evaluation(_config(workdir, tmp_path / "whole", demo_shards=1))

    # 7 demo items in batches of 2 -> 4 batches -> shards of 1, 1 and 2 batches (2, 2 and 3 items); the TSV's
    # 2 usable rows are one batch. Each shard is a separate call (a pod), evaluated in reverse order.
    config = _config(workdir, tmp_path / "sharded", demo_shards=3)
    parts = []
    for shard in reversed(config.shard_plan):
        part = tmp_path / f"part-{shard.benchmark}-{shard.index}"
        manifest = evaluate_shards(config, [shard], part)
        parts.append(part)
        assert [s["index"] for s in manifest["shards"]] == [shard.index]
    sizes = {p.name: json.loads((p / "part.json").read_text())["shards"][0]["items"] for p in parts}
    assert sizes == {"part-demo-0": 2, "part-demo-1": 2, "part-demo-2": 3, "part-mini-0": 2}
    merged = merge_evaluation(config, parts)

    assert merged["evaluated_items"] == whole["evaluated_items"] == 9
    assert merged["shards"] == {"demo": 3, "mini": 1} and whole["shards"] == {"demo": 1, "mini": 1}
    assert _without_timing(merged) == _without_timing(whole)
    assert merged["skipped"] == whole["skipped"] and [s["item"] for s in merged["skipped"]] == ["11"]
    assert _plots(merged) == _plots(whole)
    items = [(tmp_path / d / "items.jsonl").read_text() for d in ("whole", "sharded")]
    assert items[0] == items[1] and len(items[0].splitlines()) == 9
    # Not vacuous: every item has its own samples.
    records = [json.loads(line) for line in items[0].splitlines()]
    assert len({json.dumps(r["samples"]) for r in records}) == 9
    # The shards' evaluation seconds add up (what items/s is computed from).
    part_seconds = [json.loads((p / "part.json").read_text())["shards"][0]["seconds"] for p in parts]
    assert merged["seconds"] == round(sum(part_seconds), 3)


@pytest.mark.slow
def test_the_merge_refuses_missing_duplicated_or_foreign_parts(workdir, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    config = _config(workdir, tmp_path / "out", demo_shards=2)
    plan = config.shard_plan
    evaluate_shards(config, plan[:1], tmp_path / "p0")
    evaluate_shards(config, plan[1:], tmp_path / "p1")  # one pod may run several shards
    with pytest.raises(BenchmarkError, match=r"'demo': shards \[1\] of 2 are missing"):
        merge_evaluation(config, [tmp_path / "p0"])
    with pytest.raises(BenchmarkError, match="shard 0 of benchmark 'demo' appears twice"):
        merge_evaluation(config, [tmp_path / "p0", tmp_path / "p0", tmp_path / "p1"])
    other = config.model_copy(update={"seed": 1})
    with pytest.raises(BenchmarkError, match="ran other settings than the merge's"):
        merge_evaluation(other, [tmp_path / "p0", tmp_path / "p1"])
    with pytest.raises(
        BenchmarkError, match=r"'demo': shards \(5\) exceeds its 4 generation batches; .*7 items"
    ):
        evaluate_shards(config, [EvalShard(benchmark="demo", index=0, count=5)], tmp_path / "p5")
    assert merge_evaluation(config, [tmp_path / "p1", tmp_path / "p0"])["evaluated_items"] == 9
