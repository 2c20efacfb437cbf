import json

from typer.testing import CliRunner

from vlpipe.pipelines.cli import app

runner = CliRunner()


def test_model_info_reports_meta_count_within_half_percent():
    result = runner.invoke(app, ["model", "info", "--preset", "1b", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert abs(info["deviation_from_published"]) < 0.005 and info["params_total"] == 938_193_024


def test_model_info_unknown_preset():
    result = runner.invoke(app, ["model", "info", "--preset", "3b"])
    assert result.exit_code != 0 and "unknown model preset" in result.output


def test_model_init_writes_loadable_checkpoint(tmp_path):
    result = runner.invoke(app, ["model", "init", "--preset", "tiny", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    from vlpipe.model.checkpoint import load_checkpoint

    loaded = load_checkpoint(tmp_path / "m")
    assert loaded.metadata["preset"] == "tiny" and loaded.tokens_per_tile == 4
    assert loaded.model.config.text_config.vocab_size == len(loaded.tokenizer)


def test_model_init_real_preset_needs_pretrained_parts(tmp_path):
    result = runner.invoke(app, ["model", "init", "--preset", "1b", "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "--vision" in result.output


def test_platform_commands_without_a_running_platform(tmp_path):
    status = runner.invoke(app, ["platform", "status", "--home", str(tmp_path)])
    assert status.exit_code == 1 and json.loads(status.output)["running"] is False
    env = runner.invoke(app, ["platform", "env", "--home", str(tmp_path)])
    assert env.exit_code == 1 and "make platform-up" in env.output
    down = runner.invoke(app, ["platform", "down", "--home", str(tmp_path)])
    assert down.exit_code == 0 and "nothing was running" in down.output


def test_platform_up_reports_a_failed_start(tmp_path, monkeypatch):
    from vlpipe.infra import local_platform

    def fail(home, auth=True):
        raise local_platform.PlatformError("mlflow server exited while starting; see mlflow.log")

    monkeypatch.setattr(local_platform, "up", fail)
    result = runner.invoke(app, ["platform", "up", "--home", str(tmp_path)])
    assert result.exit_code == 1 and "mlflow server exited" in result.output


def test_platform_up_prints_the_environment_with_credentials_masked(tmp_path, monkeypatch):
    from vlpipe.infra import local_platform

    platform = local_platform.Platform(
        directory=tmp_path / "platform",
        s3_port=9000,
        mlflow_port=5000,
        pids={},
        env={
            "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
            "MLFLOW_TRACKING_PASSWORD": "pw-secret-123",
            "AWS_ACCESS_KEY_ID": "ak-secret-123",
            "AWS_SECRET_ACCESS_KEY": "sk-secret-123",
        },
    )
    monkeypatch.setattr(local_platform, "up", lambda home, auth=True: platform)
    result = runner.invoke(app, ["platform", "up", "--home", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "export MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in result.output
    assert "export MLFLOW_TRACKING_PASSWORD=***" in result.output
    assert "secret-123" not in result.output
    assert f"source {tmp_path / 'platform' / 'env'}" in result.output.replace("\n", "")


def test_prm_data_reports_a_bad_config_and_a_missing_source(tmp_path):
    config = tmp_path / "prm-data.yaml"
    config.write_text("policy: /p\nsource: /s.jsonl\noutput: /o.jsonl\nlabeler: majority\n")
    result = runner.invoke(app, ["prm-data", "--config", str(config)])
    assert result.exit_code == 2 and "labeler" in result.output
    config.write_text(f"policy: /p\nsource: {tmp_path / 'missing.jsonl'}\noutput: {tmp_path / 'o.jsonl'}\n")
    result = runner.invoke(app, ["prm-data", "--config", str(config)])
    assert result.exit_code == 1 and "missing.jsonl does not exist" in result.output
