import json

from typer.testing import CliRunner

from pipelines.cli import app

runner = CliRunner()


def test_model_info_reports_meta_count_within_half_percent():
    result = runner.invoke(app, ["model", "info", "--preset", "1b", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert abs(info["deviation_from_published"]) < 0.005 and info["params_total"] == 938_193_024


def test_model_info_unknown_preset():
    result = runner.invoke(app, ["model", "info", "--preset", "3b"])
    assert result.exit_code != 0 and "unknown model preset" in result.output


def test_model_init_writes_loadable_checkpoint(tmp_path):
    result = runner.invoke(app, ["model", "init", "--preset", "tiny", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    from model.checkpoint import load_checkpoint

    loaded = load_checkpoint(tmp_path / "m")
    assert loaded.metadata["preset"] == "tiny" and loaded.tokens_per_tile == 4
    assert loaded.model.config.text_config.vocab_size == len(loaded.tokenizer)


def test_model_init_real_preset_needs_pretrained_parts(tmp_path):
    result = runner.invoke(app, ["model", "init", "--preset", "1b", "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "--vision" in result.output
