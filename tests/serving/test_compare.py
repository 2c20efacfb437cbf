"""`vlpipe compare`: pipeline runs expand to their stage runs; params, final metrics and loss curves."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from vlpipe.serving.compare import comparison_rows, plot_loss_curves


def test_compare_pipelines_and_single_runs(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    exp = client.create_experiment("cmp", artifact_location=(tmp_path / "art").as_uri())
    parents = []
    for p, lr in enumerate(("0.001", "0.002")):
        parent = client.create_run(exp, tags={"recipe": "tiny"}).info.run_id
        parents.append(parent)
        for stage in ("sft", "mpo"):
            run = client.create_run(
                exp, tags={"mlflow.parentRunId": parent, "stage": stage, "recipe": "tiny"}
            )
            rid = run.info.run_id
            client.log_param(rid, "trainer.optimizer.lr", lr)
            for step in range(1, 4):
                client.log_metric(rid, "loss", 3.0 - step * (p + 1) * 0.1, step=step)
    single = client.create_run(exp, tags={"stage": "eval"}).info.run_id
    client.log_metric(single, "overall/best_of_n", 0.8)

    rows = comparison_rows([*parents, single])
    assert [(r["stage"], r["lr"]) for r in rows] == [
        ("sft", "0.001"), ("mpo", "0.001"), ("sft", "0.002"), ("mpo", "0.002"), ("eval", ""),
    ]  # fmt: skip
    assert rows[2]["loss"] == pytest.approx(3.0 - 3 * 2 * 0.1)  # the last logged value
    assert rows[-1]["overall/best_of_n"] == 0.8 and rows[-1]["pipeline"] == ""
    png = plot_loss_curves(rows, tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    with pytest.raises(ValueError, match="not an MLflow run"):
        comparison_rows(["0" * 32])
