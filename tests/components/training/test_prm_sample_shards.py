"""On-policy PRM data in shards: K = 3 shards of whole generation batches, merged, write the same file with the
same counts as one run; the merge refuses missing or foreign parts."""

from __future__ import annotations

import json

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
