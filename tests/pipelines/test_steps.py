"""The step entrypoints' pure parts: wiring recipe settings to artifacts, work directories, preset checks,
lineage tags and the evaluation table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from vlpipe.components.data.config import DataSettings, DemoData
from vlpipe.components.data.prepare import load_dataset_info, resolve
from vlpipe.components.evaluate.task import metrics_html, metrics_markdown, wire_eval_config
from vlpipe.components.register.register import lineage_tags
from vlpipe.components.stages import STAGES, owned_keys_in
from vlpipe.components.training.task import check_preset, stage_work_dir, wire_stage_config
from vlpipe.pipelines.config import load_recipe


def test_wiring_adds_paths_and_parent_run_and_validates_with_the_stage_class():
    settings = load_recipe("tiny").stage_settings("sft")
    cfg = wire_stage_config(
        "sft", settings, init="/a/init", output="/a/out", work_dir="/w/sft", data_file="/d/meta_sft.json",
        parent_run_id="parent123",
    )  # fmt: skip
    assert (cfg.init, cfg.output, cfg.work_dir, cfg.data.meta) == (
        "/a/init",
        "/a/out",
        "/w/sft",
        "/d/meta_sft.json",
    )
    assert cfg.tracking.parent_run_id == "parent123" and cfg.tracking.run_name == "sft"
    assert cfg.tracking.recipe == "tiny"
    mpo = wire_stage_config(
        "mpo", load_recipe("tiny").stage_settings("mpo"), init="/i", output="/o", work_dir="/w",
        data_file="/d/pairs.jsonl", parent_run_id="",
    )  # fmt: skip
    assert mpo.data.path == "/d/pairs.jsonl" and mpo.tracking.parent_run_id is None
    with pytest.raises(ValidationError, match="lr"):
        bad = json.loads(json.dumps(settings))
        bad["trainer"]["optimizer"]["lr"] = -1
        wire_stage_config(
            "sft", bad, init="/i", output="/o", work_dir="/w", data_file="/m", parent_run_id=None
        )


def test_owned_keys_are_found():
    settings = {"init": "x", "data": {"meta": "m"}, "tracking": {"experiment": "e"}}
    assert owned_keys_in(settings, STAGES["sft"].owned) == [
        "init",
        "tracking.experiment",
        "data.meta",
    ]
    assert owned_keys_in({"data": {"max_length": 3}}, STAGES["prm"].owned) == []


def test_work_dir_is_per_job_and_stage(tmp_path, monkeypatch):
    assert stage_work_dir("/mnt/work", "job-1", "sft") == "/mnt/work/job-1/sft"
    monkeypatch.setenv("VLPIPE_HOME", str(tmp_path))
    assert stage_work_dir("", "job-2", "mpo") == str(tmp_path / "work" / "job-2" / "mpo")


def test_a_checkpoint_of_another_preset_is_refused(tmp_path):
    (tmp_path / "vlpipe.json").write_text(json.dumps({"preset": "small"}))
    check_preset(str(tmp_path), "small")
    with pytest.raises(ValueError, match="'small' model but the recipe's preset is 'tiny'"):
        check_preset(str(tmp_path), "tiny")


def test_data_files_resolve_against_the_root():
    meta = DataSettings(source="meta", root="s3://bucket/data", mpo_pairs="s3://other/pairs.jsonl")
    files = resolve(meta, meta.root)
    assert (
        files["sft_meta"] == "s3://bucket/data/meta_sft.json"
        and files["mpo_pairs"] == "s3://other/pairs.jsonl"
    )
    demo = DataSettings(source="demo", demo=DemoData())
    assert resolve(demo, "/art/data")["prm_steps"] == "/art/data/prm/train.jsonl"


def test_a_moved_demo_dataset_is_refused(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"source": "demo", "artifact_dir": "/elsewhere"}))
    with pytest.raises(ValueError, match="written to /elsewhere"):
        load_dataset_info(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="prepare-data"):
        load_dataset_info(str(tmp_path / "nothing"))


def test_eval_wiring_reads_relative_benchmarks_from_the_data_root():
    cfg = wire_eval_config(
        load_recipe("tiny").eval_settings(), policy="/p", prm="/r", output_dir="/o", data_root="/data",
        parent_run_id="parent1",
    )  # fmt: skip
    assert cfg.benchmarks[0].path == "/data/reasoning/test.jsonl"
    assert cfg.mlflow.parent_run_id == "parent1" and cfg.mlflow.run_name == "eval"
    assert cfg.mlflow.tags["recipe"] == "tiny"


def _metrics() -> dict:
    scope = {"items": 4, "pass_at_1": 0.25, "best_of_n": 0.5, "majority": 0.25, "oracle": 0.75}
    return {
        "n": 8,
        "aggregation": "mean",
        "benchmarks": {"counting": scope},
        "overall": {**scope, "best_of_k": {"1": 0.25, "8": 0.5}},
        "mlflow": {"run_id": "evalrun"},
    }


def test_evaluation_table_and_report():
    table = metrics_markdown(_metrics())
    assert "| benchmark | items | pass@1 | Best-of-8 |" in table
    assert "| overall | 4 | 0.250 | 0.500 | 0.250 | 0.750 |" in table
    report = metrics_html(_metrics(), Path("/nonexistent.png"))
    assert "<td>0.500</td>" in report and "<img" not in report


def test_lineage_tags_tie_the_version_to_runs_data_and_results(monkeypatch):
    monkeypatch.setenv("VLPIPE_GIT_COMMIT", "abc123")
    tags = lineage_tags(
        parent_run_id="parent",
        job_id="job",
        policy_meta={"lineage": {"init": "r0", "pretrain": "r1", "sft": "r2", "mpo": "r3"}},
        prm_meta={
            "mlflow_run_id": "r4",
            "lineage": {"sft": "r2", "critic": "r6", "prm-data": "r5", "prm": "r4"},
        },
        mixture_meta={"sft_manifest_sha256": "f" * 64, "other": "x"},
        eval_metrics={**_metrics(), "protocol": "counting=demo"},
    )
    assert tags == {
        "pipeline_run_id": "parent",
        "kfp.pipeline_job_id": "job",
        "git_commit": "abc123",
        "run.init": "r0",
        "run.pretrain": "r1",
        "run.sft": "r2",
        "run.mpo": "r3",
        "run.prm": "r4",
        "run.critic": "r6",
        "run.prm-data": "r5",
        "data.sft_manifest_sha256": "f" * 64,
        "run.eval": "evalrun",
        "eval.pass_at_1": "0.2500",
        "eval.best_of_n": "0.5000",
        "eval.majority": "0.2500",
        "eval.oracle": "0.7500",
        "eval.n": "8",
        "eval_protocol": "counting=demo",
    }


def test_prm_data_wiring_reads_relative_paths_from_the_data_root():
    from vlpipe.components.prm_data.task import wire_prm_data_config

    settings = {
        "source": "reasoning/train.jsonl",
        "image_root": "images",
        "include": ["prm/train.jsonl", "s3://curated/steps.jsonl"],
        "n": 4,
    }
    cfg = wire_prm_data_config(settings, policy="/p", output="/o/steps.jsonl", data_root="s3://bucket/data")
    assert (cfg.policy, cfg.output, cfg.n) == ("/p", "/o/steps.jsonl", 4)
    assert (
        cfg.source == "s3://bucket/data/reasoning/train.jsonl" and cfg.image_root == "s3://bucket/data/images"
    )
    assert cfg.include == ("s3://bucket/data/prm/train.jsonl", "s3://curated/steps.jsonl")
    absolute = wire_prm_data_config({"source": "/abs/r.jsonl"}, policy="/p", output="/o", data_root="/root")
    assert absolute.source == "/abs/r.jsonl" and absolute.image_root is None
    assert owned_keys_in({"policy": "x", "output": "y", "n": 2}, STAGES["prm-data"].owned) == [
        "policy",
        "output",
    ]
    with pytest.raises(ValidationError, match="temperature"):
        wire_prm_data_config(
            {"source": "r.jsonl", "temperature": 0}, policy="/p", output="/o", data_root="/d"
        )


def test_the_parent_run_records_the_pipeline_version_and_digest():
    from vlpipe.tracking.pipeline import version_tags

    assert version_tags("0.1.0+0123456789ab.fedcba987654") == {
        "vlpipe.pipeline_version": "0.1.0+0123456789ab.fedcba987654",
        "vlpipe.pipeline_digest": "fedcba987654",
    }
    assert version_tags("0.1.0+0123456789ab") == {"vlpipe.pipeline_version": "0.1.0+0123456789ab"}
    assert version_tags("") == {}
