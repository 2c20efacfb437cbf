import pytest
from rich.console import Console


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    from pipelines.demo import run_demo

    summary = run_demo(tmp_path, preset="tiny", steps=12, seed=0, console=Console(quiet=True))
    assert summary["loss_last10_mean"] < summary["loss_first"]
    assert summary["reload_max_logit_diff"] == 0.0
    assert summary["quarantined"] == 0 and summary["token_utilisation"] > 0.8
    assert summary["heldout_items"] == 100
    assert (tmp_path / "sft" / "model.safetensors").exists()
