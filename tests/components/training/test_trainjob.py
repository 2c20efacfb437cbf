"""Multi-node stages as Kubeflow Trainer TrainJobs (`vlpipe.components.training.trainjob`), against a fake
Kubernetes API: the real `kubernetes` client's exceptions and pod models, an in-memory `CustomObjectsApi` whose
"controller" moves each TrainJob through the conditions Kubeflow Trainer v2.3 sets (`Complete`/`Failed`, copied
from the JobSet's; `DeadlineExceeded`) and, on success, writes what rank 0 writes (final checkpoint, summary) to
the work directory the trainer command names; and a `CoreV1Api` serving its pods and their logs.

The rendered TrainJobs are checked against `kubeflow-trainer-api` 2.3.0 (round trip) and the published CRD schema
(`data/trainjobs-crd-v2.3.0.json`: kubeflow/trainer v2.3.0 `manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml`,
descriptions removed).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kubernetes.client import ApiClient, V1Container, V1ObjectMeta, V1Pod, V1PodList, V1PodSpec, V1PodStatus
from kubernetes.client.rest import ApiException

from vlpipe.components.training.trainjob import (
    POD_ENV,
    StepCancelled,
    TrainJobApi,
    TrainJobFailed,
    TrainJobLaunch,
    build_trainjob,
    render_stage_trainjob,
    run_stage_trainjob,
    run_trainjob,
    trainjob_manifest,
    trainjob_name,
)
from vlpipe.pipelines.config import list_recipes, load_recipe, read_recipe

ROOT = Path(__file__).resolve().parents[3]
CRD = json.loads((Path(__file__).parent / "data" / "trainjobs-crd-v2.3.0.json").read_text())
NAMESPACE = "vlpipe"
STEP_POD = ("internvl3-recipe-abc-pretrain-driver", "0d1b6c6e-8f1a-4a55-9d43-6c1f3f0b2f11")


# -- the fake Kubernetes API -------------------------------------------------------------------------------------
class FakeCluster:
    """TrainJobs, their pods and logs. `script[i]` is what the controller reports at the i-th status read of a
    TrainJob: "Running", "Complete", ("Failed", reason, message); the last entry repeats."""

    def __init__(self, script: list[Any], logs: dict[int, list[bytes]] | None = None, on_get=None) -> None:
        self.script = script
        self.logs = (
            logs
            if logs is not None
            else {0: [b"step 1 loss 2.", b"5\nstep 2 loss 2.1\n"], 1: [b"rank 8 ready\n"]}
        )
        self.objects: dict[str, dict] = {}
        self.reads: dict[str, int] = {}
        self.calls: list[tuple[str, str, str]] = []  # (resource, verb, name)
        self.deleted: list[str] = []
        self.on_get = on_get
        self.rank0: dict[str, Any] = {
            "mlflow_run_id": "rank0-run",
            "steps": 12,
            "loss_first": 2.5,
            "loss_last": 1.25,
        }

    # CustomObjectsApi
    def _check(self, group, version, plural):
        assert (group, version, plural) == ("trainer.kubeflow.org", "v1alpha1", "trainjobs")

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self._check(group, version, plural)
        name = body["metadata"]["name"]
        self.calls.append(("trainjobs", "create", name))
        if name in self.objects:
            raise ApiException(status=409, reason="AlreadyExists")
        obj = copy.deepcopy(body)
        obj["metadata"]["uid"] = f"uid-{len(self.calls)}"
        self.objects[name] = obj
        self.reads.setdefault(name, 0)  # a re-created TrainJob goes on with the script
        return copy.deepcopy(obj)

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self._check(group, version, plural)
        self.calls.append(("trainjobs", "get", name))
        if self.on_get is not None:
            self.on_get(self)
        if name not in self.objects:
            raise ApiException(status=404, reason="Not Found")
        obj = self.objects[name]
        if "status" not in obj or not _finished(obj):
            step = self.script[min(self.reads[name], len(self.script) - 1)]
            self.reads[name] += 1
            self._advance(obj, step)
        return copy.deepcopy(obj)

    def patch_namespaced_custom_object(self, group, version, namespace, plural, name, body):
        self._check(group, version, plural)
        self.calls.append(("trainjobs", "patch", name))
        self.objects[name]["metadata"].update(copy.deepcopy(body["metadata"]))
        return copy.deepcopy(self.objects[name])

    def delete_namespaced_custom_object(
        self, group, version, namespace, plural, name, propagation_policy=None
    ):
        self._check(group, version, plural)
        self.calls.append(("trainjobs", "delete", name))
        if name not in self.objects:
            raise ApiException(status=404, reason="Not Found")
        del self.objects[name]
        self.deleted.append(name)
        return {}

    def _advance(self, obj: dict, step: Any) -> None:
        kind, reason, message = (step, "", "") if isinstance(step, str) else step
        conditions = [_condition("Created", "JobSetCreated", "Succeeded to create JobSet")]
        if kind == "Complete":
            conditions.append(_condition("Complete", "AllJobsCompleted", "jobset completed successfully"))
            self._train_as_rank0(obj)
        elif kind == "Failed":
            conditions.append(_condition("Failed", reason, message))
        obj["status"] = {"conditions": conditions}

    def _train_as_rank0(self, obj: dict) -> None:
        """What rank 0 leaves on the shared volume: the final checkpoint and the summary the command names."""
        command = obj["spec"]["trainer"]["command"]
        summary = Path(command[command.index("--summary") + 1])
        config = json.loads(Path(command[command.index("--config") + 1]).read_text())
        final = Path(config["output"])
        final.mkdir(parents=True, exist_ok=True)
        (final / "model.safetensors").write_bytes(
            b"weights trained on " + str(obj["spec"]["trainer"]["numNodes"]).encode()
        )
        summary.write_text(json.dumps(self.rank0))
        (summary.parent / "complete.json").write_text(json.dumps({"config": config, "summary": self.rank0}))

    # CoreV1Api
    def list_namespaced_pod(self, namespace, label_selector):
        self.calls.append(("pods", "list", label_selector))
        key, _, name = label_selector.partition("=")
        assert key == "jobset.sigs.k8s.io/jobset-name"
        obj = self.objects.get(name)
        if obj is None or "status" not in obj:
            return V1PodList(items=[])
        return V1PodList(
            items=[
                V1Pod(
                    metadata=V1ObjectMeta(name=f"{name}-node-{i}-0-x{i}"),
                    spec=V1PodSpec(containers=[V1Container(name="node")]),
                    status=V1PodStatus(phase="Running"),
                )
                for i in range(obj["spec"]["trainer"]["numNodes"])
            ]
        )

    def read_namespaced_pod_log(self, name, namespace, container, follow, _preload_content):
        self.calls.append(("pods/log", "get", name))
        assert follow is True and _preload_content is False and container == "node"
        index = int(re.search(r"-node-(\d+)-", name).group(1))
        return _Stream(self.logs.get(index, []))

    def verbs(self, resource: str) -> set[str]:
        return {verb for res, verb, _ in self.calls if res == resource}


class _Stream:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks, self.released = chunks, False

    def stream(self, amt):
        yield from self.chunks

    def release_conn(self):
        self.released = True


def _condition(kind: str, reason: str, message: str) -> dict:
    return {
        "type": kind, "status": "True", "reason": reason, "message": message,
        "lastTransitionTime": "2026-11-30T12:00:00Z",
    }  # fmt: skip


def _finished(obj: dict) -> bool:
    return any(c["type"] in ("Complete", "Failed") for c in obj.get("status", {}).get("conditions", []))


class FakeClock:
    def __init__(self) -> None:
        self.now, self.sleeps = 0.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


# -- helpers -------------------------------------------------------------------------------------------------------
def _launch(
    recipe: str, stage: str, mount: Path | None = None, overrides: tuple[str, ...] = ()
) -> TrainJobLaunch:
    launch = load_recipe(recipe, list(overrides)).trainjob_launch(stage, "0123abc")
    if mount is not None:
        launch = launch.model_copy(
            update={"work_volume": launch.work_volume.model_copy(update={"mount_path": str(mount)})}
        )
    return launch


def _stage_config(recipe: str, stage: str, work_dir: Path) -> Any:
    from vlpipe.components.training.task import wire_stage_config

    return wire_stage_config(
        stage,
        load_recipe(recipe).stage_settings(stage),
        init="/pipeline/init-model",
        output=str(work_dir / "final"),
        work_dir=str(work_dir),
        data_file="/pipeline/data.jsonl",
        parent_run_id="parent-run",
    )


def _env(manifest: dict) -> dict[str, dict]:
    return {e["name"]: e for e in manifest["spec"]["trainer"]["env"]}


def _pod_spec(manifest: dict) -> dict:
    (patch,) = manifest["spec"]["runtimePatches"]
    (job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert job["name"] == "node"
    return job["template"]["spec"]["template"]["spec"]


def _unknown_fields(value: Any, schema: dict, path: str = "") -> list[str]:
    """Keys the API server would prune (a structural schema drops unknown fields instead of refusing them)."""
    found = []
    if (
        isinstance(value, dict)
        and "properties" in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        for key, child in value.items():
            if key not in schema["properties"]:
                found.append(f"{path}.{key}")
            else:
                found += _unknown_fields(child, schema["properties"][key], f"{path}.{key}")
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, child in value.items():
            found += _unknown_fields(child, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, child in enumerate(value):
            found += _unknown_fields(child, schema["items"], f"{path}[{i}]")
    return found


def _check_against_published_schema(manifest: dict) -> None:
    from kubeflow_trainer_api.models.trainer_v1alpha1_train_job import TrainerV1alpha1TrainJob

    assert TrainerV1alpha1TrainJob.from_dict(manifest).to_dict() == manifest  # the models' round trip
    jsonschema.validate(manifest, CRD["openAPIV3Schema"])
    assert _unknown_fields(manifest, CRD["openAPIV3Schema"]) == []
    assert manifest["apiVersion"] == f"{CRD['group']}/{CRD['version']}" and manifest["kind"] == CRD["kind"]
    name = manifest["metadata"]["name"]  # the CRD's CEL rules on the name
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63
    # Trainer v2.3's validating webhook (pkg/runtime/framework/plugins/jobset/jobset.go): a domain-prefixed
    # manager, patches only of the torch runtime's `node` job and container, and no env in the `node` container
    # (the trainer's env goes in spec.trainer.env)
    for patch in manifest["spec"]["runtimePatches"]:
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?\.[a-z]+/[A-Za-z0-9._/-]+", patch["manager"])
        pod = _pod_spec(manifest)
        assert all(c["name"] == "node" and "env" not in c for c in pod["containers"])


# -- the TrainJob --------------------------------------------------------------------------------------------------
def test_trainjob_has_the_recipe_s_nodes_resources_command_environment_volumes_and_placement():
    launch = _launch("internvl3-8b", "sft")
    work = "/mnt/vlpipe-work/run-1/sft"
    manifest = trainjob_manifest(
        build_trainjob(
            launch,
            stage="sft",
            name=trainjob_name("run-1", "sft"),
            namespace=NAMESPACE,
            config_file=f"{work}/stage_config.json",
            summary_file=f"{work}/stage_summary.json",
            run_key="run-1",
            owner=STEP_POD,
        )
    )
    _check_against_published_schema(manifest)
    spec, trainer = manifest["spec"], manifest["spec"]["trainer"]
    assert spec["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "torch-distributed",
    }
    assert spec["activeDeadlineSeconds"] == 259200  # internvl3-8b: stages.sft.trainjob.deadline_seconds
    assert trainer["image"] == "ghcr.io/vlpipe/vlpipe:0.1.0"
    assert trainer["command"] == [
        "torchrun", "-m", "vlpipe.components.training", "sft",
        "--config", f"{work}/stage_config.json", "--summary", f"{work}/stage_summary.json",
    ]  # fmt: skip
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (4, 8)
    per_node = {"nvidia.com/gpu": "8", "cpu": "64", "memory": "800Gi"}
    assert trainer["resourcesPerNode"] == {"limits": per_node, "requests": per_node}
    env = _env(manifest)
    assert env["NCCL_DEBUG"] == {"name": "NCCL_DEBUG", "value": "WARN"}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow.vlpipe.svc.cluster.local:5000"
    assert env["VLPIPE_GIT_COMMIT"]["value"] == "0123abc"
    assert env["AWS_SECRET_ACCESS_KEY"] == {
        "name": "AWS_SECRET_ACCESS_KEY",
        "valueFrom": {"secretKeyRef": {"name": "vlpipe-s3", "key": "AWS_SECRET_ACCESS_KEY"}},
    }  # a reference: no value anywhere
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "vlpipe-mlflow",
        "key": "password",
    }
    pod = _pod_spec(manifest)
    assert pod["volumes"] == [
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        {"name": "vlpipe-work", "persistentVolumeClaim": {"claimName": "vlpipe-work"}},
    ]
    assert pod["containers"] == [
        {
            "name": "node",
            "volumeMounts": [
                {"name": "dshm", "mountPath": "/dev/shm"},
                {"name": "vlpipe-work", "mountPath": "/mnt/vlpipe-work"},
            ],
        }
    ]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["serviceAccountName"] == "vlpipe-pipeline-runner"
    assert manifest["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": STEP_POD[0], "uid": STEP_POD[1]}
    ]
    assert manifest["metadata"]["namespace"] == NAMESPACE


def test_trainjob_names_are_deterministic_dns_1035_and_distinct_per_run_and_task():
    name = trainjob_name("8f2c1d0e9b7a4c3d2e1f0a9b8c7d6e5f", "sample-prm-data-and-a-very-long-task-name")
    assert name == trainjob_name(
        "8f2c1d0e9b7a4c3d2e1f0a9b8c7d6e5f", "sample-prm-data-and-a-very-long-task-name"
    )
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 40
    names = {trainjob_name(run, task) for run in ("run-a", "run-b") for task in ("sft", "mpo", "SFT_")}
    assert len(names) == 6


def test_every_shipped_recipe_s_trainjobs_are_valid_trainer_objects():
    """Every stage of every recipe (nodes > 1 as shipped; nodes = 1 rendered on request), through the models and
    the published CRD schema."""
    rendered = 0
    for recipe_name in list_recipes():
        has_volume = read_recipe(recipe_name).get("cluster", {}).get("work_volume")
        recipe = load_recipe(recipe_name, [] if has_volume else ["cluster.work_volume.pvc=vlpipe-work"])
        for stage in recipe.trained_stages:
            launch = recipe.trainjob_launch(stage)
            manifest = render_stage_trainjob(
                launch, stage=stage if stage != "critic" else "sft", task=stage, run_key="r1",
                namespace=NAMESPACE, work_dir=f"{launch.work_volume.mount_path}/r1/{stage}",
            )  # fmt: skip
            _check_against_published_schema(manifest)
            assert manifest["spec"]["trainer"]["numNodes"] == recipe.stage_step(stage).nodes
            rendered += 1
    assert rendered == 22  # 5 recipes: tiny and small with a critic


def test_shipped_recipes_train_their_big_stages_on_several_nodes():
    nodes = {
        name: {stage: load_recipe(name).stage_step(stage).nodes for stage in load_recipe(name).trained_stages}
        for name in ("internvl3-1b", "internvl3-2b", "internvl3-8b")
    }
    assert nodes["internvl3-1b"] == {"pretrain": 4, "sft": 1, "mpo": 1, "prm": 1}
    assert nodes["internvl3-2b"]["pretrain"] == 8
    assert nodes["internvl3-8b"] == {"pretrain": 16, "sft": 4, "mpo": 4, "prm": 2}
    for name in nodes:
        text = (ROOT / "pipelines" / "recipes" / f"{name}.yaml").read_text()
        assert "not implemented" not in text and "extension point" not in text


# -- recipe validation ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # 256 rows over 3 nodes x 8 GPUs x 1 row: 256 % 24 != 0
        (
            ["stages.pretrain.nodes=3"],
            "stages.pretrain: 3 nodes x 8 GPUs: trainer.global_batch_size (256) is not divisible",
        ),
        (["cluster.work_volume=null"], "stages.pretrain.nodes = 4 needs cluster.work_volume"),
        (
            ["stages.prm.trainjob.env.NCCL_API_TOKEN=x"],
            "stages.prm.trainjob.env.NCCL_API_TOKEN looks like a credential",
        ),
        (
            ["stages.prm.trainjob.env.MLFLOW_TRACKING_URI=http://x"],
            "stages.prm.trainjob.env.MLFLOW_TRACKING_URI is set by the pipeline",
        ),
        (["stages.mpo.trainjob.deadline_seconds=10"], "stages.mpo.trainjob.deadline_seconds"),
        (["stages.mpo.trainjob.runtime=Torch_Distributed"], "stages.mpo.trainjob.runtime"),
        (["stages.mpo.nodes=0"], "stages.mpo.nodes"),
    ],
)
def test_recipe_validation_names_the_multi_node_setting_at_fault(overrides, message):
    with pytest.raises(ValueError) as info:
        load_recipe("internvl3-1b", overrides)
    assert message in str(info.value)


def test_global_batch_that_divides_over_the_nodes_is_accepted():
    recipe = load_recipe("internvl3-1b", ["stages.pretrain.nodes=32"])  # 256 = 32 nodes x 8 GPUs x 1
    assert recipe.stage_step("pretrain").nodes == 32


# -- the step ------------------------------------------------------------------------------------------------------
@pytest.fixture()
def step_pod_env(monkeypatch):
    monkeypatch.setenv(POD_ENV["name"], STEP_POD[0])
    monkeypatch.setenv(POD_ENV["uid"], STEP_POD[1])
    monkeypatch.setenv(POD_ENV["namespace"], NAMESPACE)


def _run(
    cluster: FakeCluster, tmp_path: Path, *, stage: str = "mpo", recipe: str = "internvl3-8b", **kw
) -> Any:
    clock, lines = FakeClock(), []
    work = tmp_path / "run-1" / stage
    result = run_stage_trainjob(
        stage,
        _stage_config(recipe, stage, work),
        _launch(recipe, stage, tmp_path, kw.pop("overrides", ())),
        task=stage,
        run_key="run-1",
        api=TrainJobApi(cluster, cluster, NAMESPACE),
        clock=clock,
        sleep=clock.sleep,
        write=lines.append,
    )
    return result, lines, clock


def test_step_creates_the_trainjob_streams_its_logs_and_returns_rank0_s_summary(tmp_path, step_pod_env):
    cluster = FakeCluster(["Running", "Running", "Complete"])
    summary, lines, clock = _run(cluster, tmp_path)
    name = trainjob_name("run-1", "mpo")
    assert summary == cluster.rank0  # the MLflow run rank 0 opened, not one of the step's
    created = cluster.objects[name]
    assert created["metadata"]["ownerReferences"][0]["uid"] == STEP_POD[1]
    assert created["spec"]["trainer"]["numNodes"] == 4
    config = json.loads((tmp_path / "run-1" / "mpo" / "stage_config.json").read_text())
    assert config["tracking"]["parent_run_id"] == "parent-run" and config["stage"] == "mpo"
    # both nodes' logs, whole lines, prefixed with their pod, in order per pod
    rank0 = [line for line in lines if "-node-0-" in line]
    assert rank0 == [f"[{name}-node-0-0-x0] step 1 loss 2.5", f"[{name}-node-0-0-x0] step 2 loss 2.1"]
    assert f"[{name}-node-1-0-x1] rank 8 ready" in lines
    assert clock.sleeps == [15.0, 15.0]  # polled every poll_seconds until Complete
    assert cluster.deleted == []  # a finished TrainJob stays for inspection


def test_a_failed_trainjob_fails_the_step_with_its_reason_and_is_deleted(tmp_path, step_pod_env):
    cluster = FakeCluster(
        ["Running", ("Failed", "FailedJobs", "jobset failed due to one or more job failures")]
    )
    with pytest.raises(TrainJobFailed) as info:
        _run(cluster, tmp_path)
    assert info.value.reason == "FailedJobs"
    assert str(info.value) == (
        f"TrainJob {trainjob_name('run-1', 'mpo')} failed: FailedJobs: jobset failed due to one or more job failures"
    )
    assert cluster.deleted == [trainjob_name("run-1", "mpo")] and cluster.objects == {}


def test_a_trainjob_past_its_deadline_fails_with_deadline_exceeded(tmp_path, step_pod_env):
    cluster = FakeCluster(["Running", ("Failed", "DeadlineExceeded", "TrainJob exceeded its deadline")])
    with pytest.raises(TrainJobFailed, match="DeadlineExceeded") as info:
        _run(cluster, tmp_path, overrides=("stages.mpo.trainjob.deadline_seconds=3600",))
    assert info.value.reason == "DeadlineExceeded"
    assert cluster.deleted == [trainjob_name("run-1", "mpo")]


def test_the_step_gives_up_past_the_deadline_when_the_trainjob_never_finishes(tmp_path, step_pod_env):
    cluster = FakeCluster(["Running"])  # e.g. the controller is down: no condition ever
    with pytest.raises(TimeoutError, match="did not finish within 4500 s"):
        _run(cluster, tmp_path, overrides=("stages.mpo.trainjob.deadline_seconds=3600",))
    assert cluster.deleted == [trainjob_name("run-1", "mpo")]


def test_sigterm_cancels_the_step_and_deletes_the_trainjob(tmp_path, step_pod_env):
    def cancel_on_third_read(cluster: FakeCluster) -> None:
        if cluster.calls.count(("trainjobs", "get", trainjob_name("run-1", "mpo"))) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # what Kubeflow Pipelines' cancel sends the step's pod

    before = signal.getsignal(signal.SIGTERM)
    cluster = FakeCluster(["Running"], on_get=cancel_on_third_read)
    with pytest.raises(StepCancelled):
        _run(cluster, tmp_path)
    assert cluster.deleted == [trainjob_name("run-1", "mpo")] and cluster.objects == {}
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the step's only while it waits


def test_a_retried_step_reattaches_to_its_running_trainjob(tmp_path, step_pod_env):
    """The first try's pod was killed; its TrainJob runs on. The retry (a new pod) finds it by name."""
    cluster = FakeCluster(["Running", "Running", "Complete"])
    name = trainjob_name("run-1", "mpo")
    cluster.objects[name] = _recreate(cluster, name, tmp_path)
    summary, _, _ = _run(cluster, tmp_path)
    creates = [call for call in cluster.calls if call[1] == "create"]
    assert len(creates) == 1 and len(cluster.objects) == 1  # the retry's create met the running one (409)
    assert cluster.objects[name]["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": STEP_POD[0], "uid": STEP_POD[1]}
    ]  # moved from the killed pod to the retry's
    assert summary == cluster.rank0 and cluster.deleted == []


def _recreate(cluster: FakeCluster, name: str, tmp_path: Path) -> dict:
    """The TrainJob as the first try created it, still running (a killed step's pod does not delete it)."""
    work = tmp_path / "run-1" / "mpo"
    work.mkdir(parents=True, exist_ok=True)
    (work / "stage_config.json").write_text(_stage_config("internvl3-8b", "mpo", work).model_dump_json())
    manifest = render_stage_trainjob(
        _launch("internvl3-8b", "mpo", tmp_path), stage="mpo", task="mpo", run_key="run-1", namespace=NAMESPACE,
        work_dir=str(work),
    )  # fmt: skip
    manifest["metadata"]["ownerReferences"] = [
        {"apiVersion": "v1", "kind": "Pod", "name": "first", "uid": "u1"}
    ]
    cluster.reads[name] = 0
    return manifest


def test_a_retried_step_reads_back_a_finished_trainjob_and_replaces_a_failed_one(tmp_path, step_pod_env):
    cluster = FakeCluster(["Complete"])
    first, _, _ = _run(cluster, tmp_path)
    again, _, clock = _run(cluster, tmp_path)  # the retry: create -> 409 -> Complete at once
    assert again == first and clock.sleeps == []
    assert [verb for _, verb, _ in cluster.calls if verb in ("create", "delete")] == ["create", "create"]

    failed = FakeCluster([("Failed", "FailedJobs", "x"), "Complete"])
    name = trainjob_name("run-1", "mpo")
    failed.objects[name] = _recreate(failed, name, tmp_path)
    summary, _, _ = _run(failed, tmp_path)
    assert summary == failed.rank0
    assert [verb for _, verb, _ in failed.calls if verb in ("create", "delete")] == [
        "create",
        "delete",
        "create",
    ]


def test_success_becomes_the_step_s_model_output_and_metrics(tmp_path, step_pod_env, monkeypatch):
    """`run_training_task` with `launch`: the TrainJob's final checkpoint is the `Model` artifact, as on one node."""
    from vlpipe.components.training import trainjob
    from vlpipe.components.training.task import run_training_task

    cluster = FakeCluster(["Running", "Complete"])
    monkeypatch.setattr(
        trainjob.TrainJobApi, "from_cluster", classmethod(lambda cls, ns: cls(cluster, cluster, ns))
    )
    monkeypatch.delenv("VLPIPE_MODEL_STORE", raising=False)
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset.json").write_text(
        json.dumps({"source": "meta", "files": {"mpo_pairs": "s3://d/mpo/meta.json"}})
    )
    recipe = load_recipe("internvl3-8b")
    launch = _launch("internvl3-8b", "mpo", tmp_path / "work", ("stages.mpo.trainjob.poll_seconds=0.01",))
    model, metrics = _Artifact(tmp_path / "model"), _Artifact(tmp_path / "metrics", directory=False)
    arguments = dict(
        stage="mpo",
        config_json=json.dumps(recipe.stage_settings("mpo")),
        preset="8b",
        parent_run_id="parent-run",
        run_key="run-1",
        work_root=str(tmp_path / "work"),
        world_size=8,
        init_model=_Artifact(tmp_path / "init", {"lineage": {"sft": "sft-run"}}),
        data=_Artifact(data),
        model=model,
        metrics=metrics,
        launch=launch.model_dump_json(),
    )
    summary = run_training_task(**arguments)
    assert summary == cluster.rank0
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == b"weights trained on 4"
    assert model.metadata["mlflow_run_id"] == "rank0-run"
    assert model.metadata["lineage"] == {"sft": "sft-run", "mpo": "rank0-run"}
    assert metrics.logged == {"steps": 12.0, "loss_first": 2.5, "loss_last": 1.25}
    (created,) = [c for c in cluster.calls if c[1] == "create"]
    assert created[2] == trainjob_name("run-1", "mpo")
    # A pipeline parameter's global batch that does not divide over 4 nodes x 8 GPUs: refused before a TrainJob.
    with pytest.raises(
        ValueError, match=r"global_batch_size \(100\) is not divisible by .* world size \(32\)"
    ):
        run_training_task(**{**arguments, "global_batch_size": 100, "run_key": "run-2"})
    assert len([c for c in cluster.calls if c[1] == "create"]) == 1
    # A retry after the TrainJob is gone (deleted by hand): the work directory holds the finished run.
    cluster.objects.clear()
    calls, again = len(cluster.calls), _Artifact(tmp_path / "model-again")
    summary = run_training_task(**{**arguments, "model": again})
    assert summary == cluster.rank0 and len(cluster.calls) == calls  # no TrainJob, no API call
    assert (tmp_path / "model-again" / "model.safetensors").read_bytes() == b"weights trained on 4"


class _Artifact:
    def __init__(self, path: Path, metadata: dict | None = None, *, directory: bool = True) -> None:
        if directory:
            path.mkdir(parents=True, exist_ok=True)
        self.path, self.uri, self.metadata, self.logged = str(path), str(path), dict(metadata or {}), {}

    def log_metric(self, key: str, value: float) -> None:
        self.logged[key] = value


# -- RBAC ------------------------------------------------------------------------------------------------------------
def test_the_runner_role_allows_exactly_the_launcher_s_calls(tmp_path, step_pod_env):
    """Create, re-attach (409 → get, patch the owner), fail (delete), read logs: every call the launcher makes, and
    no trainjobs verb it does not make."""
    used: dict[str, set[str]] = {}
    for script in (["Running", "Complete"], [("Failed", "FailedJobs", "x")]):
        cluster = FakeCluster(script)
        name = trainjob_name("run-1", "mpo")
        base = tmp_path / str(len(used))
        cluster.objects[name] = _recreate(cluster, name, base)
        with pytest.raises(TrainJobFailed) if isinstance(script[-1], tuple) else contextlib.nullcontext():
            _run(cluster, base)
        for resource in ("trainjobs", "pods", "pods/log"):
            used.setdefault(resource, set()).update(cluster.verbs(resource))
    role = next(
        doc for doc in yaml.safe_load_all((ROOT / "infra" / "k8s" / "base" / "rbac.yaml").read_text())
        if doc["kind"] == "Role"
    )  # fmt: skip
    granted = {resource: set(rule["verbs"]) for rule in role["rules"] for resource in rule["resources"]}
    assert used == {"trainjobs": {"create", "get", "patch", "delete"}, "pods": {"list"}, "pods/log": {"get"}}
    for resource, verbs in used.items():
        assert granted[resource] == verbs, resource


# -- the CLI and the DAG ---------------------------------------------------------------------------------------------
def test_vlpipe_trainjob_render_prints_the_trainjob_yaml():
    from typer.testing import CliRunner

    from vlpipe.pipelines.cli import app

    result = CliRunner().invoke(
        app, ["trainjob", "render", "--recipe", "internvl3-8b", "--stage", "prm", "--run-key", "r9"]
    )
    assert result.exit_code == 0, result.output
    manifest = yaml.safe_load(result.stdout)
    _check_against_published_schema(manifest)
    assert manifest["metadata"]["name"] == trainjob_name("r9", "prm")
    assert manifest["spec"]["trainer"]["numNodes"] == 2
    assert "/mnt/vlpipe-work/r9/prm/stage_config.json" in manifest["spec"]["trainer"]["command"]
    no_volume = CliRunner().invoke(app, ["trainjob", "render", "--recipe", "tiny", "--stage", "sft"])
    assert no_volume.exit_code == 2 and "cluster.work_volume" in no_volume.output
    unknown = CliRunner().invoke(app, ["trainjob", "render", "--recipe", "internvl3-8b", "--stage", "critic"])
    assert unknown.exit_code == 2 and "trains pretrain, sft, mpo, prm" in unknown.output


def test_compiled_pipeline_gives_training_steps_dev_shm_and_multi_node_steps_their_pod_identity():
    from kfp import compiler

    from vlpipe.pipelines.dag import RECIPE_PIPELINE, build_pipelines

    recipe = load_recipe("internvl3-1b", ["stages.sft.shm_size=64Gi"])
    pipeline = build_pipelines(recipe, commit="0123abc", version="v")[RECIPE_PIPELINE]
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"trainjob-ir-{os.getpid()}.yaml"
    compiler.Compiler().compile(pipeline, str(path))
    docs = list(yaml.safe_load_all(path.read_text()))
    path.unlink()
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for stage in ("pretrain", "sft", "mpo", "prm"):
        (shm,) = executors[f"exec-{stage}"]["emptyDirMounts"]
        assert shm["mountPath"] == "/dev/shm" and shm["medium"] == "Memory"
    assert executors["exec-sft"]["emptyDirMounts"][0]["sizeLimit"] == "64Gi"
    pretrain = executors["exec-pretrain"]  # 4 nodes: a TrainJob
    assert {e["name"]: e["fieldPath"] for e in pretrain["fieldPathAsEnv"]} == {
        "VLPIPE_POD_NAME": "metadata.name", "VLPIPE_POD_UID": "metadata.uid", "VLPIPE_POD_NAMESPACE": "metadata.namespace",
    }  # fmt: skip
    assert "nodeSelector" not in pretrain and "fieldPathAsEnv" not in executors["exec-sft"]
    containers = docs[0]["deploymentSpec"]["executors"]
    assert (
        "accelerator" not in containers["exec-pretrain"]["container"]["resources"]
    )  # it waits, the nodes train
    assert containers["exec-sft"]["container"]["resources"]["accelerator"]["resourceCount"] == "8"
    tasks = docs[0]["root"]["dag"]["tasks"]["exit-handler-1"]["componentRef"]["name"]
    body = docs[0]["components"][tasks]["dag"]["tasks"]
    launch = json.loads(body["pretrain"]["inputs"]["parameters"]["launch"]["runtimeValue"]["constant"])
    assert TrainJobLaunch.model_validate(launch).nodes == 4
    assert "launch" not in body["sft"]["inputs"]["parameters"]


def test_a_trainjob_deleted_by_someone_else_fails_the_step(tmp_path):
    def delete_on_second_read(cluster: FakeCluster) -> None:
        name = trainjob_name("r", "sft")
        if cluster.calls.count(("trainjobs", "get", name)) == 2:
            del cluster.objects[name]  # e.g. `kubectl delete trainjob`

    cluster = FakeCluster(["Running"], on_get=delete_on_second_read)
    manifest = render_stage_trainjob(
        _launch("internvl3-8b", "sft"), stage="sft", task="sft", run_key="r", namespace=NAMESPACE,
        work_dir=str(tmp_path),
    )  # fmt: skip
    clock = FakeClock()
    with pytest.raises(TrainJobFailed, match="Deleted: the TrainJob was deleted while the step waited"):
        run_trainjob(
            TrainJobApi(cluster, cluster, NAMESPACE), manifest, poll_seconds=5.0, timeout_s=None,
            clock=clock, sleep=clock.sleep, write=lambda line: None,
        )  # fmt: skip
    assert clock.sleeps == [5.0]


# -- the real kubernetes client over HTTP ------------------------------------------------------------------------------
class _ApiServer:
    """A Kubernetes API server on 127.0.0.1 for one TrainJob's life: the real `kubernetes` client talks HTTP to it.
    Each request is recorded as (resource, Kubernetes verb): POST create, GET on an item get, GET on a collection
    list, PATCH patch, DELETE delete."""

    def __init__(self, script: list[Any]) -> None:
        import http.server
        import threading

        self.fake = FakeCluster(script)
        self.requests: list[tuple[str, str, str]] = []  # (resource, verb, content type)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _body(self) -> dict:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length) or b"{}")

            def _send(self, status: int, payload: Any, content_type: str = "application/json") -> None:
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self, method: str) -> None:
                from urllib.parse import parse_qs, urlparse

                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                parts = url.path.strip("/").split("/")
                group = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/vlpipe/trainjobs"
                try:
                    if url.path.startswith(group):
                        name = parts[6] if len(parts) > 6 else None
                        verb = {"POST": "create", "PATCH": "patch", "DELETE": "delete"}.get(method, "get")
                        server.requests.append(("trainjobs", verb, self.headers.get("Content-Type", "")))
                        args = ("trainer.kubeflow.org", "v1alpha1", "vlpipe", "trainjobs")
                        if verb == "create":
                            self._send(201, server.fake.create_namespaced_custom_object(*args, self._body()))
                        elif verb == "get":
                            self._send(200, server.fake.get_namespaced_custom_object(*args, name))
                        elif verb == "patch":
                            self._send(
                                200, server.fake.patch_namespaced_custom_object(*args, name, self._body())
                            )
                        else:
                            assert self._body().get("propagationPolicy") or query.get("propagationPolicy")
                            self._send(200, server.fake.delete_namespaced_custom_object(*args, name))
                    elif url.path == "/api/v1/namespaces/vlpipe/pods" and method == "GET":
                        server.requests.append(("pods", "list", ""))
                        pods = server.fake.list_namespaced_pod("vlpipe", query["labelSelector"])
                        self._send(200, ApiClient().sanitize_for_serialization(pods))
                    elif url.path.endswith("/log") and method == "GET":
                        server.requests.append(("pods/log", "get", ""))
                        # the client sends Python's `True`; the API server parses it with Go's ParseBool
                        assert query["container"] == "node" and query["follow"] in ("true", "True")
                        stream = server.fake.read_namespaced_pod_log(parts[5], "vlpipe", "node", True, False)
                        self._send(200, b"".join(stream.stream(4096)), "text/plain")
                    else:
                        self._send(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
                except ApiException as exc:
                    self._send(exc.status, {"kind": "Status", "code": exc.status, "reason": exc.reason})

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def do_PATCH(self):
                self._route("PATCH")

            def do_DELETE(self):
                self._route("DELETE")

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> _ApiServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)

    def api(self) -> TrainJobApi:
        from kubernetes import client

        configuration = client.Configuration(host=f"http://127.0.0.1:{self.httpd.server_address[1]}")
        configuration.retries = 0
        api_client = client.ApiClient(configuration)
        return TrainJobApi(client.CustomObjectsApi(api_client), client.CoreV1Api(api_client), NAMESPACE)


def _run_over_http(server: _ApiServer, base: Path, lines: list[str]) -> dict:
    clock = FakeClock()
    return run_stage_trainjob(
        "mpo", _stage_config("internvl3-8b", "mpo", base / "run-1" / "mpo"), _launch("internvl3-8b", "mpo", base),
        task="mpo", run_key="run-1", api=server.api(), clock=clock, sleep=clock.sleep, write=lines.append,
    )  # fmt: skip


def test_over_http_the_real_client_makes_exactly_the_calls_the_runner_role_allows(tmp_path, step_pod_env):
    """Re-attach (409, get, merge-patch of the owner), follow, stream logs, then fail and delete: through the real
    `kubernetes` client and an HTTP server on 127.0.0.1; the Kubernetes verbs it used are the Role's, exactly."""
    used: set[tuple[str, str]] = set()
    for script in (["Running", "Complete"], ["Running", ("Failed", "FailedJobs", "a node failed")]):
        base = tmp_path / str(len(used))
        with _ApiServer(script) as server:
            name = trainjob_name("run-1", "mpo")
            server.fake.objects[name] = _recreate(server.fake, name, base)  # the first try's, still running
            lines: list[str] = []
            call = functools.partial(_run_over_http, server, base, lines)
            if isinstance(script[-1], tuple):
                with pytest.raises(TrainJobFailed, match="FailedJobs: a node failed"):
                    call()
                assert server.fake.objects == {}  # deleted through the API
            else:
                assert call() == server.fake.rank0
                assert server.fake.objects[name]["metadata"]["ownerReferences"][0]["uid"] == STEP_POD[1]
            assert f"[{name}-node-0-0-x0] step 2 loss 2.1" in lines
            patches = [ctype for res, verb, ctype in server.requests if verb == "patch"]
            assert patches == ["application/merge-patch+json"]
            used |= {(res, verb) for res, verb, _ in server.requests}
    role = next(
        doc for doc in yaml.safe_load_all((ROOT / "infra" / "k8s" / "base" / "rbac.yaml").read_text())
        if doc["kind"] == "Role"
    )  # fmt: skip
    granted = {(res, verb) for rule in role["rules"] for res in rule["resources"] for verb in rule["verbs"]}
    launcher = {("trainjobs", v) for v in ("create", "get", "patch", "delete")} | {
        ("pods", "list"),
        ("pods/log", "get"),
    }
    assert used == launcher
    assert {(res, verb) for res, verb in granted if res in ("trainjobs", "pods", "pods/log")} == launcher
