"""The InferenceService manifest, its templates, and apply / canary / promotion / rollback against a stubbed
Kubernetes API: a real `KServeClient` whose `CustomObjectsApi` is an in-memory fake recording every call."""

from __future__ import annotations

import copy
from importlib.metadata import version

import pytest
import yaml
from kserve import KServeClient, V1beta1InferenceService, constants
from kubernetes.client import ApiClient
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from vlpipe.serving.deploy import (
    TEMPLATE_DIR,
    S3Settings,
    ServingDeployment,
    apply_inference_service,
    apply_merge_patch,
    canary_rollout,
    inference_service,
    inference_service_manifest,
    merge_patch,
    promote,
    render_template,
    rollback,
    s3_secret_manifest,
    service_account_manifest,
    wait_ready,
)

OLD = ServingDeployment(name="vlpipe-2b", namespace="models", storage_uri="s3://models/internvl3-2b/sft-v1")
NEW = OLD.model_copy(update={"storage_uri": "s3://models/internvl3-2b/sft-v2", "prm_uri": "s3://models/prm"})


class FakeCustomObjectsApi:
    """In-memory InferenceServices with the API server's merge-patch semantics and KServe-like status.

    `ready(obj)` decides whether an object becomes Ready; `fail_patch(body)` may raise to simulate API errors.
    """

    def __init__(self, ready=lambda obj: True, fail_patch=lambda body: None) -> None:
        self.objects: dict[tuple[str, str], dict] = {}
        self.calls: list[tuple[str, str, dict | None]] = []
        self.ready = ready
        self.fail_patch = fail_patch

    def _check(self, group: str, api_version: str, plural: str) -> None:
        assert (group, api_version, plural) == ("serving.kserve.io", "v1beta1", "inferenceservices")

    def _status(self, obj: dict) -> None:
        canary = obj["spec"]["predictor"].get("canaryTrafficPercent")
        latest = 100 if canary is None else canary
        ready = self.ready(obj)
        obj["status"] = {
            "observedGeneration": obj["metadata"]["generation"]
            if ready
            else obj["metadata"]["generation"] - 1,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "components": {
                "predictor": {
                    "traffic": [
                        {"latestRevision": True, "percent": latest},
                        {"latestRevision": False, "percent": 100 - latest},
                    ]
                }
            },
        }

    def create_namespaced_custom_object(self, group, api_version, namespace, plural, body):
        self._check(group, api_version, plural)
        body = ApiClient().sanitize_for_serialization(body)
        self.calls.append(("create", body["metadata"]["name"], body))
        obj = copy.deepcopy(body)
        obj["metadata"]["generation"] = 1
        self.objects[namespace, obj["metadata"]["name"]] = obj
        self._status(obj)
        return copy.deepcopy(obj)

    def get_namespaced_custom_object(self, group, api_version, namespace, plural, name):
        self._check(group, api_version, plural)
        if (namespace, name) not in self.objects:
            raise ApiException(status=404, reason="Not Found")
        return copy.deepcopy(self.objects[namespace, name])

    def patch_namespaced_custom_object(self, group, api_version, namespace, plural, name, body):
        self._check(group, api_version, plural)
        self.calls.append(("patch", name, copy.deepcopy(body)))
        self.fail_patch(body)
        old = self.objects[namespace, name]
        new = apply_merge_patch({k: v for k, v in old.items() if k != "status"}, body)
        if new["spec"] != old["spec"]:
            new["metadata"]["generation"] = old["metadata"]["generation"] + 1
        self.objects[namespace, name] = new
        self._status(new)
        return copy.deepcopy(new)

    def patches(self) -> list[dict]:
        return [body for kind, _, body in self.calls if kind == "patch"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _client(api: FakeCustomObjectsApi) -> KServeClient:
    client = KServeClient.__new__(KServeClient)  # no kubeconfig: only the custom-objects API is used
    client.api_instance = api
    return client


def _container(obj: dict) -> dict:
    return obj["spec"]["predictor"]["containers"][0]


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# -- manifests -------------------------------------------------------------------------------------------------
def test_inference_service_manifest_fields():
    manifest = inference_service_manifest(
        NEW.model_copy(update={"mlflow_tracking_uri": "http://mlflow:5000"})
    )
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1" and manifest["kind"] == "InferenceService"
    assert manifest["metadata"]["name"] == "vlpipe-2b" and manifest["metadata"]["namespace"] == "models"
    assert manifest["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"
    predictor = manifest["spec"]["predictor"]
    assert predictor["serviceAccountName"] == "vlpipe-serving"
    assert "canaryTrafficPercent" not in predictor
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"
    assert container["image"] == f"ghcr.io/vlpipe/vlpipe-serving:{version('vlpipe')}"
    assert container["command"] == ["vlpipe", "serve"]
    assert container["args"] == [
        "--model-uri", "/mnt/models", "--name", "vlpipe", "--host", "0.0.0.0", "--port", "8080", "--prm-uri", "s3://models/prm",
    ]  # fmt: skip
    env = _env(container)
    assert env["STORAGE_URI"] == "s3://models/internvl3-2b/sft-v2"
    assert env["AWS_ENDPOINT_URL"] == "https://s3.amazonaws.com"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # from the secret, never inline
        assert env[key] == {"secretKeyRef": {"name": "vlpipe-s3", "key": key}}
    assert container["resources"] == {
        "requests": {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": "1"},
        "limits": {"memory": "32Gi", "nvidia.com/gpu": "1"},
    }
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/models/vlpipe/ready", "port": 8080}
    cpu_only = inference_service_manifest(OLD.model_copy(update={"gpus": 0, "canary_traffic_percent": 20}))
    assert (
        "nvidia.com/gpu" not in str(cpu_only) and cpu_only["spec"]["predictor"]["canaryTrafficPercent"] == 20
    )


def test_typed_object_is_the_same_manifest():
    isvc = inference_service(NEW)
    assert isinstance(isvc, V1beta1InferenceService)
    assert isvc.api_version == constants.KSERVE_V1BETA1
    assert ApiClient().sanitize_for_serialization(isvc) == inference_service_manifest(NEW)


@pytest.mark.parametrize(
    "update",
    [
        {"storage_uri": "gs://bucket/model"},
        {"storage_uri": "s3://bucket-only"},
        {"name": "Bad_Name"},
        {"prm_uri": "http://example.org/prm"},
        {"min_replicas": 3, "max_replicas": 2},
        {"gpus": -1},
        {"replicas": 2},
    ],
)
def test_deployment_config_is_validated(update):
    with pytest.raises(ValidationError):
        ServingDeployment.model_validate(OLD.model_dump() | update)


def test_s3_secret_and_service_account():
    config = OLD.model_copy(update={"s3": S3Settings(endpoint="minio.minio:9000", use_https=False)})
    secret, account = s3_secret_manifest(config), service_account_manifest(config)
    annotations = {
        "serving.kserve.io/s3-endpoint": "minio.minio:9000",
        "serving.kserve.io/s3-usehttps": "0",
        "serving.kserve.io/s3-region": "us-east-1",
        "serving.kserve.io/s3-verifyssl": "1",
        "serving.kserve.io/s3-usevirtualbucket": "false",
        "serving.kserve.io/s3-useanoncredential": "false",
    }
    assert secret["metadata"]["annotations"] == annotations == account["metadata"]["annotations"]
    assert account["secrets"] == [{"name": "vlpipe-s3"}]
    # No credential values anywhere: placeholders only.
    assert secret["stringData"] == {
        "AWS_ACCESS_KEY_ID": "${AWS_ACCESS_KEY_ID}",
        "AWS_SECRET_ACCESS_KEY": "${AWS_SECRET_ACCESS_KEY}",
    }
    assert "data" not in secret
    assert (
        _env(_container(inference_service_manifest(config)))["AWS_ENDPOINT_URL"] == "http://minio.minio:9000"
    )


def _template_values(config: ServingDeployment) -> dict[str, str]:
    return {
        "NAME": config.name,
        "NAMESPACE": config.namespace,
        "STORAGE_URI": config.storage_uri,
        "VLPIPE_VERSION": version("vlpipe"),
        "AWS_ENDPOINT_URL": config.s3.endpoint_url,
        "S3_ENDPOINT": config.s3.endpoint,
        "S3_USE_HTTPS": "1" if config.s3.use_https else "0",
        "S3_REGION": config.s3.region,
        "S3_VERIFY_SSL": "1" if config.s3.verify_ssl else "0",
    }


def test_templates_match_the_generated_manifests():
    config = OLD.model_copy(
        update={"s3": S3Settings(endpoint="minio.minio:9000", use_https=False, region="eu")}
    )
    values = _template_values(config)
    assert render_template("inferenceservice.yaml", values) == inference_service_manifest(config)
    assert render_template("service-account.yaml", values) == service_account_manifest(config)
    assert render_template("s3-secret.yaml", values) == s3_secret_manifest(config)
    assert sorted(p.name for p in TEMPLATE_DIR.glob("*.yaml")) == [
        "inferenceservice.yaml", "s3-secret.yaml", "service-account.yaml",
    ]  # fmt: skip
    # The secret template holds placeholders, never credentials.
    raw = yaml.safe_load((TEMPLATE_DIR / "s3-secret.yaml").read_text())
    assert raw["stringData"] == {k: f"${{{k}}}" for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    assert "data" not in raw


# -- merge patches -----------------------------------------------------------------------------------------------
def test_merge_patch_round_trips():
    old = {"a": 1, "b": {"c": 2, "d": [1, 2]}, "gone": {"x": 1}}
    new = {"a": 1, "b": {"c": 3, "d": [2]}, "added": "y"}
    patch = merge_patch(old, new)
    assert patch == {"gone": None, "b": {"c": 3, "d": [2]}, "added": "y"}
    assert apply_merge_patch(old, patch) == new
    assert apply_merge_patch(old, merge_patch(old, old)) == old and merge_patch(old, old) == {}


# -- apply, canary, promotion, rollback --------------------------------------------------------------------------
def test_apply_creates_then_patches_only_what_changed():
    api = FakeCustomObjectsApi()
    client = _client(api)
    created = apply_inference_service(OLD, client)
    assert api.calls[0][0] == "create" and api.calls[0][2] == inference_service_manifest(OLD)
    assert created["metadata"]["generation"] == 1
    assert apply_inference_service(OLD, client)["metadata"]["generation"] == 1  # unchanged: no patch at all
    assert api.patches() == []
    apply_inference_service(NEW.model_copy(update={"labels": {"team": "vlm"}}), client)
    (patch,) = api.patches()
    assert patch["metadata"] == {"labels": {"team": "vlm"}}
    assert set(patch["spec"]["predictor"]) == {"containers"}  # lists are replaced whole by a merge patch
    stored = api.objects["models", "vlpipe-2b"]
    assert stored["spec"] == inference_service_manifest(NEW)["spec"]
    assert stored["metadata"]["generation"] == 2


def test_canary_rollout_promotes_step_by_step():
    api = FakeCustomObjectsApi()
    client = _client(api)
    apply_inference_service(OLD, client)
    clock = FakeClock()
    result = canary_rollout(NEW, client, poll_interval_s=5, sleep=clock.sleep, clock=clock)
    assert result.promoted and result.reason is None
    assert [(s.percent, s.ready) for s in result.steps] == [(10, True), (50, True), (100, True)]
    first, *rest = api.patches()
    assert first["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert _env(first["spec"]["predictor"]["containers"][0])["STORAGE_URI"] == NEW.storage_uri
    assert rest == [{"spec": {"predictor": {"canaryTrafficPercent": p}}} for p in (50, 100)]
    stored = api.objects["models", "vlpipe-2b"]["spec"]["predictor"]
    assert (
        stored["canaryTrafficPercent"] == 100
        and _env(stored["containers"][0])["STORAGE_URI"] == NEW.storage_uri
    )
    assert result.previous_predictor == inference_service_manifest(OLD)["spec"]["predictor"]
    assert clock.sleeps == []  # ready at once: no waiting


def test_canary_rolls_back_when_a_step_is_not_ready_in_time():
    api = FakeCustomObjectsApi(ready=lambda obj: obj["spec"]["predictor"].get("canaryTrafficPercent") != 50)
    client = _client(api)
    apply_inference_service(OLD, client)
    clock = FakeClock()
    result = canary_rollout(
        NEW, client, step_timeout_s=60, poll_interval_s=10, sleep=clock.sleep, clock=clock
    )
    assert not result.promoted and result.reason == "not ready at 50% within 60 s"
    assert [(s.percent, s.ready) for s in result.steps] == [(10, True), (50, False)]
    assert result.steps[1].waited_s == 60 and clock.sleeps == [10] * 6  # bounded by the step timeout
    *_, to_zero, restore = api.patches()
    assert to_zero == {"spec": {"predictor": {"canaryTrafficPercent": 0}}}
    assert restore["spec"]["predictor"]["canaryTrafficPercent"] is None  # the previous spec had none
    assert api.objects["models", "vlpipe-2b"]["spec"] == inference_service_manifest(OLD)["spec"]


def test_canary_rolls_back_when_the_api_fails_mid_rollout():
    def fail_at_100(body):
        if body == {"spec": {"predictor": {"canaryTrafficPercent": 100}}}:
            raise ApiException(status=500, reason="Internal Server Error")

    api = FakeCustomObjectsApi(fail_patch=fail_at_100)
    client = _client(api)
    apply_inference_service(OLD, client)
    result = canary_rollout(NEW, client, sleep=lambda s: None)
    assert not result.promoted and result.reason.startswith("step 100%: ApiException")
    assert [s.percent for s in result.steps] == [10, 50]
    assert api.patches()[-2] == {"spec": {"predictor": {"canaryTrafficPercent": 0}}}
    assert api.objects["models", "vlpipe-2b"]["spec"] == inference_service_manifest(OLD)["spec"]


def test_canary_needs_an_existing_service_and_valid_steps():
    client = _client(FakeCustomObjectsApi())
    with pytest.raises(ValueError, match="does not exist; create it with apply_inference_service"):
        canary_rollout(NEW, client)
    for steps in ([10, 50], [50, 10, 100], [0, 100], [10, 10, 100], []):
        with pytest.raises(ValueError, match="canary steps"):
            canary_rollout(NEW, client, steps=steps)


def test_promote_and_rollback_are_patches():
    api = FakeCustomObjectsApi()
    client = _client(api)
    apply_inference_service(OLD.model_copy(update={"canary_traffic_percent": 10}), client)
    assert promote(client, "vlpipe-2b", "models")["spec"]["predictor"]["canaryTrafficPercent"] == 100
    assert rollback(client, "vlpipe-2b", "models")["spec"]["predictor"]["canaryTrafficPercent"] == 0
    assert api.patches()[-2:] == [
        {"spec": {"predictor": {"canaryTrafficPercent": 100}}},
        {"spec": {"predictor": {"canaryTrafficPercent": 0}}},
    ]


def test_wait_ready_checks_generation_and_traffic():
    api = FakeCustomObjectsApi()
    client = _client(api)
    created = apply_inference_service(OLD.model_copy(update={"canary_traffic_percent": 10}), client)
    generation = created["metadata"]["generation"]
    clock = FakeClock()
    kwargs = {"timeout_s": 30, "poll_interval_s": 10, "sleep": clock.sleep, "clock": clock}
    assert wait_ready(client, "vlpipe-2b", "models", generation, percent=10, **kwargs)
    assert not wait_ready(client, "vlpipe-2b", "models", generation, percent=50, **kwargs)  # wrong split
    assert not wait_ready(client, "vlpipe-2b", "models", generation + 1, **kwargs)  # not yet observed
    assert clock.now == 60
