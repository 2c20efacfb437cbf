"""Commit markers of shared checkpoints (`shared_store.py`, `model/checkpoint.py`) on a moto S3 server and on a
local directory: a step without its marker (an upload cut off) is never read, pruning removes the marker first,
downloads are checked against the manifest, and the process-group timeout comes from the environment."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from vlpipe.components.training import shared_store
from vlpipe.components.training.runtime import PROCESS_GROUP_TIMEOUT_ENV, process_group_timeout
from vlpipe.model.checkpoint import COMMIT_FILE, is_committed, read_commit


@pytest.fixture()
def fs(s3_server):
    import s3fs

    filesystem = s3fs.S3FileSystem(anon=False)
    filesystem.mkdir("ckpts")
    return filesystem


def _stage_files(tmp_path: Path, step: int) -> Path:
    local = tmp_path / f"stage-{step}"
    (local / "state").mkdir(parents=True)
    (local / "state" / "mp_rank_00_model_states.pt").write_bytes(b"m" * (10 + step))
    (local / "rank-00000.pt").write_bytes(b"r" * 7)
    return local


def _commit(location: str, tmp_path: Path, step: int) -> dict[str, int]:
    uri = shared_store.step_uri(location, step)
    files = shared_store.upload_files(_stage_files(tmp_path, step), uri)
    shared_store.check_uploaded(uri, files)
    shared_store.write_commit(uri, shared_store.commit_record(step, files))
    return files


def test_uncommitted_steps_are_invisible_and_pruned(fs, tmp_path):
    location = "s3://ckpts/run/checkpoints"
    files = _commit(location, tmp_path, 2)
    assert files == {"rank-00000.pt": 7, "state/mp_rank_00_model_states.pt": 12}
    # Step 4's upload was cut off before its marker: readers skip it.
    shared_store.upload_files(_stage_files(tmp_path, 4), shared_store.step_uri(location, 4))
    assert shared_store.committed_steps(location) == [2]
    assert shared_store.latest_committed(location) == "s3://ckpts/run/checkpoints/step-00000002"
    marker = json.loads(fs.cat("ckpts/run/checkpoints/step-00000002/COMMITTED"))
    assert marker == {"step": 2, "files": {"rank-00000.pt": 7, "state/mp_rank_00_model_states.pt": 12}}

    _commit(location, tmp_path, 6)
    _commit(location, tmp_path, 8)
    # keep_last=2: step 2 goes, and so does the uncommitted step 4 (older than the newest committed step).
    assert shared_store.prune(location, keep_last=2) == [2, 4]
    assert shared_store.committed_steps(location) == [6, 8]
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("ckpts/run/checkpoints", refresh=True)) == [
        "step-00000006",
        "step-00000008",
    ]


def test_a_marker_for_another_step_or_of_another_shape_does_not_commit(fs, tmp_path):
    location = "s3://ckpts/odd"
    uri = shared_store.step_uri(location, 3)
    shared_store.upload_files(_stage_files(tmp_path, 3), uri)
    fs.pipe(f"ckpts/odd/step-00000003/{COMMIT_FILE}", json.dumps({"step": 5, "files": {}}).encode())
    assert shared_store.committed_steps(location) == []
    fs.pipe(f"ckpts/odd/step-00000003/{COMMIT_FILE}", b"not json")
    assert shared_store.committed_steps(location) == []
    assert shared_store.latest_committed(location) is None
    assert shared_store.latest_committed("s3://ckpts/nothing-here") is None


def test_check_uploaded_and_download_name_missing_or_short_files(fs, tmp_path):
    location = "s3://ckpts/check"
    files = _commit(location, tmp_path, 1)
    uri = shared_store.step_uri(location, 1)
    with pytest.raises(OSError, match=r"rank-00001.pt \(expected 5 bytes, found None\)"):
        shared_store.check_uploaded(uri, {**files, "rank-00001.pt": 5})
    record = shared_store.read_step_commit(location, 1)
    got = shared_store.download_step(uri, tmp_path / "restore", record)
    assert (got / "state" / "mp_rank_00_model_states.pt").read_bytes() == b"m" * 11
    fs.pipe("ckpts/check/step-00000001/rank-00000.pt", b"short")  # changed after the commit
    with pytest.raises(OSError, match=r"downloaded incompletely \(rank-00000.pt\)"):
        shared_store.download_step(uri, tmp_path / "restore", record)


def test_local_directory_steps_count_by_name(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-00000004").mkdir(parents=True)
    (root / "step-00000012").mkdir()
    (root / ".tmp-step-00000016").mkdir()  # being written: not a checkpoint
    (root / "step-12").mkdir()  # not a name this code writes
    assert shared_store.committed_steps(str(root)) == [4, 12]
    assert shared_store.latest_committed(str(root)) == str(root / "step-00000012")
    assert shared_store.committed_steps(str(tmp_path / "absent")) == []


def test_staging_is_per_node_and_per_location(tmp_path, monkeypatch):
    monkeypatch.setenv(shared_store.STAGING_ENV, str(tmp_path / "disk-a"))
    a = shared_store.staging_root("s3://b/x")
    assert a.parent == tmp_path / "disk-a" / "vlpipe-checkpoints"
    assert shared_store.staging_root("s3://b/y") != a
    monkeypatch.setenv(shared_store.STAGING_ENV, str(tmp_path / "disk-b"))
    assert shared_store.staging_root("s3://b/x").parent == tmp_path / "disk-b" / "vlpipe-checkpoints"


def test_a_remote_final_checkpoint_is_committed_only_when_whole(
    fs, tiny_model, tiny_tokenizer, tiny_image_cfg
):
    from vlpipe.model.checkpoint import save_checkpoint

    out = "s3://ckpts/final/sft"
    save_checkpoint(out, tiny_model, tiny_tokenizer, tiny_image_cfg, metadata={"stage": "sft"})
    record = read_commit(out)
    assert (
        record is not None
        and record["files"]["config.json"] == fs.info("ckpts/final/sft/config.json")["size"]
    )
    assert "model.safetensors" in record["files"]
    assert is_committed(out)
    fs.rm("ckpts/final/sft/model.safetensors")  # a file of the manifest gone
    assert not is_committed(out)
    fs.rm(f"ckpts/final/sft/{COMMIT_FILE}")
    assert not is_committed(out)
    assert not is_committed("s3://ckpts/final/none")


def test_a_local_checkpoint_needs_no_marker(tmp_path):
    assert not is_committed(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert is_committed(str(tmp_path))


def test_process_group_timeout_from_the_environment(monkeypatch):
    monkeypatch.delenv(PROCESS_GROUP_TIMEOUT_ENV, raising=False)
    assert process_group_timeout() == timedelta(minutes=30)
    monkeypatch.setenv(PROCESS_GROUP_TIMEOUT_ENV, "90")
    assert process_group_timeout() == timedelta(seconds=90)
    for bad in ("0", "-5", "soon"):
        monkeypatch.setenv(PROCESS_GROUP_TIMEOUT_ENV, bad)
        with pytest.raises(
            ValueError, match=rf"{PROCESS_GROUP_TIMEOUT_ENV} must be a positive number.*{bad!r}"
        ):
            process_group_timeout()


def test_checkpoint_location_defaults_to_the_work_dir_and_takes_s3():
    from pydantic import ValidationError

    from vlpipe.components.stages import parse_stage_config
    from vlpipe.components.training.common import checkpoint_location

    sft = {"stage": "sft", "init": "/ckpt/init", "output": "/ckpt/sft", "data": {"meta": "/data/meta.json"}}
    cfg = parse_stage_config(sft)
    assert checkpoint_location(cfg, Path(cfg.resolved_work_dir)) == "/ckpt/sft.work/checkpoints"
    cfg = parse_stage_config({**sft, "checkpoint": {"location": "s3://bucket/run/sft"}})
    assert checkpoint_location(cfg, Path(cfg.resolved_work_dir)) == "s3://bucket/run/sft"
    with pytest.raises(ValidationError, match="checkpoint.location"):
        parse_stage_config({**sft, "checkpoint": {"location": ""}})


def test_model_check_reports_files_the_marker_lists_but_the_store_lacks(
    fs, tiny_model, tiny_tokenizer, tiny_image_cfg, tmp_path, monkeypatch
):
    from vlpipe.model.check import check_checkpoint
    from vlpipe.model.checkpoint import save_checkpoint
    from vlpipe.model.storage import localize

    monkeypatch.setenv("VLPIPE_HOME", str(tmp_path / "home"))
    out = "s3://ckpts/checked/sft"
    save_checkpoint(out, tiny_model, tiny_tokenizer, tiny_image_cfg, metadata={"preset": "tiny"})
    report = check_checkpoint(localize(out))
    assert report.ok, report.problems
    assert report.facts["commit_marker"] is True
    weights = "ckpts/checked/sft/model.safetensors"
    fs.pipe(weights, fs.cat(weights) + b"\0")  # rewritten after the commit: another size
    report = check_checkpoint(localize(out))
    assert [(c, m) for c, m in report.problems if c == "commit"] == [
        ("commit", "files the commit marker lists are missing or of another size: ['model.safetensors']")
    ]
