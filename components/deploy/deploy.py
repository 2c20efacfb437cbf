"""The `deploy-model` step: the champion as a KServe InferenceService, rolled out as a canary.

validate settings → child MLflow run `deploy` → check the version is still the champion → where its files are
on S3 (`config.storage_uri_of`) → for `runtime: huggingface-vllm`, the checkpoint inside the registered MLflow
model and its `config.json`, refused unless its V2PE δ is 1 (`vlpipe.serving.deploy.check_vllm_checkpoint`) →
the `ServingDeployment` → KServe (in-cluster config): a new InferenceService
is created and must become Ready; an existing one gets the new predictor as a canary (`canary_rollout`: 10 →
50 → 100% by default) → tags on the model version (`deployment.*`), the manifest and a Markdown report.

A rollout that fails rolls the traffic back to the previous predictor (`vlpipe.serving.deploy`), moves `champion`
back to `previous` in the registry (`champion` is what serves), and fails the step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from vlpipe.components.deploy.config import DeployConfig, storage_uri_of
from vlpipe.components.promote.config import parse_model_uri
from vlpipe.tracking.runs import child_run

ROLLED_OUT, CREATED = "rolled_out", "created"
ROLLED_BACK, FAILED = "rolled_back", "failed"
"""A canary that failed (traffic back on the previous predictor); a new InferenceService that never got Ready."""


def roll_out(
    service: Any,
    client: Any,
    config: DeployConfig,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[str, Any]:
    """Create the InferenceService, or roll the new predictor out onto the existing one.

    Returns:
        (`created`, `rolled_out`, `rolled_back` or `failed`; the `vlpipe.serving.deploy.RolloutResult`).
    """
    from vlpipe.serving.deploy import (
        CanaryStep,
        RolloutResult,
        apply_inference_service,
        canary_rollout,
        get_inference_service,
        wait_ready,
    )

    canary = config.deploy.canary
    if get_inference_service(client, service.name, service.namespace) is None:
        created = apply_inference_service(service, client)
        started = clock()
        ready = wait_ready(
            client, service.name, service.namespace, int(created.get("metadata", {}).get("generation", 1)),
            timeout_s=canary.step_timeout_s, poll_interval_s=canary.poll_interval_s, sleep=sleep, clock=clock,
        )  # fmt: skip
        result = RolloutResult(service.name, service.namespace, promoted=ready)
        result.steps.append(CanaryStep(100, ready, clock() - started))
        if not ready:
            result.reason = f"the new InferenceService was not ready within {canary.step_timeout_s} s"
        return (CREATED if ready else FAILED), result
    result = canary_rollout(
        service, client, steps=canary.steps, step_timeout_s=canary.step_timeout_s,
        poll_interval_s=canary.poll_interval_s, sleep=sleep, clock=clock,
    )  # fmt: skip
    return (ROLLED_OUT if result.promoted else ROLLED_BACK), result


def _alias_version(client: Any, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def restore_champion(client: Any, name: str, version: str) -> str | None:
    """After a failed rollout: `champion` back to `previous` (what serves again), or removed when there was
    no previous champion; returns the champion version afterwards."""
    from vlpipe.serving.promote import CHALLENGER, CHAMPION, PREVIOUS, rollback

    if _alias_version(client, name, PREVIOUS) is None:
        client.delete_registered_model_alias(name, CHAMPION)
        client.set_registered_model_alias(name, CHALLENGER, version)
        client.set_model_version_tag(name, version, "promotion.decision", "rolled_back")
        return None
    return rollback(name).champion_after


def deploy_markdown(result: dict[str, Any]) -> str:
    """The report: what was deployed where, and each traffic step."""
    lines = [
        f"### `{result['name']}` version {result['version']}: {result['status']}",
        "",
        f"InferenceService `{result['namespace']}/{result['isvc']}`, runtime `{result.get('runtime', 'vlpipe')}`, "
        f"image `{result['image']}`",
        "",
        f"Storage URI: `{result['storage_uri']}`",
        "",
        "| traffic to the new predictor | ready | waited (s) |",
        "|---|---|---|",
        *(
            f"| {s['percent']}% | {'yes' if s['ready'] else 'no'} | {s['waited_s']:.0f} |"
            for s in result["steps"]
        ),
    ]
    if result.get("reason"):
        champion = result["champion_after"] or "none"
        lines += [
            "",
            f"{result['status'].replace('_', ' ').capitalize()}: {result['reason']}; champion: {champion}.",
        ]
    if result.get("url"):
        lines += ["", f"URL: {result['url']}"]
    return "\n".join(lines) + "\n"


def deploy_champion(
    config: DeployConfig,
    *,
    model_uri: str,
    parent_run_id: str,
    report_path: str | None = None,
    kserve_client: Any = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Deploy the champion version in a child run of the pipeline's run.

    Args:
        config: the step's settings.
        model_uri: the promoted version, `models:/<name>/<version>`.
        parent_run_id: the pipeline's MLflow run.
        report_path: where the Markdown report goes (written before a failure is raised).
        kserve_client: a `kserve.KServeClient` (default: the in-cluster or kubeconfig one).
        sleep, clock: time functions (tests pass fakes).

    Returns:
        The outcome: name, version, status, InferenceService, storage URI, steps.

    Raises:
        ValueError: the version is not the champion, its files are not on S3, or the `huggingface-vllm`
            runtime cannot serve its checkpoint (V2PE δ ≠ 1, another architecture): user errors, no retry.
        FileNotFoundError: no checkpoint where the registry says (`huggingface-vllm`).
        RuntimeError: the rollout failed and was rolled back.
    """
    from dataclasses import asdict
    from pathlib import Path

    import yaml
    from mlflow import MlflowClient

    from vlpipe.serving.deploy import (
        HF_SERVING_RUNTIME,
        VLLM_RUNTIME,
        check_vllm_checkpoint,
        inference_service_manifest,
        served_checkpoint,
    )
    from vlpipe.serving.promote import CHAMPION
    from vlpipe.tracking.runs import tracking_uri

    config = DeployConfig.model_validate(config.model_dump())
    name, version = parse_model_uri(model_uri)
    registry = MlflowClient(tracking_uri(), registry_uri=tracking_uri())
    with child_run(
        parent_run_id, "deploy", experiment=config.tracking.experiment, recipe=config.recipe,
        tags=config.tracking.tags,
    ) as run_id:  # fmt: skip
        import mlflow

        champion = _alias_version(registry, name, CHAMPION)
        if champion != version:
            raise ValueError(
                f"{name} version {version} is not the champion ({champion or 'no version'} is): not deploying it"
            )
        storage_uri = storage_uri_of(config.deploy, registry.get_model_version_download_uri(name, version))
        if config.deploy.runtime == VLLM_RUNTIME:
            # vLLM reads the checkpoint directory itself; its δ is known only now (the recipe may not say).
            storage_uri, checkpoint_config = served_checkpoint(storage_uri)
            check_vllm_checkpoint(checkpoint_config, storage_uri, runtime_key="deploy.runtime")
        service = config.deploy.serving_deployment(storage_uri)
        service = service.model_copy(
            update={
                "storage_uri": storage_uri,  # for vLLM, also a fixed one's checkpoint inside its MLflow model
                "labels": {**service.labels, "vlpipe/model": name, "vlpipe/model-version": version},
            }
        )
        image = f"{HF_SERVING_RUNTIME} runtime's" if service.runtime == VLLM_RUNTIME else service.image
        mlflow.log_params(
            {
                "isvc": f"{service.namespace}/{service.name}",
                "storage_uri": storage_uri,
                "runtime": service.runtime,
                "image": image,
                "gpus": service.gpus,
                "canary_steps": ",".join(map(str, config.deploy.canary.steps)),
            }
        )
        mlflow.log_text(
            yaml.safe_dump(inference_service_manifest(service), sort_keys=False), "inferenceservice.yaml"
        )
        if kserve_client is None:
            from kserve import KServeClient

            kserve_client = KServeClient()  # in a pod: the in-cluster config
        status, rollout = roll_out(service, kserve_client, config, sleep=sleep, clock=clock)
        result = {
            "name": name,
            "version": version,
            "status": status,
            "isvc": service.name,
            "namespace": service.namespace,
            "runtime": service.runtime,
            "image": image,
            "storage_uri": storage_uri,
            "steps": [asdict(step) for step in rollout.steps],
            "reason": rollout.reason,
            "champion_after": version,
            "mlflow_run_id": run_id,
        }
        if status in (ROLLED_BACK, FAILED):
            result["champion_after"] = restore_champion(registry, name, version)
        else:
            from vlpipe.serving.deploy import get_inference_service

            current = get_inference_service(kserve_client, service.name, service.namespace) or {}
            result["url"] = current.get("status", {}).get("url")
        for step in rollout.steps:
            mlflow.log_metric(f"canary/{step.percent}_waited_s", step.waited_s)
        tags = {"deployment.status": status, "deployment.isvc": f"{service.namespace}/{service.name}"}
        for key, value in tags.items():
            registry.set_model_version_tag(name, version, key, value)
        mlflow.set_tags({**tags, "registered_model": name, "registered_version": version})
        markdown = deploy_markdown(result)
        mlflow.log_text(markdown, "deploy.md")
        if report_path:
            Path(report_path).parent.mkdir(parents=True, exist_ok=True)
            Path(report_path).write_text(markdown)
        if status in (ROLLED_BACK, FAILED):
            where = (
                "traffic is back on the previous predictor" if status == ROLLED_BACK else "nothing serves it"
            )
            champion_now = f"version {result['champion_after']}" if result["champion_after"] else "unset"
            raise RuntimeError(
                f"rollout of {name} version {version} to {service.namespace}/{service.name} failed "
                f"({rollout.reason}); {where} and the champion is {champion_now}"
            )
    return result


def deploy_task(config_json: str, *, parent_run_id: str, model_uri: str, report: Any) -> str:
    """The component's entrypoint; returns `created` or `rolled_out` (a failed rollout raises).

    Args:
        config_json: `DeployConfig` as JSON.
        parent_run_id: the pipeline's MLflow run.
        model_uri: the promoted version, `models:/<name>/<version>`.
        report: output `Markdown` artifact.
    """
    config = DeployConfig.model_validate_json(config_json)
    result = deploy_champion(
        config, model_uri=model_uri, parent_run_id=parent_run_id, report_path=report.path
    )
    report.metadata.update({k: result[k] for k in ("status", "isvc", "namespace", "storage_uri")})
    return result["status"]
