"""The KServe InferenceService of the predictor, applied with `kserve.KServeClient`, and canary rollouts.

`inference_service(config)` builds a `V1beta1InferenceService` with a custom-container predictor: the container
`kserve-container` runs `vlpipe serve --model-uri /mnt/models` from `ghcr.io/vlpipe/vlpipe-serving:<vlpipe version>`; its
`STORAGE_URI` env (an `s3://` checkpoint) makes KServe's storage initializer download the checkpoint into
`/mnt/models` with the credentials of the service account's S3 secret (KServe's `serving.kserve.io/s3-*`
annotations say where the endpoint is). The same secret gives the container AWS variables for a PRM on S3.
`inference_service_manifest` is the same object as a plain dict (what `kubectl apply` takes).

A canary is a patch: `KServeClient` has no canary helpers. `canary_rollout` merge-patches the new predictor
in with `canaryTrafficPercent` at the first step (KServe then splits traffic between the new revision and the
last rolled-out one), raises the percentage step by step (10 → 50 → 100 by default) once the service is Ready
at the patched generation, and promotes at 100%. If a step is not ready within its timeout, or a patch fails,
it rolls back: `canaryTrafficPercent: 0` (all traffic back on the previous revision at once), then the previous
predictor spec is restored, so the bad spec is not rolled out again.

Two runtimes (`ServingDeployment.runtime`): `vlpipe` (default) runs vlpipe's own predictor as above, with the
`serve` settings (`vlpipe.serving.limits.ServingLimits` overrides) as `vlpipe serve` flags; `huggingface-vllm` puts
the checkpoint on KServe's Hugging Face serving runtime (`kserve-huggingfaceserver`, `modelFormat: huggingface`)
with its vLLM backend: `predictor.model` with `storageUri` (the checkpoint directory itself, `config.json` at its
root) and the runtime's arguments (`--model_name`, `--backend=vllm`, `--dtype`, vLLM engine flags). vLLM serves
vlpipe's transformers-format checkpoints (`InternVLForConditionalGeneration`, no remote code) with integer
positions and no PRM: only checkpoints whose V2PE δ is 1 and deployments without `best_of` (`prm_uri`) may use
it (`vllm_runtime_problems`, `check_vllm_checkpoint`). Canary, promotion and rollback are the same patches of
`spec.predictor` for both.

Templates of the ServiceAccount, the S3 Secret (placeholders only, never values) and the InferenceService
live in `infra/k8s/serving/`; `render_template` fills their `${...}` placeholders.
"""

from __future__ import annotations

import copy
import json
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vlpipe.serving.limits import ServingLimits

if TYPE_CHECKING:
    from kserve import KServeClient, V1beta1InferenceService

IMAGE_REPOSITORY = "ghcr.io/vlpipe/vlpipe-serving"
CONTAINER_NAME = "kserve-container"  # the name KServe's webhook looks for (STORAGE_URI, model mount)
MODEL_MOUNT = "/mnt/models"  # where KServe's storage initializer puts STORAGE_URI
GPU_RESOURCE = "nvidia.com/gpu"
S3_KEY_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "infra" / "k8s" / "serving"
DEFAULT_CANARY_STEPS = (10, 50, 100)
_DNS_1035 = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
_DNS_1123 = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

Runtime = Literal["vlpipe", "huggingface-vllm"]
VLPIPE_RUNTIME, VLLM_RUNTIME = "vlpipe", "huggingface-vllm"
HF_MODEL_FORMAT = "huggingface"  # the ClusterServingRuntime's supportedModelFormats name
HF_SERVING_RUNTIME = "kserve-huggingfaceserver"
# The checkpoint config key of the inference V2PE δ (vlpipe.model.build.V2PE_CONFIG_KEY; a test checks).
V2PE_CONFIG_KEY = "v2pe_delta"
VLLM_ARCHITECTURES = ("InternVLForConditionalGeneration",)
"""Checkpoint architectures vLLM serves natively that vlpipe writes (vLLM maps transformers' InternVL format to
its `interns1` model; OpenGVLab's remote-code `InternVLChatModel` is another format vlpipe does not write)."""
VLLM_LIMIT_FLAGS: dict[str, Callable[[Any], str]] = {
    # The images of one prompt: vLLM refuses a request with more (400), as vlpipe's max_images does.
    "max_images": lambda value: "--limit-mm-per-prompt=" + json.dumps({"image": int(value)}),
    # Answer rows decoded together: vLLM's sequences per scheduler iteration (a request with n answers is n).
    "batch_max_size": lambda value: f"--max-num-seqs={int(value)}",
}
"""`ServingLimits` fields with a vLLM engine equivalent, and the flag each becomes; the others are refused."""
_NO_VLLM_EQUIVALENT = {
    "max_tokens": "vLLM has no server cap on a request's max_tokens (deploy.vllm.max_model_len bounds prompt "
    "and answer together, a different limit)",
    "default_max_tokens": "vLLM answers up to the context length when a request gives no max_tokens",
    "max_best_of": "best_of needs a PRM, which only the vlpipe runtime runs",
    "max_image_pixels": "vLLM's InternVL processor tiles any image size; it has no pixel cap",
}


def serving_image(package_version: str | None = None) -> str:
    """The serving image of a vlpipe version (default: the installed one)."""
    return f"{IMAGE_REPOSITORY}:{package_version or version('vlpipe')}"


class S3Settings(BaseModel):
    """Where the S3 (or S3-compatible) storage is; written as KServe's `serving.kserve.io/s3-*` annotations.

    Attributes:
        endpoint: host[:port] without a scheme, e.g. `s3.amazonaws.com` or `minio.minio:9000`.
        use_https: `s3-usehttps`.
        region: `s3-region`.
        verify_ssl: `s3-verifyssl`.
        use_virtual_bucket: `s3-usevirtualbucket` (virtual-hosted-style addressing).
        secret_name: the Secret holding `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint: str = Field(default="s3.amazonaws.com", pattern=r"^[^/:\s]+(:\d+)?$")
    use_https: bool = True
    region: str = Field(default="us-east-1", min_length=1)
    verify_ssl: bool = True
    use_virtual_bucket: bool = False
    secret_name: str = Field(default="vlpipe-s3", pattern=_DNS_1123, max_length=253)

    @property
    def endpoint_url(self) -> str:
        """The endpoint as a URL, for `AWS_ENDPOINT_URL`."""
        return f"{'https' if self.use_https else 'http'}://{self.endpoint}"

    def annotations(self) -> dict[str, str]:
        """KServe's S3 annotations (strings, as Kubernetes annotations are)."""
        return {
            "serving.kserve.io/s3-endpoint": self.endpoint,
            "serving.kserve.io/s3-usehttps": "1" if self.use_https else "0",
            "serving.kserve.io/s3-region": self.region,
            "serving.kserve.io/s3-verifyssl": "1" if self.verify_ssl else "0",
            "serving.kserve.io/s3-usevirtualbucket": "true" if self.use_virtual_bucket else "false",
            "serving.kserve.io/s3-useanoncredential": "false",
        }


class VLLMSettings(BaseModel):
    """vLLM engine settings of the `huggingface-vllm` runtime (flags of KServe's Hugging Face server).

    Attributes:
        dtype: `--dtype` of the weights. The server turns `auto` into float16 on a GPU, which is not the
            bf16 vlpipe exports (`registry.save_dtype`): say the dtype.
        max_model_len: `--max_model_len`, the context length (prompt + answer, image tokens included); None:
            the checkpoint's `max_position_embeddings`.
        gpu_memory_utilization: `--gpu-memory-utilization`, the share of GPU memory vLLM may take (its
            default when None).
        enforce_eager: `--enforce-eager` (no CUDA graphs).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: Literal["bfloat16", "float16", "float32", "auto"] = "bfloat16"
    max_model_len: int | None = Field(default=None, gt=0)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    enforce_eager: bool = False


def serve_overrides(serve: dict[str, Any], where: str = "serve") -> dict[str, Any]:
    """`serve` checked against `ServingLimits` (unknown keys and bad values refused), as the validated values
    of the keys it sets, in the order `ServingLimits` declares them.

    Raises:
        ValueError: naming `<where>.<key>` and what is wrong.
    """
    try:
        limits = ServingLimits.model_validate(serve)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first.get("loc", ()))
        problem = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        if first.get("type") == "extra_forbidden":
            problem = f"not a serving limit (known: {', '.join(ServingLimits.model_fields)})"
        raise ValueError(f"{where}.{key}: {problem}" if key else f"{where}: {problem}") from None
    return {name: getattr(limits, name) for name in ServingLimits.model_fields if name in serve}


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def serve_args(serve: dict[str, Any]) -> list[str]:
    """`vlpipe serve` flags for `ServingLimits` overrides: `--<field with _ as -> <value>` for every set field."""
    args: list[str] = []
    for name, value in serve.items():
        args += [f"--{name.replace('_', '-')}", _flag_value(value)]
    return args


def vllm_runtime_problems(
    *, serve: dict[str, Any], prm_uri: str | None, gpus: int, keys: dict[str, str] | None = None
) -> list[str]:
    """Why a deployment cannot use the `huggingface-vllm` runtime (empty when it can).

    Args:
        serve: the `ServingLimits` overrides.
        prm_uri: the PRM for `best_of`, if any.
        gpus: GPUs per replica.
        keys: how to name `runtime`, `serve`, `prm_uri` and `gpus` in messages (a recipe's `deploy.runtime`, ...).
    """
    names = {"runtime": "runtime", "serve": "serve", "prm_uri": "prm_uri", "gpus": "gpus", **(keys or {})}
    fix = f"or set {names['runtime']}: vlpipe"
    problems = []
    if prm_uri is not None:
        problems.append(
            f"{names['prm_uri']} is set: Best-of-N with a PRM (best_of) runs only in vlpipe's predictor, not on "
            f"{names['runtime']}: {VLLM_RUNTIME}; remove {names['prm_uri']} {fix}"
        )
    for key in serve:
        if key not in VLLM_LIMIT_FLAGS:
            why = _NO_VLLM_EQUIVALENT.get(key, "vLLM has no equivalent setting")
            problems.append(
                f"{names['serve']}.{key} does not apply to {names['runtime']}: {VLLM_RUNTIME} ({why}); "
                f"remove it {fix} (vLLM maps only: {', '.join(VLLM_LIMIT_FLAGS)})"
            )
    if gpus < 1:
        problems.append(
            f"{names['runtime']}: {VLLM_RUNTIME} runs vLLM on GPUs: set {names['gpus']} ≥ 1 {fix}"
        )
    return problems


def check_vllm_checkpoint(config: dict[str, Any], source: str, runtime_key: str = "runtime") -> None:
    """Refuse a checkpoint vLLM would serve differently from vlpipe: its V2PE δ must be 1 (vLLM's positions
    are integers) and its architecture one vLLM serves natively.

    Args:
        config: the checkpoint's `config.json`.
        source: where it was read (for the message).
        runtime_key: how to name the runtime setting in the message.

    Raises:
        ValueError: naming the checkpoint, the value and the fix.
    """
    delta = config.get(V2PE_CONFIG_KEY, 1.0)
    if not isinstance(delta, int | float) or float(delta) != 1.0:
        raise ValueError(
            f"{source} has V2PE δ {V2PE_CONFIG_KEY}={delta!r}: {runtime_key}: {VLLM_RUNTIME} serves only δ = 1 "
            "(vLLM's visual tokens take integer positions); set "
            f"{runtime_key}: vlpipe, whose predictor applies the checkpoint's δ"
        )
    architectures = config.get("architectures") or []
    if not any(a in VLLM_ARCHITECTURES for a in architectures):
        raise ValueError(
            f"{source} is a {architectures or 'model without architectures'} checkpoint; {runtime_key}: "
            f"{VLLM_RUNTIME} serves vlpipe's transformers-format InternVL ({', '.join(VLLM_ARCHITECTURES)}); "
            f"export it with vlpipe.model.checkpoint.export_checkpoint or set {runtime_key}: vlpipe"
        )


MLFLOW_CHECKPOINT_ARTIFACT = "checkpoint"  # vlpipe.serving.pyfunc.CHECKPOINT_ARTIFACT (kept import-light)
MAX_CONFIG_BYTES = 4 * 1024 * 1024


def served_checkpoint(storage_uri: str, storage_options: dict | None = None) -> tuple[str, dict[str, Any]]:
    """The checkpoint directory behind `storage_uri` and its `config.json`: a registered vlpipe MLflow model's
    `checkpoint` artifact (read from its `MLmodel`), or `storage_uri` itself when it is a checkpoint. KServe's
    Hugging Face runtime needs that directory (`config.json` at its root), not the MLflow model around it.

    Raises:
        FileNotFoundError: no `config.json` there (or an MLflow model without a `checkpoint` artifact).
        ValueError: a `config.json` that is not a bounded JSON object.
    """
    from vlpipe.model.storage import filesystem, join

    fs, root = filesystem(storage_uri, storage_options)
    checkpoint = storage_uri
    mlmodel = root.rstrip("/") + "/MLmodel"
    if fs.isfile(mlmodel):
        spec = yaml.safe_load(fs.cat_file(mlmodel)) or {}
        try:
            relative = spec["flavors"]["python_function"]["artifacts"][MLFLOW_CHECKPOINT_ARTIFACT]["path"]
        except (KeyError, TypeError):
            raise FileNotFoundError(
                f"{storage_uri} is an MLflow model without a '{MLFLOW_CHECKPOINT_ARTIFACT}' artifact; register "
                "checkpoints with vlpipe.serving.pyfunc.log_checkpoint_model"
            ) from None
        checkpoint = join(storage_uri, str(relative))
    fs, path = filesystem(join(checkpoint, "config.json"), storage_options)
    if not fs.isfile(path):
        raise FileNotFoundError(
            f"{checkpoint} has no config.json; point at a vlpipe checkpoint or MLflow model"
        )
    if int(fs.info(path).get("size") or 0) > MAX_CONFIG_BYTES:
        raise ValueError(
            f"{checkpoint}/config.json is over {MAX_CONFIG_BYTES} bytes; not a checkpoint config"
        )
    try:
        config = json.loads(fs.cat_file(path))
    except ValueError:
        raise ValueError(f"{checkpoint}/config.json is not valid JSON") from None
    if not isinstance(config, dict):
        raise ValueError(f"{checkpoint}/config.json is not a JSON object")
    return checkpoint, config


class ServingDeployment(BaseModel):
    """One InferenceService of the predictor.

    Attributes:
        name: the InferenceService (a DNS-1035 label).
        namespace: its namespace.
        storage_uri: the checkpoint on S3 (`s3://bucket/prefix`), downloaded into `/mnt/models`.
        prm_uri: the PRM checkpoint for `best_of` (`s3://...` or an MLflow model URI), read by the predictor.
        model_name: the model's name in the routes and in chat requests.
        image: the serving image (default: `ghcr.io/vlpipe/vlpipe-serving:<installed vlpipe version>`).
        service_account: the ServiceAccount carrying the S3 secret.
        s3: the storage settings.
        gpus: GPUs per replica (`nvidia.com/gpu`); 0 for CPU serving.
        cpu, memory: requests per replica (memory is also the limit).
        min_replicas, max_replicas: autoscaling bounds (min 0 allows scale to zero).
        canary_traffic_percent: traffic share of the latest revision; None: all of it.
        mlflow_tracking_uri: set `MLFLOW_TRACKING_URI` in the container (for an MLflow `prm_uri`).
        labels: extra labels on the InferenceService.
        runtime: `vlpipe` (vlpipe's predictor container) or `huggingface-vllm` (KServe's Hugging Face runtime
            with the vLLM backend; δ = 1 checkpoints without `prm_uri`).
        serve: `ServingLimits` overrides (`{max_images: 2, ...}`), `vlpipe serve` flags of the predictor; on
            `huggingface-vllm` only those with a vLLM equivalent (`VLLM_LIMIT_FLAGS`).
        vllm: the vLLM engine settings (only with `runtime: huggingface-vllm`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_DNS_1035, max_length=63)
    namespace: str = Field(default="default", pattern=_DNS_1123, max_length=63)
    storage_uri: str = Field(pattern=r"^s3://[^/]+/.+")
    prm_uri: str | None = Field(default=None, pattern=r"^(s3://[^/]+/.+|models:/.+|runs:/.+)$")
    model_name: str = Field(default="vlpipe", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    image: str = Field(default_factory=serving_image, min_length=1)
    service_account: str = Field(default="vlpipe-serving", pattern=_DNS_1123, max_length=253)
    s3: S3Settings = S3Settings()
    gpus: int = Field(default=1, ge=0)
    cpu: str = "4"
    memory: str = "32Gi"
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    canary_traffic_percent: int | None = Field(default=None, ge=0, le=100)
    mlflow_tracking_uri: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    runtime: Runtime = VLPIPE_RUNTIME
    serve: dict[str, Any] = Field(default_factory=dict)
    vllm: VLLMSettings = VLLMSettings()

    @field_validator("serve")
    @classmethod
    def _serve_is_serving_limits(cls, value: dict[str, Any]) -> dict[str, Any]:
        return serve_overrides(value)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})"
            )
        if self.runtime == VLLM_RUNTIME:
            problems = vllm_runtime_problems(serve=self.serve, prm_uri=self.prm_uri, gpus=self.gpus)
            if problems:
                raise ValueError("; ".join(problems))
        elif "vllm" in self.model_fields_set and self.vllm != VLLMSettings():
            raise ValueError(
                f"vllm settings apply to runtime: {VLLM_RUNTIME}; remove them or set that runtime"
            )
        return self


# -- manifests -------------------------------------------------------------------------------------------------
def _resources(config: ServingDeployment, cpu_limit: bool = False) -> Any:
    from kubernetes import client as k8s

    requests = {"cpu": config.cpu, "memory": config.memory}
    limits = {"memory": config.memory}
    if cpu_limit:
        limits["cpu"] = config.cpu
    if config.gpus:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(config.gpus)
    return k8s.V1ResourceRequirements(requests=requests, limits=limits)


def _vlpipe_predictor(config: ServingDeployment) -> Any:
    """vlpipe's own predictor: a custom container running `vlpipe serve`."""
    from kserve import V1beta1PredictorSpec
    from kubernetes import client as k8s

    args = ["--model-uri", MODEL_MOUNT, "--name", config.model_name, "--host", "0.0.0.0", "--port", "8080"]
    if config.prm_uri is not None:
        args += ["--prm-uri", config.prm_uri]
    args += serve_args(config.serve)
    env = [
        k8s.V1EnvVar(name="STORAGE_URI", value=config.storage_uri),
        k8s.V1EnvVar(name="AWS_ENDPOINT_URL", value=config.s3.endpoint_url),
        k8s.V1EnvVar(name="AWS_DEFAULT_REGION", value=config.s3.region),
        *(
            k8s.V1EnvVar(
                name=key,
                value_from=k8s.V1EnvVarSource(
                    secret_key_ref=k8s.V1SecretKeySelector(name=config.s3.secret_name, key=key)
                ),
            )
            for key in S3_KEY_NAMES
        ),
    ]
    if config.mlflow_tracking_uri is not None:
        env.append(k8s.V1EnvVar(name="MLFLOW_TRACKING_URI", value=config.mlflow_tracking_uri))
    container = k8s.V1Container(
        name=CONTAINER_NAME,
        image=config.image,
        command=["vlpipe", "serve"],
        args=args,
        env=env,
        ports=[k8s.V1ContainerPort(container_port=8080, protocol="TCP")],
        resources=_resources(config),
        readiness_probe=k8s.V1Probe(
            http_get=k8s.V1HTTPGetAction(path=f"/v2/models/{config.model_name}/ready", port=8080),
            period_seconds=10,
        ),
    )
    return V1beta1PredictorSpec(
        containers=[container],
        service_account_name=config.service_account,
        min_replicas=config.min_replicas,
        max_replicas=config.max_replicas,
        canary_traffic_percent=config.canary_traffic_percent,
    )


def vllm_args(config: ServingDeployment) -> list[str]:
    """The Hugging Face server's arguments (kserve/kserve `python/huggingfaceserver/huggingfaceserver/__main__.py`;
    vLLM's engine flags are parsed by the same parser): the route name, the vLLM backend, the dtype, one
    tensor-parallel rank per GPU, the engine settings and the mapped serving limits."""
    settings = config.vllm
    args = [f"--model_name={config.model_name}", "--backend=vllm", f"--dtype={settings.dtype}"]
    if config.gpus > 1:
        args.append(f"--tensor-parallel-size={config.gpus}")
    if settings.max_model_len is not None:
        args.append(f"--max_model_len={settings.max_model_len}")
    if settings.gpu_memory_utilization is not None:
        args.append(f"--gpu-memory-utilization={settings.gpu_memory_utilization}")
    if settings.enforce_eager:
        args.append("--enforce-eager")
    args += [VLLM_LIMIT_FLAGS[name](value) for name, value in config.serve.items()]
    return args


def _vllm_predictor(config: ServingDeployment) -> Any:
    """KServe's Hugging Face runtime with the vLLM backend: `predictor.model` with `modelFormat: huggingface`.

    KServe's storage initializer downloads `storageUri` into `/mnt/models` (the server's default `--model_dir`)
    with the service account's S3 secret; the runtime's own container, probes and ports apply.
    """
    from kserve import V1beta1ModelFormat, V1beta1ModelSpec, V1beta1PredictorSpec

    model = V1beta1ModelSpec(
        name=CONTAINER_NAME,  # the model spec is the runtime's container: the name KServe gives it anyway
        model_format=V1beta1ModelFormat(name=HF_MODEL_FORMAT),
        runtime=HF_SERVING_RUNTIME,
        storage_uri=config.storage_uri,
        args=vllm_args(config),
        # KServe merges these into the runtime's container, whose own limits (cpu 1, 2Gi) would otherwise
        # stay below the requests.
        resources=_resources(config, cpu_limit=True),
    )
    return V1beta1PredictorSpec(
        model=model,
        service_account_name=config.service_account,
        min_replicas=config.min_replicas,
        max_replicas=config.max_replicas,
        canary_traffic_percent=config.canary_traffic_percent,
    )


def inference_service(config: ServingDeployment) -> V1beta1InferenceService:
    """The InferenceService as KServe's typed object (what `KServeClient.create` takes): vlpipe's predictor
    container, or the Hugging Face runtime with vLLM (`config.runtime`)."""
    from kserve import V1beta1InferenceService, V1beta1InferenceServiceSpec, constants
    from kubernetes import client as k8s

    predictor = _vllm_predictor(config) if config.runtime == VLLM_RUNTIME else _vlpipe_predictor(config)
    return V1beta1InferenceService(
        api_version=constants.KSERVE_V1BETA1,
        kind=constants.KSERVE_KIND_INFERENCESERVICE,
        metadata=k8s.V1ObjectMeta(
            name=config.name,
            namespace=config.namespace,
            labels={
                "app.kubernetes.io/name": "vlpipe",
                "app.kubernetes.io/component": "predictor",
                **config.labels,
            },
            annotations={
                # Canary traffic splitting needs Knative (Serverless); RawDeployment has no revisions.
                "serving.kserve.io/deploymentMode": "Serverless",
                "serving.kserve.io/enable-prometheus-scraping": "true",
            },
        ),
        spec=V1beta1InferenceServiceSpec(predictor=predictor),
    )


def inference_service_manifest(config: ServingDeployment) -> dict[str, Any]:
    """The InferenceService as a plain dict (camelCase keys, no nulls), e.g. for YAML."""
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(inference_service(config))


def s3_secret_manifest(config: ServingDeployment) -> dict[str, Any]:
    """The S3 credentials Secret with KServe's annotations and `${AWS_...}` placeholders, never values: fill
    them at apply time from your secret store (`envsubst`, an ExternalSecret, a sealed secret)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": config.s3.secret_name,
            "namespace": config.namespace,
            "annotations": config.s3.annotations(),
        },
        "type": "Opaque",
        "stringData": {key: f"${{{key}}}" for key in S3_KEY_NAMES},
    }


def service_account_manifest(config: ServingDeployment) -> dict[str, Any]:
    """The ServiceAccount that carries the S3 secret (annotated too, for KServe versions reading it there)."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {
            "name": config.service_account,
            "namespace": config.namespace,
            "annotations": config.s3.annotations(),
        },
        "secrets": [{"name": config.s3.secret_name}],
    }


def render_template(name: str, values: dict[str, str], template_dir: Path = TEMPLATE_DIR) -> Any:
    """Load `infra/k8s/serving/<name>` with its `${KEY}` placeholders replaced by `values` (placeholders
    without a value stay, e.g. the secret's credentials)."""
    text = (template_dir / name).read_text()
    return yaml.safe_load(string.Template(text).safe_substitute(values))


# -- merge patches -----------------------------------------------------------------------------------------------
def merge_patch(old: Any, new: Any) -> Any:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`: changed keys, `None` for removed ones."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return copy.deepcopy(new)
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        if key not in old:
            patch[key] = copy.deepcopy(value)
        elif old[key] != value:
            patch[key] = merge_patch(old[key], value)
    return patch


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """`target` with a JSON merge patch (RFC 7386) applied, as the Kubernetes API server applies it."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge_patch(result.get(key), value)
    return result


# -- the Kubernetes API ----------------------------------------------------------------------------------------
def _api(client: KServeClient) -> Any:
    return client.api_instance  # kubernetes CustomObjectsApi


def _coords() -> tuple[str, str, str]:
    from kserve import constants

    return constants.KSERVE_GROUP, constants.KSERVE_V1BETA1_VERSION, constants.KSERVE_PLURAL_INFERENCESERVICE


def get_inference_service(client: KServeClient, name: str, namespace: str) -> dict[str, Any] | None:
    """The InferenceService, or None when there is none (other API errors propagate)."""
    from kubernetes.client.rest import ApiException

    group, api_version, plural = _coords()
    try:
        return _api(client).get_namespaced_custom_object(group, api_version, namespace, plural, name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def patch_inference_service(client: KServeClient, name: str, namespace: str, patch: dict) -> dict[str, Any]:
    """Merge-patch the InferenceService (`CustomObjectsApi` sends `application/merge-patch+json`)."""
    group, api_version, plural = _coords()
    return _api(client).patch_namespaced_custom_object(group, api_version, namespace, plural, name, patch)


def apply_inference_service(config: ServingDeployment, client: KServeClient | None = None) -> dict[str, Any]:
    """Create the InferenceService, or bring an existing one's labels, annotations and predictor to `config`
    (a plain update: every revision change takes the traffic share in `config.canary_traffic_percent`).

    Args:
        config: the deployment.
        client: a `KServeClient` (default: one from the kubeconfig or the in-cluster config).

    Returns:
        The object the API server returned (the current one, unpatched, when nothing differs).
    """
    from kserve import KServeClient

    client = client or KServeClient()
    current = get_inference_service(client, config.name, config.namespace)
    if current is None:
        return client.create(inference_service(config), namespace=config.namespace)
    wanted = inference_service_manifest(config)
    metadata = current.get("metadata", {})
    patch: dict[str, Any] = {}
    for key in ("labels", "annotations"):
        changed = {k: v for k, v in wanted["metadata"][key].items() if metadata.get(key, {}).get(k) != v}
        if changed:
            patch.setdefault("metadata", {})[key] = changed
    predictor = merge_patch(current["spec"]["predictor"], wanted["spec"]["predictor"])
    if predictor:
        patch["spec"] = {"predictor": predictor}
    if not patch:
        return current
    return patch_inference_service(client, config.name, config.namespace, patch)


def _latest_revision_percent(isvc: dict[str, Any]) -> int | None:
    traffic = isvc.get("status", {}).get("components", {}).get("predictor", {}).get("traffic")
    if not traffic:
        return None
    return sum(int(t.get("percent") or 0) for t in traffic if t.get("latestRevision"))


def is_ready(
    client: KServeClient, name: str, namespace: str, generation: int, percent: int | None = None
) -> bool:
    """Ready at `generation` (KServe's `is_isvc_ready`), and, when the status reports traffic, serving
    `percent` of it from the latest revision."""
    try:
        if not client.is_isvc_ready(name, namespace=namespace, expected_generation=generation):
            return False
    except RuntimeError:  # KServeClient wraps API errors; a transient one is "not ready yet"
        return False
    if percent is None:
        return True
    current = get_inference_service(client, name, namespace) or {}
    served = _latest_revision_percent(current)
    return served is None or served == percent


def wait_ready(
    client: KServeClient,
    name: str,
    namespace: str,
    generation: int,
    *,
    percent: int | None = None,
    timeout_s: float = 900.0,
    poll_interval_s: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """Poll `is_ready` until true or `timeout_s` passes; returns whether it became ready."""
    deadline = clock() + timeout_s
    while True:
        if is_ready(client, name, namespace, generation, percent):
            return True
        if clock() >= deadline:
            return False
        sleep(min(poll_interval_s, max(0.0, deadline - clock())))


def set_canary_traffic(
    client: KServeClient, name: str, namespace: str, percent: int | None
) -> dict[str, Any]:
    """Patch `spec.predictor.canaryTrafficPercent` (None removes it: all traffic to the latest revision)."""
    if percent is not None and not 0 <= percent <= 100:
        raise ValueError(f"canaryTrafficPercent must be within 0..100, got {percent}")
    return patch_inference_service(
        client, name, namespace, {"spec": {"predictor": {"canaryTrafficPercent": percent}}}
    )


def promote(client: KServeClient, name: str, namespace: str) -> dict[str, Any]:
    """Send 100% of the traffic to the latest revision."""
    return set_canary_traffic(client, name, namespace, 100)


def rollback(
    client: KServeClient, name: str, namespace: str, previous_predictor: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Send all traffic back to the previous rolled-out revision (`canaryTrafficPercent: 0`), then, given
    the previous predictor spec, restore it so the rolled-back spec is not rolled out again.

    Returns:
        The object after the last patch.
    """
    result = set_canary_traffic(client, name, namespace, 0)
    if previous_predictor is not None:
        current = result["spec"]["predictor"]
        patch = {"spec": {"predictor": merge_patch(current, previous_predictor)}}
        result = patch_inference_service(client, name, namespace, patch)
    return result


@dataclass
class CanaryStep:
    """One traffic step of a rollout: the percentage, whether it became ready, and how long that took."""

    percent: int
    ready: bool
    waited_s: float


@dataclass
class RolloutResult:
    """The outcome of `canary_rollout`.

    Attributes:
        promoted: whether the new predictor serves 100% of the traffic.
        steps: the steps attempted, in order.
        reason: why it rolled back (None when promoted).
        previous_predictor: the predictor spec before the rollout (what a rollback restores).
    """

    name: str
    namespace: str
    promoted: bool
    steps: list[CanaryStep] = field(default_factory=list)
    reason: str | None = None
    previous_predictor: dict[str, Any] = field(default_factory=dict)


def _check_steps(steps: Sequence[int]) -> list[int]:
    steps = [int(s) for s in steps]
    if not steps or steps[-1] != 100 or any(not 0 < s <= 100 for s in steps) or steps != sorted(set(steps)):
        raise ValueError(f"canary steps must increase strictly within 1..100 and end at 100, got {steps}")
    return steps


def canary_rollout(
    config: ServingDeployment,
    client: KServeClient | None = None,
    *,
    steps: Sequence[int] = DEFAULT_CANARY_STEPS,
    step_timeout_s: float = 900.0,
    poll_interval_s: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> RolloutResult:
    """Roll the predictor of `config` out to an existing InferenceService step by step, rolling back on failure.

    Args:
        config: the new deployment (its `canary_traffic_percent` is ignored: the steps set it).
        client: a `KServeClient` (default: from the kubeconfig or the in-cluster config).
        steps: traffic percentages for the new revision, strictly increasing, ending at 100 (promotion).
        step_timeout_s: how long each step may take to become ready before rolling back.
        poll_interval_s: readiness polling interval.
        sleep, clock: time functions (tests pass fakes).

    Returns:
        The outcome; on a rollback, `promoted` is False and `reason` says which step failed.

    Raises:
        ValueError: bad steps, or no InferenceService to roll out to (create it with
            `apply_inference_service` first).
    """
    from kserve import KServeClient

    steps = _check_steps(steps)
    client = client or KServeClient()
    name, namespace = config.name, config.namespace
    current = get_inference_service(client, name, namespace)
    if current is None:
        raise ValueError(
            f"InferenceService {namespace}/{name} does not exist; create it with apply_inference_service first"
        )
    previous = copy.deepcopy(current["spec"]["predictor"])
    wanted = inference_service_manifest(config)["spec"]["predictor"]
    wanted["canaryTrafficPercent"] = steps[0]
    result = RolloutResult(name, namespace, promoted=False, previous_predictor=previous)
    # The first patch changes the predictor: if it fails, nothing has changed and the error propagates.
    patched = patch_inference_service(
        client, name, namespace, {"spec": {"predictor": merge_patch(previous, wanted)}}
    )
    for i, percent in enumerate(steps):
        try:
            if i > 0:
                patched = set_canary_traffic(client, name, namespace, percent)
            started = clock()
            ready = wait_ready(
                client,
                name,
                namespace,
                int(patched["metadata"].get("generation", 0)),
                percent=percent,
                timeout_s=step_timeout_s,
                poll_interval_s=poll_interval_s,
                sleep=sleep,
                clock=clock,
            )
        except Exception as exc:  # an API failure mid-rollout: put the previous revision back
            result.reason = f"step {percent}%: {type(exc).__name__}: {exc}"
            rollback(client, name, namespace, previous)
            return result
        result.steps.append(CanaryStep(percent, ready, clock() - started))
        if not ready:
            result.reason = f"not ready at {percent}% within {step_timeout_s} s"
            rollback(client, name, namespace, previous)
            return result
    result.promoted = True
    return result
