"""The InferenceService manifest, its templates, and apply / canary / promotion / rollback against a stubbed
Kubernetes API: a real `KServeClient` whose `CustomObjectsApi` is an in-memory fake recording every call. The
rollout tests run for both runtimes (vlpipe's predictor container, KServe's Hugging Face runtime with vLLM)."""

from __future__ import annotations

import copy
from importlib.metadata import version

import pytest
import yaml
from kserve import (
    KServeClient,
    V1beta1InferenceService,
    V1beta1ModelFormat,
    V1beta1ModelSpec,
    V1beta1PredictorSpec,
    constants,
)
from kserve import models as kserve_models
from kubernetes.client import ApiClient
from kubernetes.client import models as k8s_models
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
    serve_args,
    serve_overrides,
    service_account_manifest,
    wait_ready,
)
from vlpipe.serving.limits import ServingLimits

OLD = ServingDeployment(name="vlpipe-2b", namespace="models", storage_uri="s3://models/internvl3-2b/sft-v1")
NEW = OLD.model_copy(update={"storage_uri": "s3://models/internvl3-2b/sft-v2", "prm_uri": "s3://models/prm"})
RUNTIMES = ("vlpipe", "huggingface-vllm")


def _pair(runtime: str) -> tuple[ServingDeployment, ServingDeployment]:
    """The old and new deployment of a rollout on `runtime` (the PRM only where the runtime has Best-of-N)."""
    if runtime == "vlpipe":
        return OLD, NEW
    old = ServingDeployment.model_validate(OLD.model_dump() | {"runtime": runtime})
    new = ServingDeployment.model_validate(old.model_dump() | {"storage_uri": NEW.storage_uri})
    return old, new


def _storage_uri(obj: dict) -> str:
    """Where the predictor's checkpoint comes from, on either runtime."""
    predictor = obj["spec"]["predictor"]
    if "model" in predictor:
        return predictor["model"]["storageUri"]
    return _env(predictor["containers"][0])["STORAGE_URI"]


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


VLLM = ServingDeployment(
    name="internvl3-2b",
    namespace="models",
    storage_uri="s3://models/internvl3-2b/v3/artifacts/checkpoint",
    runtime="huggingface-vllm",
    gpus=2,
    cpu="8",
    memory="48Gi",
    min_replicas=1,
    max_replicas=3,
    serve={"max_images": 2, "batch_max_size": 64},
    vllm={"max_model_len": 8192, "gpu_memory_utilization": 0.85},
)


def test_vllm_inference_service_is_a_kserve_object():
    """KServe's Hugging Face runtime (`kserve-huggingfaceserver`, config/runtimes/kserve-huggingfaceserver.yaml:
    supportedModelFormats `huggingface`) with the vLLM backend (huggingfaceserver/__main__.py: `--backend`,
    `--model_name`, `--dtype`, `--max_model_len`; vLLM's engine flags on the same parser)."""
    isvc = inference_service(VLLM)
    assert isinstance(isvc, V1beta1InferenceService)
    predictor = isvc.spec.predictor
    assert isinstance(predictor, V1beta1PredictorSpec) and predictor.containers is None
    model = predictor.model
    assert isinstance(model, V1beta1ModelSpec) and isinstance(model.model_format, V1beta1ModelFormat)
    assert model.model_format.name == "huggingface" and model.runtime == "kserve-huggingfaceserver"
    manifest = inference_service_manifest(VLLM)
    # The manifest reads back into KServe's own models unchanged: every field one the SDK knows, of its type.
    again = typed(manifest, "V1beta1InferenceService")
    assert ApiClient().sanitize_for_serialization(again) == manifest
    spec = manifest["spec"]["predictor"]
    assert set(spec) == {"model", "serviceAccountName", "minReplicas", "maxReplicas"}
    assert spec["serviceAccountName"] == "vlpipe-serving" and (spec["minReplicas"], spec["maxReplicas"]) == (
        1,
        3,
    )
    assert spec["model"] == {
        "name": "kserve-container",
        "modelFormat": {"name": "huggingface"},
        "runtime": "kserve-huggingfaceserver",
        "storageUri": "s3://models/internvl3-2b/v3/artifacts/checkpoint",
        "args": [
            "--model_name=vlpipe",
            "--backend=vllm",
            "--dtype=bfloat16",  # the exported checkpoints' dtype; the server's "auto" would be float16
            "--tensor-parallel-size=2",  # one rank per GPU
            "--max_model_len=8192",
            "--gpu-memory-utilization=0.85",
            '--limit-mm-per-prompt={"image": 2}',  # serve.max_images
            "--max-num-seqs=64",  # serve.batch_max_size
        ],
        "resources": {
            "requests": {"cpu": "8", "memory": "48Gi", "nvidia.com/gpu": "2"},
            "limits": {"cpu": "8", "memory": "48Gi", "nvidia.com/gpu": "2"},
        },
    }
    assert manifest["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"
    assert "AWS_" not in str(manifest)  # KServe's storage initializer reads the service account's S3 secret


_PLAIN_TYPES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}


def typed(value, type_name: str):
    """`value` (a manifest dict) built into KServe's / Kubernetes' SDK models, strictly: a key the model does not
    declare, a value of the wrong type or a missing required field fails. (`kserve.ApiClient.deserialize` does
    the same but cannot reach the Kubernetes models that KServe's refer to.)"""
    if value is None:
        return None
    if type_name.startswith("list["):
        assert isinstance(value, list), f"{type_name}: {value!r}"
        return [typed(v, type_name[5:-1]) for v in value]
    if type_name.startswith("dict("):
        assert isinstance(value, dict), f"{type_name}: {value!r}"
        inner = type_name[type_name.index(",") + 1 : -1].strip()
        return {k: typed(v, inner) for k, v in value.items()}
    if type_name in _PLAIN_TYPES:
        assert isinstance(value, _PLAIN_TYPES[type_name]), f"{type_name}: {value!r}"
        return value
    cls = getattr(kserve_models, type_name, None) or getattr(k8s_models, type_name)
    by_json = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    unknown = set(value) - set(by_json)
    assert not unknown, f"{type_name} has no field(s) {sorted(unknown)}"
    return cls(**{by_json[k]: typed(v, cls.openapi_types[by_json[k]]) for k, v in value.items()})


def test_the_strict_reader_refuses_wrong_manifests():
    manifest = inference_service_manifest(VLLM)
    wrong = copy.deepcopy(manifest)
    wrong["spec"]["predictor"]["model"]["modelFormat"]["nam"] = "huggingface"  # a typo
    with pytest.raises(AssertionError, match="V1beta1ModelFormat has no field"):
        typed(wrong, "V1beta1InferenceService")
    wrong = copy.deepcopy(manifest)
    wrong["spec"]["predictor"]["minReplicas"] = "one"
    with pytest.raises(AssertionError, match="int: 'one'"):
        typed(wrong, "V1beta1InferenceService")
    wrong = inference_service_manifest(NEW)
    del wrong["spec"]["predictor"]["containers"][0]["name"]  # required by the Kubernetes model
    with pytest.raises(ValueError, match="`name`, must not be `None`"):
        typed(wrong, "V1beta1InferenceService")
    assert typed(inference_service_manifest(NEW), "V1beta1InferenceService").spec.predictor.containers


def test_vllm_defaults_one_gpu_no_limits():
    minimal = ServingDeployment(name="m", storage_uri="s3://b/ckpt", runtime="huggingface-vllm")
    assert inference_service(minimal).spec.predictor.model.args == [
        "--model_name=vlpipe", "--backend=vllm", "--dtype=bfloat16",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("update", "message"),
    [
        (
            {"prm_uri": "s3://models/prm"},
            "prm_uri is set: Best-of-N with a PRM \\(best_of\\) runs only in vlpipe's predictor.*set runtime: vlpipe",
        ),
        ({"serve": {"max_best_of": 4}}, "serve.max_best_of does not apply.*best_of needs a PRM"),
        (
            {"serve": {"max_tokens": 512}},
            "serve.max_tokens does not apply.*no server cap on a request's max_tokens",
        ),
        (
            {"serve": {"max_body_bytes": 1024}},
            "serve.max_body_bytes does not apply.*vLLM maps only: max_images, batch_max_size",
        ),
        ({"gpus": 0}, "runs vLLM on GPUs: set gpus ≥ 1"),
    ],
)
def test_vllm_runtime_refuses_what_it_cannot_serve(update, message):
    with pytest.raises(ValidationError, match=message):
        ServingDeployment.model_validate(VLLM.model_dump() | update)


def test_vllm_settings_need_the_vllm_runtime():
    with pytest.raises(ValidationError, match="vllm settings apply to runtime: huggingface-vllm"):
        ServingDeployment.model_validate(OLD.model_dump() | {"vllm": {"max_model_len": 4096}})
    with pytest.raises(ValidationError, match="dtype"):
        ServingDeployment.model_validate(VLLM.model_dump() | {"vllm": {"dtype": "int8"}})


def test_serve_settings_are_vlpipe_serve_flags():
    config = ServingDeployment.model_validate(
        OLD.model_dump() | {"serve": {"max_tokens": 512, "header_timeout_s": 5, "max_images": "2"}}
    )
    args = _container(inference_service_manifest(config))["args"]
    # In ServingLimits' field order, values as validated ("2" → 2, 5 → 5.0), after the fixed flags.
    assert args[8:] == ["--max-images", "2", "--max-tokens", "512", "--header-timeout-s", "5.0"]
    assert args[:8] == [
        "--model-uri",
        "/mnt/models",
        "--name",
        "vlpipe",
        "--host",
        "0.0.0.0",
        "--port",
        "8080",
    ]


def test_every_serving_limit_renders_generically():
    """Whatever fields ServingLimits has (new ones too), each set field is one `--<name with ->` flag."""
    every = {name: getattr(ServingLimits(), name) for name in ServingLimits.model_fields}
    args = serve_args(serve_overrides(every))
    flags = args[::2]
    assert flags == [f"--{name.replace('_', '-')}" for name in ServingLimits.model_fields]
    assert args[1::2] == [str(value) for value in every.values()]


@pytest.mark.parametrize(
    ("serve", "message"),
    [
        ({"max_tokenz": 512}, "serve.max_tokenz: not a serving limit \\(known: max_body_bytes, "),
        ({"max_tokens": 0}, "serve.max_tokens: Input should be greater than 0"),
        ({"max_tokens": "many"}, "serve.max_tokens: Input should be a valid integer"),
        ({"max_tokens": 8}, "serve: default_max_tokens \\(256\\) must not exceed max_tokens \\(8\\)"),
    ],
)
def test_unknown_or_bad_serve_settings_are_refused(serve, message):
    with pytest.raises(ValidationError, match=message):
        ServingDeployment.model_validate(OLD.model_dump() | {"serve": serve})


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
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_apply_creates_then_patches_only_what_changed(runtime):
    old, new = _pair(runtime)
    api = FakeCustomObjectsApi()
    client = _client(api)
    created = apply_inference_service(old, client)
    assert api.calls[0][0] == "create" and api.calls[0][2] == inference_service_manifest(old)
    assert created["metadata"]["generation"] == 1
    assert apply_inference_service(old, client)["metadata"]["generation"] == 1  # unchanged: no patch at all
    assert api.patches() == []
    apply_inference_service(new.model_copy(update={"labels": {"team": "vlm"}}), client)
    (patch,) = api.patches()
    assert patch["metadata"] == {"labels": {"team": "vlm"}}
    if runtime == "vlpipe":
        assert set(patch["spec"]["predictor"]) == {"containers"}  # lists are replaced whole by a merge patch
    else:
        assert patch["spec"]["predictor"] == {"model": {"storageUri": new.storage_uri}}
    stored = api.objects["models", "vlpipe-2b"]
    assert stored["spec"] == inference_service_manifest(new)["spec"]
    assert stored["metadata"]["generation"] == 2


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_canary_rollout_promotes_step_by_step(runtime):
    old, new = _pair(runtime)
    api = FakeCustomObjectsApi()
    client = _client(api)
    apply_inference_service(old, client)
    clock = FakeClock()
    result = canary_rollout(new, client, poll_interval_s=5, sleep=clock.sleep, clock=clock)
    assert result.promoted and result.reason is None
    assert [(s.percent, s.ready) for s in result.steps] == [(10, True), (50, True), (100, True)]
    first, *rest = api.patches()
    assert first["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert _storage_uri(apply_merge_patch(inference_service_manifest(old), first)) == new.storage_uri
    assert rest == [{"spec": {"predictor": {"canaryTrafficPercent": p}}} for p in (50, 100)]
    stored = api.objects["models", "vlpipe-2b"]
    assert stored["spec"]["predictor"]["canaryTrafficPercent"] == 100
    assert _storage_uri(stored) == new.storage_uri
    assert result.previous_predictor == inference_service_manifest(old)["spec"]["predictor"]
    assert clock.sleeps == []  # ready at once: no waiting


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_canary_rolls_back_when_a_step_is_not_ready_in_time(runtime):
    old, new = _pair(runtime)
    api = FakeCustomObjectsApi(ready=lambda obj: obj["spec"]["predictor"].get("canaryTrafficPercent") != 50)
    client = _client(api)
    apply_inference_service(old, client)
    clock = FakeClock()
    result = canary_rollout(
        new, client, step_timeout_s=60, poll_interval_s=10, sleep=clock.sleep, clock=clock
    )
    assert not result.promoted and result.reason == "not ready at 50% within 60 s"
    assert [(s.percent, s.ready) for s in result.steps] == [(10, True), (50, False)]
    assert result.steps[1].waited_s == 60 and clock.sleeps == [10] * 6  # bounded by the step timeout
    *_, to_zero, restore = api.patches()
    assert to_zero == {"spec": {"predictor": {"canaryTrafficPercent": 0}}}
    assert restore["spec"]["predictor"]["canaryTrafficPercent"] is None  # the previous spec had none
    assert api.objects["models", "vlpipe-2b"]["spec"] == inference_service_manifest(old)["spec"]
    assert _storage_uri(api.objects["models", "vlpipe-2b"]) == old.storage_uri


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_canary_rolls_back_when_the_api_fails_mid_rollout(runtime):
    old, new = _pair(runtime)

    def fail_at_100(body):
        if body == {"spec": {"predictor": {"canaryTrafficPercent": 100}}}:
            raise ApiException(status=500, reason="Internal Server Error")

    api = FakeCustomObjectsApi(fail_patch=fail_at_100)
    client = _client(api)
    apply_inference_service(old, client)
    result = canary_rollout(new, client, sleep=lambda s: None)
    assert not result.promoted and result.reason.startswith("step 100%: ApiException")
    assert [s.percent for s in result.steps] == [10, 50]
    assert api.patches()[-2] == {"spec": {"predictor": {"canaryTrafficPercent": 0}}}
    assert api.objects["models", "vlpipe-2b"]["spec"] == inference_service_manifest(old)["spec"]


def test_a_canary_can_switch_runtimes_and_rolls_back_to_the_previous_one():
    """vlpipe's container → the vLLM runtime: the patch swaps `containers` for `model`; a failed step puts the
    container predictor back whole."""
    old, (_, new) = OLD, _pair("huggingface-vllm")
    api = FakeCustomObjectsApi(ready=lambda obj: "model" not in obj["spec"]["predictor"])
    client = _client(api)
    apply_inference_service(old, client)
    clock = FakeClock()
    result = canary_rollout(
        new, client, step_timeout_s=30, poll_interval_s=10, sleep=clock.sleep, clock=clock
    )
    assert not result.promoted and result.reason == "not ready at 10% within 30 s"
    first = api.patches()[0]["spec"]["predictor"]
    assert first["containers"] is None and first["model"]["modelFormat"] == {"name": "huggingface"}
    assert first["canaryTrafficPercent"] == 10
    assert api.objects["models", "vlpipe-2b"]["spec"] == inference_service_manifest(old)["spec"]


def test_canary_needs_an_existing_service_and_valid_steps():
    client = _client(FakeCustomObjectsApi())
    with pytest.raises(ValueError, match="does not exist; create it with apply_inference_service"):
        canary_rollout(NEW, client)
    for steps in ([10, 50], [50, 10, 100], [0, 100], [10, 10, 100], []):
        with pytest.raises(ValueError, match="canary steps"):
            canary_rollout(NEW, client, steps=steps)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_promote_and_rollback_are_patches(runtime):
    old, _ = _pair(runtime)
    api = FakeCustomObjectsApi()
    client = _client(api)
    apply_inference_service(old.model_copy(update={"canary_traffic_percent": 10}), client)
    assert promote(client, "vlpipe-2b", "models")["spec"]["predictor"]["canaryTrafficPercent"] == 100
    assert rollback(client, "vlpipe-2b", "models")["spec"]["predictor"]["canaryTrafficPercent"] == 0
    assert api.patches()[-2:] == [
        {"spec": {"predictor": {"canaryTrafficPercent": 100}}},
        {"spec": {"predictor": {"canaryTrafficPercent": 0}}},
    ]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_wait_ready_checks_generation_and_traffic(runtime):
    old, _ = _pair(runtime)
    api = FakeCustomObjectsApi()
    client = _client(api)
    created = apply_inference_service(old.model_copy(update={"canary_traffic_percent": 10}), client)
    generation = created["metadata"]["generation"]
    clock = FakeClock()
    kwargs = {"timeout_s": 30, "poll_interval_s": 10, "sleep": clock.sleep, "clock": clock}
    assert wait_ready(client, "vlpipe-2b", "models", generation, percent=10, **kwargs)
    assert not wait_ready(client, "vlpipe-2b", "models", generation, percent=50, **kwargs)  # wrong split
    assert not wait_ready(client, "vlpipe-2b", "models", generation + 1, **kwargs)  # not yet observed
    assert clock.now == 60


def test_serve_flags_are_the_ones_vlpipe_serve_takes():
    """The rendered flags parse with `vlpipe serve`'s own command line, to the values they came from. Until
    `vlpipe serve` has a flag per ServingLimits field (issue #20's engine work) there is nothing to parse."""
    from typer.main import get_command

    from vlpipe.pipelines.cli import app

    command = get_command(app).get_command(None, "serve")
    options = {opt for param in command.params for opt in getattr(param, "opts", ())}
    every = {name: getattr(ServingLimits(), name) for name in ServingLimits.model_fields}
    flags = {f"--{name.replace('_', '-')}": name for name in every}
    missing = sorted(set(flags) - options)
    if len(missing) == len(flags):
        pytest.skip("vlpipe serve has no ServingLimits flags yet")
    assert not missing, f"vlpipe serve lacks {missing}"
    context = command.make_context(
        "serve", ["--model-uri", "/mnt/models", *serve_args(serve_overrides(every))]
    )
    params = {k: v for k, v in context.params.items() if k in every}
    assert params == every
