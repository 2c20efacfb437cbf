"""Settings of the deploy step (torch-free; `vlpipe.serving.deploy` imports kserve only inside its functions).

A recipe's `deploy.service` is a `vlpipe.serving.deploy.ServingDeployment` whose `storage_uri` may be left out: the
step then serves the registered champion's own files, found through the MLflow registry (`storage_uri_of`).
`deploy.runtime` chooses vlpipe's predictor or KServe's Hugging Face runtime with vLLM, `deploy.serve` sets the
predictor's `ServingLimits`, `deploy.vllm` the vLLM engine; what each runtime supports is in docs/serving.md.
"""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vlpipe.components.pipeline_run.config import TaskConfig

MLFLOW_PROXY_SCHEME = "mlflow-artifacts:"
PLACEHOLDER_STORAGE_URI = "s3://pipeline/registered-model"
"""What validation puts in for a `storage_uri` the step finds at run time."""


class CanarySettings(BaseModel):
    """How the new predictor takes the traffic (`vlpipe.serving.deploy.canary_rollout`).

    Attributes:
        steps: traffic percentages of the new revision, strictly increasing, ending at 100.
        step_timeout_s: how long each step may take to become Ready before the rollout rolls back.
        poll_interval_s: readiness polling interval.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: tuple[int, ...] = (10, 50, 100)
    step_timeout_s: float = Field(900.0, gt=0, le=4 * 3600)
    poll_interval_s: float = Field(10.0, gt=0, le=600)

    @model_validator(mode="after")
    def _steps_increase_to_100(self) -> Self:
        steps = list(self.steps)
        if (
            not steps
            or steps[-1] != 100
            or any(not 0 < s <= 100 for s in steps)
            or steps != sorted(set(steps))
        ):
            raise ValueError(f"canary.steps must increase strictly within 1..100 and end at 100, got {steps}")
        return self

    @property
    def max_seconds(self) -> int:
        """The longest a rollout can wait for readiness (every step to its timeout)."""
        return int(len(self.steps) * self.step_timeout_s)


class DeploySettings(BaseModel):
    """The recipe's `deploy` section.

    Attributes:
        enabled: add the deploy step (after a promotion) to the pipelines; it needs a cluster with KServe.
        service: a `vlpipe.serving.deploy.ServingDeployment` (name, namespace, S3 settings, GPUs, replicas, ...);
            without `storage_uri` the step serves the registered version's files from the MLflow registry.
        artifacts_destination: where the MLflow server stores artifacts it proxies (`mlflow server
            --artifacts-destination s3://...`): a version's `mlflow-artifacts:/<path>` location is
            `<artifacts_destination>/<path>` there. Not needed when the registry hands out `s3://` locations.
        canary: the traffic steps of a rollout onto an existing InferenceService (a new one takes 100% at once).
        runtime: `vlpipe` (vlpipe's predictor, the default) or `huggingface-vllm` (KServe's Hugging Face runtime
            with the vLLM backend: checkpoints with V2PE δ = 1, no `service.prm_uri`, only `serve` keys vLLM
            has an equivalent for).
        serve: `vlpipe.serving.limits.ServingLimits` overrides (`{max_images: 2, max_tokens: 512}`), rendered as
            `vlpipe serve --<key with - for _> <value>` flags; unknown keys and bad values fail at recipe load.
        vllm: `vlpipe.serving.deploy.VLLMSettings` (dtype, max_model_len, ...), for `runtime: huggingface-vllm`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    service: dict[str, Any] = Field(default_factory=dict)
    artifacts_destination: str | None = Field(None, pattern=r"^s3://[^/]+(/.*)?$")
    canary: CanarySettings = CanarySettings()
    runtime: Literal["vlpipe", "huggingface-vllm"] = "vlpipe"
    serve: dict[str, Any] = Field(default_factory=dict)
    vllm: dict[str, Any] = Field(default_factory=dict)

    @field_validator("serve")
    @classmethod
    def _serve_is_serving_limits(cls, value: dict[str, Any]) -> dict[str, Any]:
        from vlpipe.serving.deploy import serve_overrides

        return serve_overrides(value, where="deploy.serve")

    @field_validator("vllm")
    @classmethod
    def _vllm_settings(cls, value: dict[str, Any]) -> dict[str, Any]:
        from vlpipe.serving.deploy import VLLMSettings

        VLLMSettings.model_validate(value)
        return value

    @model_validator(mode="after")
    def _runtime_fits(self) -> Self:
        from vlpipe.serving.deploy import VLLM_RUNTIME, vllm_runtime_problems

        for key in ("runtime", "serve", "vllm"):
            if key in self.service:
                raise ValueError(f"deploy.service.{key}: set it as deploy.{key}, not under deploy.service")
        if self.runtime != VLLM_RUNTIME:
            if self.vllm:
                raise ValueError(
                    f"deploy.vllm applies to deploy.runtime: {VLLM_RUNTIME}; remove it or set that runtime"
                )
            return self
        keys = {
            "runtime": "deploy.runtime",
            "serve": "deploy.serve",
            "prm_uri": "deploy.service.prm_uri",
            "gpus": "deploy.service.gpus",
        }
        problems = vllm_runtime_problems(
            serve=self.serve,
            prm_uri=self.service.get("prm_uri"),
            gpus=gpus if isinstance(gpus := self.service.get("gpus", 1), int) else 1,
            keys=keys,
        )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def serving_deployment(self, storage_uri: str | None = None) -> Any:
        """The `ServingDeployment`, with `storage_uri` when the service does not fix one.

        Raises:
            pydantic.ValidationError: an invalid service setting (the message names the key).
        """
        from vlpipe.serving.deploy import ServingDeployment

        service = {**self.service, "runtime": self.runtime, "serve": self.serve, "vllm": self.vllm}
        if "storage_uri" not in service:
            service["storage_uri"] = storage_uri or PLACEHOLDER_STORAGE_URI
        return ServingDeployment.model_validate(service)


def storage_uri_of(settings: DeploySettings, download_uri: str) -> str:
    """Where KServe downloads the model from: the service's fixed `storage_uri`, else the registered
    version's location (`MlflowClient.get_model_version_download_uri`) on S3.

    Raises:
        ValueError: the version's files are not on S3 and no `storage_uri` is set.
    """
    fixed = settings.service.get("storage_uri")
    if fixed:
        return str(fixed)
    if download_uri.startswith("s3://"):
        return download_uri
    if download_uri.startswith(MLFLOW_PROXY_SCHEME) and settings.artifacts_destination:
        path = download_uri.removeprefix(MLFLOW_PROXY_SCHEME).lstrip("/")
        return f"{settings.artifacts_destination.rstrip('/')}/{path}"
    raise ValueError(
        f"the registered model's files are at {download_uri}, which KServe cannot download: set "
        "deploy.service.storage_uri (an s3:// checkpoint) or, for an MLflow server that proxies artifacts, "
        "deploy.artifacts_destination (its --artifacts-destination on S3)"
    )


class DeployConfig(TaskConfig):
    """The `deploy-model` step's settings."""

    deploy: DeploySettings
