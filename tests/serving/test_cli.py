"""`vlpipe serve` flags: one per ServingLimits field, named with dashes, validated by ServingLimits itself."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from vlpipe.pipelines.cli import app
from vlpipe.serving.cli import limit_flag
from vlpipe.serving.limits import ServingLimits
from vlpipe.serving.predictor import VLPipeModel, VLPipeModelServer

runner = CliRunner()


def test_every_serving_limit_is_a_flag():
    out = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"}).output
    flags = set(re.findall(r"--[a-z0-9-]+", out))
    expected = {limit_flag(f) for f in ServingLimits.model_fields}
    assert expected <= flags, expected - flags
    assert {"--batch-max-size", "--batch-wait-ms", "--max-queue", "--request-timeout-s"} <= expected
    assert limit_flag("max_video_bytes") == "--max-video-bytes"


@pytest.fixture()
def captured(monkeypatch):
    seen: dict = {}

    def load(self):
        seen["limits"] = self.limits
        self.ready = True
        return True

    monkeypatch.setattr(VLPipeModel, "load", load)
    monkeypatch.setattr(VLPipeModelServer, "start", lambda self, models: seen.update(server=self.limits))
    return seen


def test_flags_set_the_limits_and_the_rest_keep_their_defaults(captured):
    args = [
        "serve",
        "--model-uri",
        "/ckpt",
        "--batch-max-size",
        "3",
        "--batch-wait-ms",
        "2.5",
        "--max-tokens",
        "777",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    limits = captured["limits"]
    assert captured["server"] is limits
    assert (limits.batch_max_size, limits.batch_wait_ms, limits.max_tokens) == (3, 2.5, 777)
    assert limits.model_dump(
        exclude={"batch_max_size", "batch_wait_ms", "max_tokens"}
    ) == ServingLimits().model_dump(exclude={"batch_max_size", "batch_wait_ms", "max_tokens"})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-max-size", "0"], "--batch-max-size: Input should be greater than 0"),
        (["--request-timeout-s", "inf"], "--request-timeout-s"),
        (["--max-tokens", "100"], "--default-max-tokens (256) must not exceed --max-tokens (100)"),
    ],
)
def test_a_bad_flag_exits_2_naming_it(captured, args, message):
    result = runner.invoke(app, ["serve", "--model-uri", "/ckpt", *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "limits" not in captured  # refused before loading anything
