"""On-policy PRM data in shards: K = 3 shards of whole generation batches, merged, write the same file with the
same counts as one run; the merge refuses missing or foreign parts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from vlpipe.components.prm_data.stage import (
    PRMSampleConfig,
    merge_prm_data,
    sample_prm_data,
    sample_prm_shard,
    shard_batches,
)

TIMING = ("seconds", "items_per_second")


def test_shards_are_balanced_runs_of_whole_batches_and_cannot_outnumber_them():
    # 4 batches in 3 shards: 4*i//3 for i = 0..3 -> 0, 1, 2, 4.
    assert [shard_batches(i, 3, 4) for i in range(3)] == [range(0, 1), range(1, 2), range(2, 4)]
    with pytest.raises(ValueError, match=r"shards \(3\) exceeds the 2 generation batches"):
        shard_batches(0, 3, 2)
    base = {"policy": "p", "source": "s", "output": "o", "limit": 7, "batch_items": 2}
    assert PRMSampleConfig(**base, shards=4).shards == 4
    with pytest.raises(ValidationError, match=r"shards \(5\) exceeds the generation batches \(limit 7"):
        PRMSampleConfig(**base, shards=5)


@pytest.mark.slow
def test_three_shards_merged_write_what_one_run_writes(workspace, tmp_path):
    data = workspace["data"]
    config = PRMSampleConfig(
        policy=str(workspace["init"]),
        source=str(data / "reasoning" / "train.jsonl"),
        image_root=str(data / "images"),
        output=str(tmp_path / "whole.jsonl"),
        n=3,
        max_new_tokens=12,
        limit=7,
        batch_items=2,
        include=(str(data / "prm" / "train.jsonl"),),
        shards=3,
    )
    whole = sample_prm_data(config, progress=False)

    parts = [tmp_path / f"part{i}" for i in range(3)]
    for i in (2, 0, 1):  # separate calls (pods), in any order
        sample_prm_shard(config, i, 3, parts[i], progress=False)
    # 7 items in batches of 2 -> 4 batches -> shards of 1, 1 and 2 batches: 2, 2 and 3 items.
    assert [json.loads((p / "part.json").read_text())["counts"]["items"] for p in parts] == [2, 2, 3]
    sharded_config = config.model_copy(update={"output": str(tmp_path / "sharded.jsonl")})
    merged = merge_prm_data(sharded_config, parts[::-1])

    assert (tmp_path / "sharded.jsonl").read_text() == (tmp_path / "whole.jsonl").read_text()
    assert {k: v for k, v in merged.items() if k not in TIMING} == {
        k: v for k, v in whole.items() if k not in TIMING
    }
    assert whole["items"] == 7 and whole["solutions"] >= 7 and whole["included_lines"] > 0
    with pytest.raises(ValueError, match=r"shards \[1\] are missing"):
        merge_prm_data(sharded_config, [parts[0], parts[2]])
    with pytest.raises(ValueError, match="shard 0 appears twice"):
        merge_prm_data(sharded_config, [parts[0], parts[0]])
    with pytest.raises(ValueError, match="ran other settings"):
        merge_prm_data(sharded_config.model_copy(update={"seed": 1}), parts)


class _Artifact:
    """A stand-in for a kfp artifact: a path, metadata and logged metrics."""

    def __init__(self, path) -> None:
        self.path, self.uri, self.metadata, self.logged = str(path), str(path), {}, {}

    def log_metric(self, key: str, value: float) -> None:
        self.logged[key] = value


@pytest.mark.slow
def test_the_shard_and_merge_tasks_give_what_the_one_pod_task_gives(workspace, tracking, tmp_path):
    import mlflow

    from vlpipe.components.prm_data.task import (
        IMAGE_ROOT_KEY,
        run_prm_data_merge_task,
        run_prm_data_shard_task,
        run_prm_data_task,
    )

    data = _Artifact(tmp_path / "data")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset.json").write_text(
        json.dumps({"source": "meta", "root": str(workspace["data"])})
    )
    settings = json.dumps(
        {"source": "reasoning/train.jsonl", "image_root": "images", "n": 2, "max_new_tokens": 8, "limit": 4,
         "batch_items": 2, "shards": 2}
    )  # fmt: skip
    step = json.dumps({"recipe": "tiny", "tracking": {"experiment": "prm-data-test"}})
    policy = _Artifact(workspace["init"])
    one = _Artifact(tmp_path / "one" / "steps.jsonl")
    whole = run_prm_data_task(
        settings, step, preset="tiny", parent_run_id="", policy=policy, data=data, steps=one,
        metrics=_Artifact(tmp_path / "m1"),
    )  # fmt: skip
    parts = [_Artifact(tmp_path / f"part{i}") for i in range(2)]
    for i, part in enumerate(parts):
        run_prm_data_shard_task(
            settings, preset="tiny", index=i, count=2, policy=policy, data=data, part=part
        )
        assert part.metadata == {"index": i, "count": 2, "items": 2}
    merged_steps, metrics = _Artifact(tmp_path / "merged" / "steps.jsonl"), _Artifact(tmp_path / "m2")
    merged = run_prm_data_merge_task(
        step, parent_run_id="", parts=parts[::-1], data=data, steps=merged_steps, metrics=metrics
    )
    assert Path(merged_steps.path).read_text() == Path(one.path).read_text()
    assert (
        merged_steps.metadata[IMAGE_ROOT_KEY]
        == one.metadata[IMAGE_ROOT_KEY]
        == str(workspace["data"] / "images")
    )
    same = ("items", "solutions", "positive_steps", "negative_steps", "final_correct", "skipped_items")
    assert {k: merged[k] for k in same} == {k: whole[k] for k in same} and merged["items"] == 4
    run = mlflow.get_run(merged["mlflow_run_id"])
    assert run.data.tags["stage"] == "prm-data" and run.data.metrics["solutions"] == whole["solutions"]
    assert metrics.logged["items"] == 4.0
