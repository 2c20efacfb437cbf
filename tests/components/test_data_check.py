"""`vlpipe data check`: the demo passes with exact counts; a hostile dataset is reported line by line and fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.model.data.hostile import build_hostile_dataset
from vlpipe.model.data.demo import DemoSizes, write_demo_dataset
from vlpipe.pipelines.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("check") / "data"
    write_demo_dataset(str(root), seed=0, sizes=DemoSizes.tiny())
    return root


def _lines(path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def test_demo_mixture_report(demo_data, tmp_path):
    out = tmp_path / "report.json"
    result = runner.invoke(
        app,
        ["data", "check", str(demo_data / "meta_pretrain.json"), "--mode", "pretrain", "--preset", "tiny",
         "--json", str(out), "--samples"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "demo_text" in result.output and "language share" in result.output
    report = json.loads(out.read_text())
    meta = json.loads((demo_data / "meta_pretrain.json").read_text())
    assert set(report["datasets"]) == set(meta)
    for name, spec in meta.items():
        d = report["datasets"][name]
        lines = _lines(Path(spec["annotation"]))
        assert d["records"] == d["usable"] == lines and d["quarantined"] == 0
        assert (
            d["tokens"]["count"] == lines
            and 0 < d["tokens"]["p50"] <= d["tokens"]["p95"] <= d["tokens"]["max"]
        )
    assert report["datasets"]["demo_text"]["multimodal"] is False
    assert report["datasets"]["demo_captions"]["images_per_record"]["max"] == 1
    assert report["bad_fraction"] == 0.0
    assert 0 < report["mixture"]["language_share"] < 1
    assert len(report["samples"]) == report["records"]
    assert {"dataset", "line", "id", "tokens", "tiles"} <= set(report["samples"][0])


def test_limit_reads_only_the_first_records(demo_data):
    from vlpipe.components.data.check import check_conversations, vocabulary_from

    report = check_conversations(
        str(demo_data / "meta_sft.json"), "sft", vocabulary_from(None, "tiny"), limit=3
    )
    assert all(d["records"] == 3 for d in report["datasets"].values())


def test_hostile_dataset_fails_with_every_reason(tmp_path):
    meta, expected, _ = build_hostile_dataset(tmp_path)
    out = tmp_path / "report.json"
    result = runner.invoke(
        app, ["data", "check", str(meta), "--mode", "sft", "--preset", "tiny", "--json", str(out)]
    )
    assert result.exit_code == 1, result.output
    assert "above --max-bad-fraction" in result.output
    report = json.loads(out.read_text())
    hostile = report["datasets"]["hostile"]
    reasons = {reason: slot["count"] for reason, slot in hostile["reasons"].items()}
    want: dict[str, int] = {}
    for reason in expected.values():
        want[reason] = want.get(reason, 0) + 1
    assert reasons == want
    lines = {e["line"] for slot in hostile["reasons"].values() for e in slot["examples"]}
    assert lines <= set(expected)
    assert hostile["records"] == len(expected) + 3 and hostile["usable"] == 3


def test_a_single_jsonl_and_clear_errors(demo_data):
    result = runner.invoke(
        app,
        ["data", "check", str(demo_data / "reasoning" / "train.jsonl"), "--mode", "sft", "--preset", "tiny",
         "--image-root", str(demo_data / "images")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "train" in result.output and "missing_image" not in result.output
    result = runner.invoke(app, ["data", "check", str(demo_data / "meta_sft.json"), "--mode", "sft"])
    assert result.exit_code == 2 and "exactly one of --checkpoint" in result.output
    result = runner.invoke(app, ["data", "check", "nope.json", "--mode", "sft", "--preset", "tiny"])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = runner.invoke(app, ["data", "check", str(demo_data / "mpo" / "pairs.jsonl"), "--mode", "mpo"])
    assert result.exit_code == 0, result.output
