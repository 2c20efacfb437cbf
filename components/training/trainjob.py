"""Multi-node training: a stage's Kubeflow step runs the stage as a Kubeflow Trainer TrainJob.

When a recipe gives a training stage `nodes > 1`, its step does not train in its own pod. It writes the stage
config into the stage's work directory on the shared work volume, creates a TrainJob
(`trainer.kubeflow.org/v1alpha1`, Kubeflow Trainer v2.3, built with the `kubeflow-trainer-api` models) whose
trainer runs `torchrun -m vlpipe.components.training <stage> --config ... --summary ...` on every node (the
`torch-distributed` runtime gives torchrun its rendezvous through `PET_*` variables), then waits:

- it follows the TrainJob's `Complete`/`Failed` conditions and streams its pods' logs into the step's log;
- a failed TrainJob (or one past its deadline: reason `DeadlineExceeded`) fails the step with the TrainJob's
  reason and message; the step deletes the TrainJob when it fails or is cancelled (SIGTERM from Kubeflow
  Pipelines), and the TrainJob's owner reference to the step's pod lets Kubernetes delete it when the pod
  object goes away after a kill;
- its name comes from the pipeline run and the task (`trainjob_name`), so a retried step re-attaches to its
  running or finished TrainJob instead of starting a second one (a failed one is replaced).

On success rank 0 has written the final checkpoint (`<work_dir>/final`) and the stage summary, with the MLflow
stage run it opened under the pipeline's parent run, on the shared volume; the step publishes them exactly as
a single-pod step does (`vlpipe.components.training.task`).

Torch- and kfp-free. The Kubernetes calls go through `TrainJobApi` (the RBAC Role in
`infra/k8s/base/rbac.yaml` allows exactly these): trainjobs create/get/patch/delete, pods list, pods/log get.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
API_VERSION = f"{GROUP}/{VERSION}"
TRAINER_NODE = "node"
"""The trainer's replicated job and container in Kubeflow Trainer's torch runtimes (`constants.Node`)."""
PATCH_MANAGER = "vlpipe.dev/pipeline"
"""The `runtimePatches` manager of vlpipe's patches (node selector, tolerations, volumes)."""
SHM_VOLUME = "dshm"
WORK_VOLUME = "vlpipe-work"
POD_ENV = {"name": "VLPIPE_POD_NAME", "uid": "VLPIPE_POD_UID", "namespace": "VLPIPE_POD_NAMESPACE"}
"""The step pod's identity, from the downward API (set by the DAG builder): the TrainJob's owner."""
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"
"""The label the TrainJob's JobSet puts on its pods (the JobSet has the TrainJob's name)."""
STAGE_CONFIG_FILE = "stage_config.json"
STAGE_SUMMARY_FILE = "stage_summary.json"
TIMEOUT_MARGIN_S = 900
"""Past the deadline, how long the step waits for the TrainJob to report `Failed` before it gives up."""
_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecretRef(_Strict):
    """An environment variable read from a key of a Kubernetes secret (a reference; the value never appears)."""

    env: str = Field(min_length=1)
    secret: str = Field(min_length=1)
    key: str = Field(min_length=1)


class TolerationSpec(_Strict):
    key: str = Field(min_length=1)
    operator: str = "Exists"
    value: str | None = None
    effect: str | None = None


class WorkMount(_Strict):
    """The shared work volume: a ReadWriteMany PVC mounted on every node at the step's own mount path."""

    pvc: str = Field(min_length=1)
    mount_path: str = Field(pattern=r"^/")


class TrainJobLaunch(_Strict):
    """What a step needs to create its stage's TrainJob; the DAG builder compiles it from the recipe
    (`PipelineConfig.trainjob_launch`).

    Attributes:
        nodes: training nodes (`numNodes`).
        gpus, cpu, memory: per node (`resourcesPerNode`); one process per GPU (`numProcPerNode`).
        accelerator_type: the GPU resource name.
        shm_size: size limit of the memory-backed `/dev/shm` (None: up to the pod's memory limit).
        image: the release image (the step's own).
        runtime: the `ClusterTrainingRuntime` (`runtimeRef`).
        env: plain environment variables on every node (cluster env, NCCL settings, MLflow's URI, the commit).
        secrets: secret references on every node (S3 and MLflow credentials).
        work_volume: the shared work volume (stage config, checkpoints, final model, summary).
        node_selector, tolerations: GPU node placement (through the TrainJob's runtime patches).
        service_account: the nodes' ServiceAccount (None: the namespace's default).
        deadline_seconds: `activeDeadlineSeconds` (None: no deadline).
        poll_seconds: how often the step reads the TrainJob's status.
    """

    nodes: int = Field(ge=1, le=1024)
    gpus: int = Field(0, ge=0, le=16)
    cpu: str | None = None
    memory: str | None = None
    accelerator_type: str = "nvidia.com/gpu"
    shm_size: str | None = None
    image: str = Field(min_length=1)
    runtime: str = "torch-distributed"
    env: dict[str, str] = Field(default_factory=dict)
    secrets: list[SecretRef] = Field(default_factory=list)
    work_volume: WorkMount
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[TolerationSpec] = Field(default_factory=list)
    service_account: str | None = None
    deadline_seconds: int | None = Field(None, ge=1)
    poll_seconds: float = Field(15.0, gt=0)

    @property
    def processes_per_node(self) -> int:
        return max(1, self.gpus)


class TrainJobFailed(RuntimeError):
    """The TrainJob failed (or ran past its deadline); `reason` is its `Failed` condition's reason."""

    def __init__(self, name: str, reason: str, message: str) -> None:
        super().__init__(f"TrainJob {name} failed: {reason}: {message}".rstrip(": "))
        self.name, self.reason, self.message = name, reason, message


class StepCancelled(BaseException):
    """The step received SIGTERM (Kubeflow Pipelines cancelled the run, or the pod is being stopped).

    A `BaseException`, like `KeyboardInterrupt`: the signal may arrive inside code that handles `Exception`
    (best-effort log streaming), which must not swallow a cancellation.
    """


# -- the TrainJob ------------------------------------------------------------------------------------------------
def trainjob_name(run_key: str, task: str) -> str:
    """The TrainJob of `task` in the pipeline run `run_key`: the same for every retry of the step.

    DNS-1035 (a lowercase letter first; letters, digits, `-`), at most 40 characters, so the JobSet's pod
    names (`<name>-node-<i>-<j>-<suffix>`) stay valid DNS labels.
    """
    digest = hashlib.sha256(f"{run_key}\0{task}".encode()).hexdigest()[:12]
    slug = re.sub(r"[^a-z0-9]+", "-", task.lower()).strip("-")[:20].rstrip("-") or "stage"
    return f"vlpipe-{slug}-{digest}"


def _label_value(value: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", value)[:63].strip("-._")
    return cleaned or "none"


def build_trainjob(
    launch: TrainJobLaunch,
    *,
    stage: str,
    name: str,
    namespace: str,
    config_file: str,
    summary_file: str,
    run_key: str = "",
    owner: tuple[str, str] | None = None,
) -> Any:
    """The TrainJob that trains `stage` on `launch.nodes` nodes, as a `kubeflow-trainer-api` model.

    Args:
        launch: the recipe's settings for the stage's TrainJob.
        stage: the stage the trainer runs (`vlpipe.components.training <stage>`; the critic trains as sft).
        name, namespace: the TrainJob's.
        config_file, summary_file: the stage config the nodes read and the summary rank 0 writes (on the
            work volume).
        run_key: the pipeline run (a label).
        owner: the step pod's (name, uid): an owner reference, so deleting the pod deletes the TrainJob.

    Returns:
        A `TrainerV1alpha1TrainJob` (`.to_dict()` is the manifest).
    """
    from kubeflow_trainer_api.models.io_k8s_api_core_v1_empty_dir_volume_source import (
        IoK8sApiCoreV1EmptyDirVolumeSource as EmptyDir,
    )
    from kubeflow_trainer_api.models.io_k8s_api_core_v1_env_var import IoK8sApiCoreV1EnvVar as EnvVar
    from kubeflow_trainer_api.models.io_k8s_api_core_v1_env_var_source import (
        IoK8sApiCoreV1EnvVarSource as EnvVarSource,
    )
    from kubeflow_trainer_api.models.io_k8s_api_core_v1_persistent_volume_claim_volume_source import (
        IoK8sApiCoreV1PersistentVolumeClaimVolumeSource as PVCSource,
    )
    from kubeflow_trainer_api.models.io_k8s_api_core_v1_resource_requirements import (
        IoK8sApiCoreV1ResourceRequirements as Resources,
    )
    from kubeflow_trainer_api.models.io_k8s_api_core_v1_secret_key_selector import (
        IoK8sApiCoreV1SecretKeySelector as SecretKeySelector,
    )
    from kubeflow_trainer_api.models.io_k8s_api_core_v1_toleration import (
        IoK8sApiCoreV1Toleration as Toleration,
    )
    from kubeflow_trainer_api.models.io_k8s_api_core_v1_volume import IoK8sApiCoreV1Volume as Volume
    from kubeflow_trainer_api.models.io_k8s_api_core_v1_volume_mount import (
        IoK8sApiCoreV1VolumeMount as VolumeMount,
    )
    from kubeflow_trainer_api.models.io_k8s_apimachinery_pkg_api_resource_quantity import (
        IoK8sApimachineryPkgApiResourceQuantity as Quantity,
    )
    from kubeflow_trainer_api.models.io_k8s_apimachinery_pkg_apis_meta_v1_object_meta import (
        IoK8sApimachineryPkgApisMetaV1ObjectMeta as ObjectMeta,
    )
    from kubeflow_trainer_api.models.io_k8s_apimachinery_pkg_apis_meta_v1_owner_reference import (
        IoK8sApimachineryPkgApisMetaV1OwnerReference as OwnerReference,
    )
    from kubeflow_trainer_api.models.trainer_v1alpha1_container_patch import TrainerV1alpha1ContainerPatch
    from kubeflow_trainer_api.models.trainer_v1alpha1_job_set_spec_patch import TrainerV1alpha1JobSetSpecPatch
    from kubeflow_trainer_api.models.trainer_v1alpha1_job_set_template_patch import (
        TrainerV1alpha1JobSetTemplatePatch,
    )
    from kubeflow_trainer_api.models.trainer_v1alpha1_job_spec_patch import TrainerV1alpha1JobSpecPatch
    from kubeflow_trainer_api.models.trainer_v1alpha1_job_template_patch import (
        TrainerV1alpha1JobTemplatePatch,
    )
    from kubeflow_trainer_api.models.trainer_v1alpha1_pod_spec_patch import TrainerV1alpha1PodSpecPatch
    from kubeflow_trainer_api.models.trainer_v1alpha1_pod_template_patch import (
        TrainerV1alpha1PodTemplatePatch,
    )
    from kubeflow_trainer_api.models.trainer_v1alpha1_replicated_job_patch import (
        TrainerV1alpha1ReplicatedJobPatch,
    )
    from kubeflow_trainer_api.models.trainer_v1alpha1_runtime_patch import TrainerV1alpha1RuntimePatch
    from kubeflow_trainer_api.models.trainer_v1alpha1_runtime_ref import TrainerV1alpha1RuntimeRef
    from kubeflow_trainer_api.models.trainer_v1alpha1_train_job import TrainerV1alpha1TrainJob
    from kubeflow_trainer_api.models.trainer_v1alpha1_train_job_spec import TrainerV1alpha1TrainJobSpec
    from kubeflow_trainer_api.models.trainer_v1alpha1_trainer import TrainerV1alpha1Trainer
    from kubeflow_trainer_api.models.trainer_v1alpha1_training_runtime_spec_patch import (
        TrainerV1alpha1TrainingRuntimeSpecPatch,
    )

    quantities = {}
    if launch.gpus:
        quantities[launch.accelerator_type] = str(launch.gpus)
    if launch.cpu:
        quantities["cpu"] = launch.cpu
    if launch.memory:
        quantities["memory"] = launch.memory
    resources = Resources(
        limits={k: Quantity(v) for k, v in quantities.items()} or None,
        requests={k: Quantity(v) for k, v in quantities.items()} or None,
    )
    env = [EnvVar(name=key, value=value) for key, value in sorted(launch.env.items())]
    env += [
        EnvVar(
            name=ref.env,
            value_from=EnvVarSource(secret_key_ref=SecretKeySelector(name=ref.secret, key=ref.key)),
        )
        for ref in launch.secrets
    ]
    volumes = [
        Volume(
            name=SHM_VOLUME,
            empty_dir=EmptyDir(medium="Memory", size_limit=_quantity(Quantity, launch.shm_size)),
        ),
        Volume(
            name=WORK_VOLUME,
            persistent_volume_claim=PVCSource(claim_name=launch.work_volume.pvc),
        ),
    ]
    mounts = [
        VolumeMount(name=SHM_VOLUME, mount_path="/dev/shm"),
        VolumeMount(name=WORK_VOLUME, mount_path=launch.work_volume.mount_path),
    ]
    pod_patch = TrainerV1alpha1PodSpecPatch(
        containers=[TrainerV1alpha1ContainerPatch(name=TRAINER_NODE, volume_mounts=mounts)],
        volumes=volumes,
        node_selector=dict(sorted(launch.node_selector.items())) or None,
        tolerations=[Toleration(**t.model_dump(exclude_none=True)) for t in launch.tolerations] or None,
        service_account_name=launch.service_account,
    )
    patch = TrainerV1alpha1RuntimePatch(
        manager=PATCH_MANAGER,
        training_runtime_spec=TrainerV1alpha1TrainingRuntimeSpecPatch(
            template=TrainerV1alpha1JobSetTemplatePatch(
                spec=TrainerV1alpha1JobSetSpecPatch(
                    replicated_jobs=[
                        TrainerV1alpha1ReplicatedJobPatch(
                            name=TRAINER_NODE,
                            template=TrainerV1alpha1JobTemplatePatch(
                                spec=TrainerV1alpha1JobSpecPatch(
                                    template=TrainerV1alpha1PodTemplatePatch(spec=pod_patch)
                                )
                            ),
                        )
                    ]
                )
            )
        ),
    )
    command = [
        "torchrun", "-m", "vlpipe.components.training", stage, "--config", config_file, "--summary", summary_file,
    ]  # fmt: skip
    labels = {
        "app.kubernetes.io/managed-by": "vlpipe",
        "app.kubernetes.io/component": "training",
        "vlpipe.dev/stage": _label_value(stage),
    }
    if run_key:
        labels["vlpipe.dev/run"] = _label_value(run_key)
    owners = None
    if owner is not None:
        owners = [OwnerReference(api_version="v1", kind="Pod", name=owner[0], uid=owner[1])]
    return TrainerV1alpha1TrainJob(
        api_version=API_VERSION,
        kind="TrainJob",
        metadata=ObjectMeta(name=name, namespace=namespace, labels=labels, owner_references=owners),
        spec=TrainerV1alpha1TrainJobSpec(
            runtime_ref=TrainerV1alpha1RuntimeRef(
                api_group=GROUP, kind="ClusterTrainingRuntime", name=launch.runtime
            ),
            trainer=TrainerV1alpha1Trainer(
                image=launch.image,
                command=command,
                env=env or None,
                num_nodes=launch.nodes,
                num_proc_per_node=launch.processes_per_node,
                resources_per_node=resources if quantities else None,
            ),
            runtime_patches=[patch],
            active_deadline_seconds=launch.deadline_seconds,
        ),
    )


def _quantity(quantity: Any, value: str | None) -> Any:
    return quantity(value) if value else None


def trainjob_manifest(trainjob: Any) -> dict[str, Any]:
    """The TrainJob as the JSON the API server takes (camelCase keys, unset fields left out)."""
    return trainjob.to_dict()


# -- the Kubernetes calls ----------------------------------------------------------------------------------------
class TrainJobApi:
    """The launcher's Kubernetes calls in one namespace (what the RBAC Role allows).

    Args:
        custom: a `kubernetes.client.CustomObjectsApi` (trainjobs).
        core: a `kubernetes.client.CoreV1Api` (pods, pods/log).
        namespace: the TrainJob's namespace (the step's own).
    """

    def __init__(self, custom: Any, core: Any, namespace: str) -> None:
        self.custom, self.core, self.namespace = custom, core, namespace

    @classmethod
    def from_cluster(cls, namespace: str) -> TrainJobApi:
        """The in-cluster client (the step's ServiceAccount), else the local kubeconfig."""
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return cls(client.CustomObjectsApi(), client.CoreV1Api(), namespace)

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)

    def get(self, name: str) -> dict[str, Any] | None:
        """The TrainJob, or None when there is none."""
        from kubernetes.client.rest import ApiException

        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name, body)

    def delete(self, name: str) -> bool:
        """Delete the TrainJob and, in the background, its JobSet and pods; False when there was none."""
        from kubernetes.client.rest import ApiException

        try:
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name, propagation_policy="Background"
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def pods(self, name: str) -> list[Any]:
        """The TrainJob's pods (its JobSet labels them with its name)."""
        found = self.core.list_namespaced_pod(self.namespace, label_selector=f"{JOBSET_LABEL}={name}")
        return list(found.items)

    def follow_log(self, pod: str, container: str) -> Iterator[bytes]:
        """The container's log as it is written, until the container ends."""
        response = self.core.read_namespaced_pod_log(
            pod, self.namespace, container=container, follow=True, _preload_content=False
        )
        try:
            yield from response.stream(4096)
        finally:
            release = getattr(response, "release_conn", None)
            if release is not None:
                release()


def _conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The TrainJob's conditions by type, read through the `kubeflow-trainer-api` status model."""
    from kubeflow_trainer_api.models.trainer_v1alpha1_train_job_status import TrainerV1alpha1TrainJobStatus

    status = TrainerV1alpha1TrainJobStatus.from_dict(obj.get("status") or {})
    return {
        c.type: {"status": c.status, "reason": c.reason, "message": c.message}
        for c in status.conditions or []
    }


def trainjob_state(obj: dict[str, Any]) -> tuple[str, str, str]:
    """`("Complete" | "Failed" | "Running", reason, message)` from the TrainJob's conditions."""
    conditions = _conditions(obj)
    for kind in ("Failed", "Complete"):
        condition = conditions.get(kind)
        if condition and condition["status"] == "True":
            return kind, condition["reason"], condition["message"]
    return "Running", "", ""


# -- logs ----------------------------------------------------------------------------------------------------------
class LogStreamer:
    """Streams the logs of a TrainJob's pods into the step's log (one thread per pod, lines prefixed with it)."""

    def __init__(self, api: TrainJobApi, name: str, write: Callable[[str], None]) -> None:
        self.api, self.name, self.write = api, name, write
        self.threads: dict[str, threading.Thread] = {}

    def poll(self) -> None:
        """Start following every pod of the TrainJob that has started (a restarted pod is a new one)."""
        try:
            pods = self.api.pods(self.name)
        except Exception as exc:  # logs are best effort: the TrainJob's status decides the step
            log.warning("cannot list the pods of TrainJob %s: %s", self.name, exc)
            return
        for pod in pods:
            pod_name = pod.metadata.name
            if pod_name in self.threads or pod.status is None or pod.status.phase == "Pending":
                continue
            names = [c.name for c in pod.spec.containers]
            container = TRAINER_NODE if TRAINER_NODE in names else names[0]
            thread = threading.Thread(target=self._follow, args=(pod_name, container), daemon=True)
            self.threads[pod_name] = thread
            thread.start()

    def _follow(self, pod: str, container: str) -> None:
        prefix, pending = f"[{pod}] ", b""
        try:
            for chunk in self.api.follow_log(pod, container):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self.write(prefix + line.decode("utf-8", "replace"))
            if pending:
                self.write(prefix + pending.decode("utf-8", "replace"))
        except Exception as exc:  # best effort, see poll
            log.warning("stopped following the log of %s: %s", pod, exc)

    def join(self, timeout_s: float = 30.0) -> None:
        """Wait (bounded) for the streams to reach the end of the pods' logs."""
        end = time.monotonic() + timeout_s
        for thread in self.threads.values():
            thread.join(max(0.0, end - time.monotonic()))


def _write_line(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# -- the launcher --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def cancel_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into `StepCancelled` while the step waits (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def cancel(signum: int, frame: Any) -> None:
        raise StepCancelled(
            f"the step received signal {signum} (the run was cancelled or the pod is stopping)"
        )

    previous = signal.signal(signal.SIGTERM, cancel)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def attach(
    api: TrainJobApi, manifest: dict[str, Any], *, clock: Callable[[], float], sleep: Callable[[float], None]
) -> str:
    """Create the TrainJob, or re-attach to the one a previous try of the step created.

    A running or complete TrainJob is kept (its owner reference moves to this pod); a failed one is deleted
    and created again.

    Returns:
        "created", "attached" or "recreated".
    """
    from kubernetes.client.rest import ApiException

    name = manifest["metadata"]["name"]
    try:
        api.create(manifest)
        log.info("created TrainJob %s/%s", api.namespace, name)
        return "created"
    except ApiException as exc:
        if exc.status != 409:
            raise
    existing = api.get(name)
    if existing is not None and trainjob_state(existing)[0] != "Failed":
        owners = manifest["metadata"].get("ownerReferences")
        if owners:
            api.patch(name, {"metadata": {"ownerReferences": owners}})
        log.info("re-attached to TrainJob %s/%s (%s)", api.namespace, name, trainjob_state(existing)[0])
        return "attached"
    if existing is not None:
        log.info(
            "TrainJob %s failed in a previous try (%s); creating it again", name, trainjob_state(existing)[1]
        )
        api.delete(name)
        end = clock() + 300
        while api.get(name) is not None:
            if clock() > end:
                raise TimeoutError(
                    f"TrainJob {name} was not deleted within 300 s; delete it and retry the step"
                )
            sleep(2.0)
    api.create(manifest)
    return "recreated"


def run_trainjob(
    api: TrainJobApi,
    manifest: dict[str, Any],
    *,
    poll_seconds: float,
    timeout_s: float | None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    write: Callable[[str], None] = _write_line,
) -> dict[str, Any]:
    """Create (or re-attach to) the TrainJob and wait for it, streaming its pods' logs.

    Args:
        api: the Kubernetes calls.
        manifest: the TrainJob (`trainjob_manifest`).
        poll_seconds: between two reads of its status.
        timeout_s: give up (and delete it) after this long; None: wait as long as it runs.
        clock, sleep, write: time and the step's log (tests pass fakes).

    Returns:
        The complete TrainJob.

    Raises:
        TrainJobFailed: it failed or ran past its deadline (the reason is the TrainJob's).
        TimeoutError: past `timeout_s`.
        StepCancelled: SIGTERM while waiting.
        In every case the TrainJob has been deleted.
    """
    name = manifest["metadata"]["name"]
    logs = LogStreamer(api, name, write)
    with cancel_on_sigterm():
        try:
            attach(api, manifest, clock=clock, sleep=sleep)
            end = None if timeout_s is None else clock() + timeout_s
            while True:
                obj = api.get(name)
                if obj is None:
                    raise TrainJobFailed(
                        name, "Deleted", "the TrainJob was deleted while the step waited for it"
                    )
                logs.poll()
                state, reason, message = trainjob_state(obj)
                if state == "Complete":
                    logs.join()
                    log.info("TrainJob %s complete", name)
                    return obj
                if state == "Failed":
                    logs.join()
                    raise TrainJobFailed(name, reason, message)
                if end is not None and clock() > end:
                    raise TimeoutError(
                        f"TrainJob {name} did not finish within {timeout_s:.0f} s (its deadline plus a margin); "
                        "deleted it"
                    )
                sleep(poll_seconds)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                if api.delete(name):
                    log.info("deleted TrainJob %s/%s (%s)", api.namespace, name, type(exc).__name__)
            raise


# -- the step ------------------------------------------------------------------------------------------------------
def step_pod() -> tuple[str, tuple[str, str] | None]:
    """The step pod's namespace and (name, uid), from the downward API environment the DAG builder sets."""
    namespace = os.environ.get(POD_ENV["namespace"]) or (
        _SA_NAMESPACE.read_text().strip() if _SA_NAMESPACE.exists() else "default"
    )
    name, uid = os.environ.get(POD_ENV["name"]), os.environ.get(POD_ENV["uid"])
    return namespace, (name, uid) if name and uid else None


def render_stage_trainjob(
    launch: TrainJobLaunch, *, stage: str, task: str, run_key: str, namespace: str, work_dir: str
) -> dict[str, Any]:
    """The manifest `run_stage_trainjob` would create for `task` of the run `run_key` (no owner: a review copy,
    or one to apply by hand)."""
    trainjob = build_trainjob(
        launch,
        stage=stage,
        name=trainjob_name(run_key, task),
        namespace=namespace,
        config_file=f"{work_dir.rstrip('/')}/{STAGE_CONFIG_FILE}",
        summary_file=f"{work_dir.rstrip('/')}/{STAGE_SUMMARY_FILE}",
        run_key=run_key,
    )
    return trainjob_manifest(trainjob)


def run_stage_trainjob(
    stage: str,
    config: Any,
    launch: TrainJobLaunch,
    *,
    task: str,
    run_key: str,
    api: TrainJobApi | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    write: Callable[[str], None] = _write_line,
) -> dict[str, Any]:
    """Train `stage` with `config` as a TrainJob over `launch.nodes` nodes; returns the summary rank 0 wrote.

    The stage config and the summary live in the stage's work directory on the shared work volume, which the
    step and every node mount at the same path; so do the resumable checkpoints and the final model.

    Raises:
        ValueError: the work directory is not on the work volume.
        TrainJobFailed, TimeoutError, StepCancelled: see `run_trainjob`.
    """
    work = Path(config.resolved_work_dir)
    mount = launch.work_volume.mount_path.rstrip("/") + "/"
    if not str(work).startswith(mount):
        raise ValueError(
            f"{stage}: the work directory {work} is not on the shared work volume ({mount}); every node of a "
            "TrainJob reads the stage config and writes checkpoints there"
        )
    work.mkdir(parents=True, exist_ok=True)
    config_file, summary_file = work / STAGE_CONFIG_FILE, work / STAGE_SUMMARY_FILE
    config_file.write_text(config.model_dump_json(indent=2))
    namespace, owner = step_pod()
    name = trainjob_name(run_key, task)
    trainjob = build_trainjob(
        launch,
        stage=stage,
        name=name,
        namespace=namespace,
        config_file=str(config_file),
        summary_file=str(summary_file),
        run_key=run_key,
        owner=owner,
    )
    api = api or TrainJobApi.from_cluster(namespace)
    timeout = None if launch.deadline_seconds is None else launch.deadline_seconds + TIMEOUT_MARGIN_S
    write(
        f"{task}: TrainJob {namespace}/{name} on {launch.nodes} nodes x {launch.processes_per_node} processes"
    )
    run_trainjob(
        api,
        trainjob_manifest(trainjob),
        poll_seconds=launch.poll_seconds,
        timeout_s=timeout,
        clock=clock,
        sleep=sleep,
        write=write,
    )
    if not summary_file.exists():
        raise RuntimeError(
            f"TrainJob {name} completed but rank 0 wrote no summary at {summary_file}; is the work volume "
            "ReadWriteMany and mounted on every node?"
        )
    return json.loads(summary_file.read_text())
