"""Evaluation-gated promotion against a real local MLflow registry: pass, fail, idempotence, rollback."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from vlpipe.serving.promote import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    PROTOCOL_TAG,
    Gate,
    PromotionConfig,
    attach_eval_metrics,
    check_gates,
    check_protocol,
    promote,
    rollback,
)

NAME = "vlpipe-demo"


@pytest.fixture()
def registry(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri, registry_uri=uri)
    client.create_registered_model(NAME)
    exp = client.create_experiment("eval", artifact_location=(tmp_path / "art").as_uri())

    def add_version(pass_at_1: float, best_of_n: float, protocol: str | None = None) -> str:
        run = client.create_run(exp, tags={"protocol": protocol} if protocol else None)
        client.log_metric(run.info.run_id, "overall/pass_at_1", pass_at_1)
        client.log_metric(run.info.run_id, "overall/best_of_n", best_of_n)
        src = tmp_path / f"model-{run.info.run_id}"
        src.mkdir()
        version = str(client.create_model_version(NAME, source=str(src), run_id=run.info.run_id).version)
        attach_eval_metrics(NAME, version, run.info.run_id)
        client.set_registered_model_alias(NAME, CHALLENGER, version)
        return version

    return client, add_version


def _alias(client, alias):
    try:
        return str(client.get_model_version_by_alias(NAME, alias).version)
    except Exception:
        return None


def test_gates_by_hand():
    cfg = PromotionConfig(
        gates=(Gate(metric="best_of_n", tolerance=0.01), Gate(metric="pass_at_1", minimum=0.3))
    )
    assert (
        check_gates({"best_of_n": 0.80, "pass_at_1": 0.5}, {"best_of_n": 0.805, "pass_at_1": 0.4}, cfg) == []
    )
    fails = check_gates({"best_of_n": 0.79, "pass_at_1": 0.2}, {"best_of_n": 0.805}, cfg)
    assert len(fails) == 2 and "0.7900 < champion 0.8050" in fails[0] and "below the minimum" in fails[1]
    assert check_gates({}, None, cfg)[0].startswith("best_of_n: the candidate has no")


def test_first_promotion_then_gate_pass_fail_idempotence_and_rollback(registry):
    client, add_version = registry
    v1 = add_version(pass_at_1=0.70, best_of_n=0.80)
    first = promote(NAME, v1)
    assert first.decision == "promoted" and first.champion_before is None
    assert _alias(client, CHAMPION) == v1 and _alias(client, CHALLENGER) is None

    # Worse Best-of-N than the champion by more than the tolerance: rejected, champion untouched.
    v2 = add_version(pass_at_1=0.75, best_of_n=0.78)
    rejected = promote(NAME, v2)
    assert rejected.decision == "rejected" and "best_of_n" in rejected.reasons[0]
    assert _alias(client, CHAMPION) == v1 and _alias(client, CHALLENGER) == v2
    tags = client.get_model_version(NAME, v2).tags
    assert (
        tags["promotion.decision"] == "rejected" and json.loads(tags["promotion.reasons"]) == rejected.reasons
    )

    # Within tolerance on Best-of-N and better pass@1: promoted; the old champion becomes `previous`.
    v3 = add_version(pass_at_1=0.72, best_of_n=0.795)
    assert promote(NAME, v3).decision == "promoted"
    assert (_alias(client, CHAMPION), _alias(client, PREVIOUS)) == (v3, v1)

    # Idempotent: promoting the champion again changes nothing.
    again = promote(NAME, v3)
    assert again.decision == "already_champion"
    assert (_alias(client, CHAMPION), _alias(client, PREVIOUS)) == (v3, v1)

    # Rollback restores `previous`, and a second rollback has nothing to go back to.
    back = rollback(NAME)
    assert back.champion_after == v1 and _alias(client, CHAMPION) == v1 and _alias(client, PREVIOUS) is None
    assert client.get_model_version(NAME, v3).tags["promotion.decision"] == "rolled_back"
    with pytest.raises(ValueError, match="no 'previous' version"):
        rollback(NAME)


def test_attach_eval_metrics_needs_an_eval_run(registry):
    client, _ = registry
    exp = client.get_experiment_by_name("eval").experiment_id
    run = client.create_run(exp)
    with pytest.raises(ValueError, match="is it an eval run"):
        attach_eval_metrics(NAME, "1", run.info.run_id)


def test_protocol_check_by_hand():
    assert check_protocol("mmb=vlmevalkit-mcq+circular+rule", "mmb=vlmevalkit-mcq+circular+rule") == []
    assert check_protocol(None, None) == []  # both from before protocols were recorded
    [reason] = check_protocol("mmb=vlmevalkit-mcq+circular+judge:gpt-x", "mmb=vlmevalkit-mcq+circular+rule")
    assert reason.startswith(
        "protocol: the candidate was evaluated under 'mmb=vlmevalkit-mcq+circular+judge:gpt-x'"
    )
    assert "champion under 'mmb=vlmevalkit-mcq+circular+rule'" in reason and "not comparable" in reason
    assert "(not recorded)" in check_protocol("demo=demo", None)[0]


def test_gate_refuses_numbers_measured_under_another_protocol(registry):
    client, add_version = registry
    rule, judged = "mv=vlmevalkit-mathvista+rule", "mv=vlmevalkit-mathvista+judge:gpt-x"
    v1 = add_version(pass_at_1=0.50, best_of_n=0.60, protocol=rule)
    assert promote(NAME, v1).decision == "promoted"
    assert client.get_model_version(NAME, v1).tags[PROTOCOL_TAG] == rule
    # Better numbers, but from a judge: not comparable with the champion's rule-based ones.
    v2 = add_version(pass_at_1=0.70, best_of_n=0.80, protocol=judged)
    rejected = promote(NAME, v2)
    assert rejected.decision == "rejected" and len(rejected.reasons) == 1
    assert rejected.reasons[0].startswith("protocol:") and judged in rejected.reasons[0]
    assert _alias(client, CHAMPION) == v1
    # The same protocol: compared, and promoted.
    v3 = add_version(pass_at_1=0.55, best_of_n=0.65, protocol=rule)
    assert promote(NAME, v3).decision == "promoted" and _alias(client, CHAMPION) == v3
