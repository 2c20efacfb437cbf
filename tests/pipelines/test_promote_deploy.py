"""The promote and deploy steps' entrypoints against a real local MLflow registry and a stubbed KServe API
(`tests.serving.test_deploy`'s in-memory `CustomObjectsApi`): gate decisions and their report, where KServe
downloads the champion from, create vs. canary rollout, and a failed rollout putting the champion back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.serving.test_deploy import FakeClock, FakeCustomObjectsApi, _client, _container, _env
from vlpipe.components.deploy.config import DeployConfig, DeploySettings, storage_uri_of
from vlpipe.components.deploy.deploy import deploy_champion
from vlpipe.components.pipeline_run.config import TrackingSettings
from vlpipe.components.promote.config import PromoteConfig, parse_model_uri
from vlpipe.components.promote.promote import promote_task
from vlpipe.serving.promote import Gate, PromotionConfig

NAME = "vlpipe-steps"
TRACKING = TrackingSettings(experiment="vlpipe-steps")


class _Artifact:
    """What a step sees of its output `Markdown` artifact: a path and metadata."""

    def __init__(self, path: Path) -> None:
        self.path, self.metadata = str(path), {}


@pytest.fixture()
def registry(tmp_path, monkeypatch):
    """A local registry and a pipeline parent run; `add(pass_at_1, best_of_n)` registers a version the way
    the register step does (`eval.<metric>` tags, alias `challenger`)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri, registry_uri=uri)
    client.create_registered_model(NAME)
    experiment = client.create_experiment("vlpipe-steps", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(experiment).info.run_id

    def add(pass_at_1: float, best_of_n: float) -> str:
        source = tmp_path / f"model-{pass_at_1}-{best_of_n}"
        source.mkdir(exist_ok=True)
        version = str(client.create_model_version(NAME, source=str(source)).version)
        client.set_model_version_tag(NAME, version, "eval.pass_at_1", f"{pass_at_1:.4f}")
        client.set_model_version_tag(NAME, version, "eval.best_of_n", f"{best_of_n:.4f}")
        client.set_registered_model_alias(NAME, "challenger", version)
        return version

    return client, parent, add


def _aliases(client: MlflowClient, version: str) -> list[str]:
    return sorted(client.get_model_version(NAME, version).aliases)


def _promote(parent: str, version: str, tmp_path: Path, gates=None) -> tuple[str, str]:
    config = PromoteConfig(recipe="steps", tracking=TRACKING, promotion=PromotionConfig(gates=gates or ()))
    if gates is None:
        config = PromoteConfig(recipe="steps", tracking=TRACKING)  # the default gates
    report = _Artifact(tmp_path / f"promote-{version}.md")
    decision = promote_task(
        config.model_dump_json(), parent_run_id=parent, model_uri=f"models:/{NAME}/{version}", report=report
    )
    assert report.metadata["decision"] == decision
    return decision, Path(report.path).read_text()


def test_model_uris_name_a_fixed_version():
    assert parse_model_uri("models:/vlpipe-tiny/12") == ("vlpipe-tiny", "12")
    for bad in ("models:/vlpipe-tiny@champion", "models:/vlpipe-tiny/latest", "runs:/abc/model", "3"):
        with pytest.raises(ValueError, match="models:/<name>/<version>"):
            parse_model_uri(bad)


def test_promotion_decisions_their_report_and_run(registry, tmp_path):
    client, parent, add = registry
    # No champion yet: only minimums apply, and the default gates have none.
    first = add(pass_at_1=0.40, best_of_n=0.50)
    decision, report = _promote(parent, first, tmp_path)
    assert decision == "promoted" and _aliases(client, first) == ["champion"]
    assert f"### `{NAME}` version {first}: promoted" in report and "Champion before: none" in report
    assert "| best_of_n | 0.5000 | – | ≥ champion − 0.01 | pass |" in report

    # Best-of-N 0.495 ≥ 0.50 - 0.01 passes; pass@1 0.35 < 0.40 - 0 fails: rejected, the champion stays.
    worse = add(pass_at_1=0.35, best_of_n=0.495)
    decision, report = _promote(parent, worse, tmp_path)
    assert decision == "rejected"
    assert _aliases(client, first) == ["champion"] and _aliases(client, worse) == ["challenger"]
    assert "| pass_at_1 | 0.3500 | 0.4000 | ≥ champion − 0 | fail |" in report
    assert "| best_of_n | 0.4950 | 0.5000 | ≥ champion − 0.01 | pass |" in report
    assert "- pass_at_1: 0.3500 < champion 0.4000 - tolerance 0.0000" in report

    # A minimum rejects even without a better champion to compare with.
    floor = (Gate(metric="pass_at_1", minimum=0.6),)
    better = add(pass_at_1=0.45, best_of_n=0.55)
    assert _promote(parent, better, tmp_path, gates=floor)[0] == "rejected"
    decision, _ = _promote(parent, better, tmp_path)
    assert decision == "promoted"
    assert _aliases(client, better) == ["champion"] and _aliases(client, first) == ["previous"]
    assert _promote(parent, better, tmp_path)[0] == "already_champion"

    # Each decision is a child run of the pipeline's run, with the metrics compared.
    runs = client.search_runs(
        [client.get_run(parent).info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert sorted(r.data.tags["promotion.decision"] for r in runs) == [
        "already_champion", "promoted", "promoted", "rejected", "rejected",
    ]  # fmt: skip
    rejected = next(r for r in runs if r.data.tags.get("registered_version") == worse)
    assert rejected.data.tags["stage"] == "promote" and rejected.data.tags["champion_after"] == first
    assert rejected.data.metrics == {
        "candidate/pass_at_1": 0.35, "candidate/best_of_n": 0.495,
        "champion/pass_at_1": 0.40, "champion/best_of_n": 0.50,
    }  # fmt: skip
    assert json.loads(rejected.data.params["gates"])[0]["metric"] == "best_of_n"


def test_kserve_downloads_the_champion_from_s3():
    settings = DeploySettings(enabled=True, service={"name": "m"})
    assert (
        storage_uri_of(settings, "s3://mlflow/1/models/m-1/artifacts") == "s3://mlflow/1/models/m-1/artifacts"
    )
    proxied = settings.model_copy(update={"artifacts_destination": "s3://vlpipe-mlflow/artifacts/"})
    assert (
        storage_uri_of(proxied, "mlflow-artifacts:/1/models/m-1/artifacts")
        == "s3://vlpipe-mlflow/artifacts/1/models/m-1/artifacts"
    )
    fixed = settings.model_copy(update={"service": {"name": "m", "storage_uri": "s3://models/ckpt"}})
    assert storage_uri_of(fixed, "/local/mlartifacts/1") == "s3://models/ckpt"
    with pytest.raises(ValueError, match="deploy.artifacts_destination"):
        storage_uri_of(settings, "mlflow-artifacts:/1/models/m-1/artifacts")
    with pytest.raises(ValueError, match="deploy.service.storage_uri"):
        storage_uri_of(settings, "/local/mlartifacts/1")


def _deploy_config(storage_uri: str, **service) -> DeployConfig:
    service = {
        "name": "vlpipe-steps",
        "namespace": "models",
        "storage_uri": storage_uri,
        "gpus": 0,
        **service,
    }
    settings = DeploySettings(
        enabled=True, service=service, canary={"step_timeout_s": 60, "poll_interval_s": 5}
    )
    return DeployConfig(recipe="steps", tracking=TRACKING, deploy=settings)


def test_the_champion_is_created_then_rolled_out_as_a_canary(registry, tmp_path):
    client, parent, add = registry
    api, clock = FakeCustomObjectsApi(), FakeClock()
    kserve = _client(api)
    first = add(pass_at_1=0.40, best_of_n=0.50)
    _promote(parent, first, tmp_path)
    result = deploy_champion(
        _deploy_config("s3://models/v1"), model_uri=f"models:/{NAME}/{first}", parent_run_id=parent,
        report_path=str(tmp_path / "deploy.md"), kserve_client=kserve, sleep=clock.sleep, clock=clock,
    )  # fmt: skip
    assert result["status"] == "created" and [s["percent"] for s in result["steps"]] == [100]
    isvc = api.objects["models", "vlpipe-steps"]
    assert _env(_container(isvc))["STORAGE_URI"] == "s3://models/v1"
    assert isvc["metadata"]["labels"]["vlpipe/model-version"] == first
    assert client.get_model_version(NAME, first).tags["deployment.status"] == "created"
    assert "InferenceService `models/vlpipe-steps`" in (tmp_path / "deploy.md").read_text()

    second = add(pass_at_1=0.45, best_of_n=0.55)
    _promote(parent, second, tmp_path)
    result = deploy_champion(
        _deploy_config("s3://models/v2"), model_uri=f"models:/{NAME}/{second}", parent_run_id=parent,
        kserve_client=kserve, sleep=clock.sleep, clock=clock,
    )  # fmt: skip
    assert result["status"] == "rolled_out" and [s["percent"] for s in result["steps"]] == [10, 50, 100]
    canary = [p["spec"]["predictor"].get("canaryTrafficPercent") for p in api.patches()]
    assert canary == [10, 50, 100]
    assert _env(_container(api.objects["models", "vlpipe-steps"]))["STORAGE_URI"] == "s3://models/v2"
    assert client.get_model_version(NAME, second).tags["deployment.status"] == "rolled_out"


def test_a_failed_rollout_puts_traffic_and_the_champion_back(registry, tmp_path):
    client, parent, add = registry
    api = FakeCustomObjectsApi(ready=lambda obj: _env(_container(obj))["STORAGE_URI"] != "s3://models/bad")
    clock, kserve = FakeClock(), _client(api)
    good = add(pass_at_1=0.40, best_of_n=0.50)
    _promote(parent, good, tmp_path)
    deploy_champion(
        _deploy_config("s3://models/good"), model_uri=f"models:/{NAME}/{good}", parent_run_id=parent,
        kserve_client=kserve, sleep=clock.sleep, clock=clock,
    )  # fmt: skip
    bad = add(pass_at_1=0.45, best_of_n=0.55)
    _promote(parent, bad, tmp_path)
    with pytest.raises(RuntimeError, match="not ready at 10%.*champion is version " + good):
        deploy_champion(
            _deploy_config("s3://models/bad"), model_uri=f"models:/{NAME}/{bad}", parent_run_id=parent,
            report_path=str(tmp_path / "bad.md"), kserve_client=kserve, sleep=clock.sleep, clock=clock,
        )  # fmt: skip
    assert _env(_container(api.objects["models", "vlpipe-steps"]))["STORAGE_URI"] == "s3://models/good"
    assert _aliases(client, good) == ["champion"]
    tags = client.get_model_version(NAME, bad).tags
    assert tags["deployment.status"] == "rolled_back" and tags["promotion.decision"] == "rolled_back"
    assert "Rolled back: not ready at 10%" in (tmp_path / "bad.md").read_text()
    failed = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        filter_string="tags.stage = 'deploy'",
        order_by=["start_time DESC"],
    )[0]
    assert failed.info.status == "FAILED"


def test_only_the_champion_is_deployed(registry, tmp_path):
    _, parent, add = registry
    version = add(pass_at_1=0.40, best_of_n=0.50)
    with pytest.raises(ValueError, match="is not the champion"):
        deploy_champion(
            _deploy_config("s3://models/v1"), model_uri=f"models:/{NAME}/{version}", parent_run_id=parent,
            kserve_client=_client(FakeCustomObjectsApi()),
        )  # fmt: skip


def test_a_first_deployment_that_never_gets_ready_leaves_no_champion(registry, tmp_path):
    client, parent, add = registry
    api, clock = FakeCustomObjectsApi(ready=lambda obj: False), FakeClock()
    version = add(pass_at_1=0.40, best_of_n=0.50)
    _promote(parent, version, tmp_path)
    with pytest.raises(RuntimeError, match="nothing serves it and the champion is unset"):
        deploy_champion(
            _deploy_config("s3://models/v1"), model_uri=f"models:/{NAME}/{version}", parent_run_id=parent,
            kserve_client=_client(api), sleep=clock.sleep, clock=clock,
        )  # fmt: skip
    assert clock.now >= 60  # waited the step timeout
    assert _aliases(client, version) == ["challenger"]
    assert client.get_model_version(NAME, version).tags["deployment.status"] == "failed"
