"""Every pipeline of every recipe compiles; the IR has the expected tasks, edges and cluster settings;
compiling is reproducible and puts no credential from the environment into the files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.pipelines.ir import artifact_edges, body_tasks, constant, load_ir, parameter_edges, sub_dag_tasks
from vlpipe.components.release import IMAGE, VERSION
from vlpipe.pipelines.cli import app
from vlpipe.pipelines.compile import compile_recipe, pipeline_digest, pipeline_version
from vlpipe.pipelines.config import PipelineConfig, list_recipes, load_recipe
from vlpipe.pipelines.dag import PIPELINES

COMMIT = "0123456789abcdef0123456789abcdef01234567"
STEPS = {
    "prepare-data",
    "init-model",
    "mix-data",
    "pretrain",
    "sft",
    "mpo",
    "prm",
    "evaluate",
    "register-model",
    "promote-model",
}
# What each step consumes (artifacts), i.e. the recipe's data flow.
RECIPE_EDGES = {
    ("prepare-data", "init-model"),
    ("prepare-data", "mix-data"),
    ("init-model", "mix-data"),
    ("prepare-data", "pretrain"),
    ("init-model", "pretrain"),
    ("mix-data", "pretrain"),
    ("prepare-data", "sft"),
    ("pretrain", "sft"),
    ("mix-data", "sft"),
    ("prepare-data", "mpo"),
    ("sft", "mpo"),
    ("prepare-data", "prm"),
    ("sft", "prm"),
    ("prepare-data", "evaluate"),
    ("mpo", "evaluate"),
    ("prm", "evaluate"),
    ("mpo", "register-model"),
    ("prm", "register-model"),
    ("mix-data", "register-model"),
    ("evaluate", "register-model"),
}
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEACCESSKEY0001",
    "AWS_SECRET_ACCESS_KEY": "fake-secret-key-do-not-leak-7f3a",
    "MLFLOW_TRACKING_USERNAME": "fake-mlflow-user-2b9c",
    "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-password-9d1e",
    "MLFLOW_TRACKING_TOKEN": "fake-mlflow-token-5c7f",
    "KFP_BEARER_TOKEN": "fake-kfp-token-3e8a",
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Every recipe compiled once (recipe → pipeline → file), with fake credentials in the environment."""
    mp = pytest.MonkeyPatch()
    for key, value in FAKE_CREDENTIALS.items():
        mp.setenv(key, value)
    mp.setenv("MLFLOW_TRACKING_URI", "http://leaky-user:leaky-password@mlflow.example:5000")
    try:
        out = tmp_path_factory.mktemp("compiled")
        return {name: compile_recipe(load_recipe(name), out / name, commit=COMMIT) for name in list_recipes()}
    finally:
        mp.undo()


def test_every_pipeline_of_every_recipe_compiles_to_a_versioned_file(compiled):
    code = f"{VERSION}+{COMMIT[:12]}"
    assert pipeline_version(COMMIT) == code
    for files in compiled.values():
        assert set(files) == set(PIPELINES)
        for name, path in files.items():  # <pipeline>-<package>+<commit12>.<digest of the file>.yaml
            assert path.name == f"{name}-{code}.{pipeline_digest(path)}.yaml"
            spec, _ = load_ir(path)
            assert spec["pipelineInfo"]["name"] == name


# The tiny recipe's pipeline parameters (`vlpipe.pipelines.parameters`) of each sub-pipeline: its stages' ones.
PARAMETERS_OF = {
    "sft-mpo": {
        "mlflow_experiment",
        *(f"{s}_{k}" for s in ("sft", "mpo") for k in ("lr", "max_steps", "global_batch_size")),
    },
    "evaluate": {"mlflow_experiment", "eval_n", "eval_temperature"},
    "promote-deploy": {"mlflow_experiment", "gate_best_of_n_tolerance", "gate_pass_at_1_tolerance"},
}

# With a `prm_data` section the PRM trains on the MPO policy's own solutions.
ON_POLICY_EDGES = {
    ("prepare-data", "sample-prm-data"),
    ("mpo", "sample-prm-data"),
    ("sample-prm-data", "prm"),
}
# With a `critic` section the PRM starts from the critic (more SFT from the SFT checkpoint), not from SFT.
CRITIC_EDGES = {("sft", "critic"), ("prepare-data", "critic"), ("critic", "prm")}


def test_recipe_dag_has_the_expected_tasks_and_edges(compiled):
    spec, _ = load_ir(compiled["tiny"]["internvl3-recipe"])
    assert set(spec["root"]["dag"]["tasks"]) == {"exit-handler-1", "finish-pipeline-run"}
    tasks = body_tasks(spec)
    steps = STEPS | {"sample-prm-data", "critic"}
    assert set(tasks) == steps | {"start-pipeline-run"}
    assert artifact_edges(tasks) == (RECIPE_EDGES - {("sft", "prm")}) | ON_POLICY_EDGES | CRITIC_EDGES
    # Every step nests its MLflow run under the parent run the first task opens. The cacheable steps take no
    # per-run input (they run after the start task and find the parent run through their output URI); the
    # steps with side effects take the parent run id and never come from the cache. Promote takes the
    # registered version (`models:/<name>/<version>`). The tiny recipe deploys nothing (no cluster).
    side_effects = {"register-model", "promote-model"}
    assert parameter_edges(tasks) == {("start-pipeline-run", step) for step in side_effects} | {
        ("register-model", "promote-model")
    }
    for step in steps - side_effects:
        assert "start-pipeline-run" in tasks[step]["dependentTasks"], step
        assert tasks[step]["cachingOptions"] == {"enableCache": True}, step
        assert not any(
            "parent_run_id" in name or "run_key" in name
            for name in tasks[step]["inputs"].get("parameters", {})
        )
    for step in side_effects | {"start-pipeline-run"}:
        assert tasks[step].get("cachingOptions", {}) == {}, step  # caching off
    sampling = json.loads(constant(tasks["sample-prm-data"], "config"))
    assert sampling == load_recipe("tiny").prm_data.config
    assert json.loads(constant(tasks["sample-prm-data"], "step"))["recipe"] == "tiny"
    promote = json.loads(constant(tasks["promote-model"], "config"))
    assert promote["promotion"] == load_recipe("tiny").promotion.model_dump(mode="json")
    finish = spec["root"]["dag"]["tasks"]["finish-pipeline-run"]
    assert finish["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert finish["dependentTasks"] == ["exit-handler-1"]


CONDITION = "inputs.parameter_values['pipelinechannel--promote-model-Output'] == 'promoted'"


@pytest.mark.parametrize("name", ["internvl3-1b", "internvl3-2b", "internvl3-8b"])
def test_paper_recipes_deploy_the_champion_only_when_promoted(compiled, name):
    recipe = load_recipe(name)
    spec, platform = load_ir(compiled[name]["internvl3-recipe"])
    tasks = body_tasks(spec)
    condition_name = next(t for t in tasks if t.startswith("condition-"))
    loop = next(t for t in tasks if t.startswith("for-loop-"))  # the evaluation's shards (see below)
    assert set(tasks) == (STEPS - {"evaluate"}) | {
        "merge-evaluation",
        "start-pipeline-run",
        condition_name,
        loop,
    }
    condition = tasks[condition_name]
    assert condition["triggerPolicy"]["condition"] == CONDITION
    assert condition["taskInfo"]["name"] == "promoted"
    assert set(condition["dependentTasks"]) == {"promote-model", "register-model", "start-pipeline-run"}
    inner = sub_dag_tasks(spec, condition)
    assert set(inner) == {"deploy-model"}
    deploy = inner["deploy-model"]["inputs"]["parameters"]
    # The version deployed is the one registered (and just promoted).
    assert deploy["model_uri"]["componentInputParameter"] == "pipelinechannel--register-model-Output"
    assert condition["inputs"]["parameters"]["pipelinechannel--register-model-Output"] == {
        "taskOutputParameter": {"outputParameterKey": "Output", "producerTask": "register-model"}
    }
    # The recipe's deploy settings are compiled in: InferenceService, predictor GPUs, S3, canary steps.
    settings = json.loads(deploy["config"]["runtimeValue"]["constant"])["deploy"]
    service = recipe.deploy.service
    assert settings["enabled"] and settings["service"]["name"] == name == service["name"]
    assert settings["service"]["namespace"] == "vlpipe"
    assert settings["service"]["gpus"] == 1 and settings["service"]["memory"] == service["memory"]
    assert settings["service"]["image"] == f"ghcr.io/vlpipe/vlpipe-serving:{VERSION}"
    assert settings["service"]["s3"]["endpoint"] == "minio.kubeflow.svc.cluster.local:9000"
    assert settings["artifacts_destination"] == recipe.deploy.artifacts_destination
    assert settings["canary"]["steps"] == [10, 50, 100]
    # The deploy pod itself needs no GPU; it is bounded by the canary's step timeouts plus a margin.
    executor = spec["deploymentSpec"]["executors"]["exec-deploy-model"]["container"]
    assert "accelerator" not in executor.get("resources", {})
    k8s = platform["deploymentSpec"]["executors"]["exec-deploy-model"]
    assert int(k8s["activeDeadlineSeconds"]) == 3 * 1200 + 600
    assert "tolerations" not in k8s


@pytest.mark.parametrize("name", ["internvl3-1b", "internvl3-8b"])
def test_paper_recipes_fan_the_evaluation_out_over_shards_and_merge(compiled, name):
    spec, _ = load_ir(compiled[name]["internvl3-recipe"])
    tasks = body_tasks(spec)
    (loop_name,) = [t for t in tasks if t.startswith("for-loop-")]
    loop = tasks[loop_name]
    assert loop["taskInfo"]["name"] == "eval-shards"
    # The fan-out: one item per shard, 4 per benchmark (the recipe's `shards`), in the config's order.
    items = [json.loads(item) for item in json.loads(loop["parameterIterator"]["items"]["raw"])]
    assert items == [
        {"benchmark": b, "index": i, "count": 4} for b in ("MathVista_MINI", "MMMU_DEV_VAL") for i in range(4)
    ]
    # Each iteration is an evaluate-shard task on the MPO policy, the PRM and the prepared data, with the loop
    # item as its shard and the pipeline's eval parameters.
    assert artifact_edges({loop_name: loop}) == {(p, loop_name) for p in ("mpo", "prm", "prepare-data")}
    inner = sub_dag_tasks(spec, loop)
    assert set(inner) == {"evaluate-shard"}
    shard = inner["evaluate-shard"]["inputs"]
    assert shard["parameters"]["shard"] == {"componentInputParameter": loop["parameterIterator"]["itemInput"]}
    assert shard["parameters"]["n"] == {"componentInputParameter": "pipelinechannel--eval_n"}
    assert {k: v["componentInputArtifact"] for k, v in shard["artifacts"].items()} == {
        "policy": "pipelinechannel--mpo-model",
        "prm": "pipelinechannel--prm-model",
        "data": "pipelinechannel--prepare-data-data",
    }
    assert json.loads(constant(inner["evaluate-shard"], "config"))["benchmarks"][0]["shards"] == 4
    # The merge collects every shard's part; register-model takes the merged results.
    assert tasks["merge-evaluation"]["inputs"]["artifacts"]["parts"] == {
        "taskOutputArtifact": {
            "outputArtifactKey": "pipelinechannel--evaluate-shard-part",
            "producerTask": loop_name,
        }
    }
    assert {("merge-evaluation", "register-model"), (loop_name, "merge-evaluation")} <= artifact_edges(tasks)
    assert tasks["merge-evaluation"]["cachingOptions"] == {"enableCache": True}


def test_sharded_prm_data_fans_out_and_merges(tmp_path):
    recipe = load_recipe("tiny")
    raw = recipe.model_dump(mode="json", exclude_unset=True)
    raw["prm_data"]["config"]["shards"] = 2
    path = compile_recipe(PipelineConfig.model_validate(raw), tmp_path, commit=COMMIT)["internvl3-recipe"]
    spec, _ = load_ir(path)
    tasks = body_tasks(spec)
    (loop_name,) = [t for t in tasks if t.startswith("for-loop-")]
    loop = tasks[loop_name]
    assert loop["taskInfo"]["name"] == "prm-data-shards"
    assert json.loads(loop["parameterIterator"]["items"]["raw"]) == [0, 1]
    inner = sub_dag_tasks(spec, loop)["sample-prm-data-shard"]
    assert constant(inner, "count") == 2
    assert artifact_edges({loop_name: loop}) == {("mpo", loop_name), ("prepare-data", loop_name)}
    assert "sample-prm-data" not in tasks
    assert {(loop_name, "merge-prm-data"), ("prepare-data", "merge-prm-data"), ("merge-prm-data", "prm")} <= (
        artifact_edges(tasks)
    )
    assert (
        tasks["prm"]["inputs"]["artifacts"]["steps"]["taskOutputArtifact"]["producerTask"] == "merge-prm-data"
    )


def test_promote_deploy_sub_pipeline_takes_a_model_name_and_version(compiled):
    uri = (
        "models:/{{$.inputs.parameters['pipelinechannel--model_name']}}/"
        "{{$.inputs.parameters['pipelinechannel--model_version']}}"
    )
    spec, _ = load_ir(compiled["tiny"]["promote-deploy"])
    tasks = body_tasks(spec)
    assert set(tasks) == {"start-pipeline-run", "promote-model"}  # tiny: deployment disabled
    assert constant(tasks["promote-model"], "model_uri") == uri
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert set(inputs) == {
        "model_name",
        "model_version",
        "parent_run_id",
        "pipeline_version",
        *PARAMETERS_OF["promote-deploy"],
    }
    assert (
        inputs["model_name"]["defaultValue"] == "vlpipe-tiny"
        and "defaultValue" not in inputs["model_version"]
    )

    spec, _ = load_ir(compiled["internvl3-8b"]["promote-deploy"])
    tasks = body_tasks(spec)
    assert set(tasks) == {"start-pipeline-run", "promote-model", "condition-2"}
    assert tasks["condition-2"]["triggerPolicy"]["condition"] == CONDITION
    deploy = sub_dag_tasks(spec, tasks["condition-2"])["deploy-model"]
    assert constant(deploy, "model_uri") == uri


def test_sub_pipelines_have_the_expected_tasks_and_edges(compiled):
    spec, _ = load_ir(compiled["tiny"]["sft-mpo"])
    tasks = body_tasks(spec)
    assert set(tasks) == {"start-pipeline-run", "prepare-data", "importer", "mix-data", "sft", "mpo"}
    assert artifact_edges(tasks) == {
        ("prepare-data", "mix-data"),
        ("importer", "mix-data"),
        ("prepare-data", "sft"),
        ("importer", "sft"),
        ("mix-data", "sft"),
        ("prepare-data", "mpo"),
        ("sft", "mpo"),
    }
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == {
        "checkpoint_uri",
        "parent_run_id",
        "pipeline_version",
        *PARAMETERS_OF["sft-mpo"],
    }

    spec, _ = load_ir(compiled["tiny"]["evaluate"])
    tasks = body_tasks(spec)
    assert set(tasks) == {"start-pipeline-run", "prepare-data", "importer", "importer-2", "evaluate"}
    assert artifact_edges(tasks) == {
        ("prepare-data", "evaluate"),
        ("importer", "evaluate"),
        ("importer-2", "evaluate"),
    }
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == {
        "policy_uri",
        "prm_uri",
        "parent_run_id",
        "pipeline_version",
        *PARAMETERS_OF["evaluate"],
    }


def test_steps_receive_the_recipe_settings_and_run_on_the_release_image(compiled):
    spec, _ = load_ir(compiled["tiny"]["internvl3-recipe"])
    tasks = body_tasks(spec)
    sft = json.loads(constant(tasks["sft"], "config"))
    assert sft["trainer"]["max_steps"] == load_recipe("tiny").stage_config("sft").trainer.max_steps
    assert sft["tracking"]["experiment"] == "vlpipe-tiny" and "init" not in sft
    # No per-run value (the job uuid) identifies a cacheable task's work: its work directory is named by the
    # MLflow parent run it finds at run time.
    assert "{{$.pipeline_job_uuid}}" not in json.dumps(tasks["sft"])
    for executor in spec["deploymentSpec"]["executors"].values():
        if "container" in executor:
            assert executor["container"]["image"] == IMAGE
            env = {e["name"]: e["value"] for e in executor["container"].get("env", [])}
            assert env["VLPIPE_GIT_COMMIT"] == COMMIT
    cached = {name for name, task in tasks.items() if task.get("cachingOptions", {}).get("enableCache")}
    assert cached == (STEPS | {"sample-prm-data", "critic"}) - {
        "register-model",
        "promote-model",
    }  # no side effects


def test_gpu_toleration_secret_volume_and_env_settings_are_in_the_ir(compiled):
    recipe = load_recipe("internvl3-8b")
    spec, platform = load_ir(compiled["internvl3-8b"]["internvl3-recipe"])
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["deploymentSpec"]["executors"]
    for stage in ("pretrain", "sft", "mpo", "prm"):
        # internvl3-8b trains every stage on several nodes: the step's pod creates a TrainJob and waits, the
        # TrainJob's nodes get the GPUs, tolerations and node selector (tests/components/training/test_trainjob.py)
        assert recipe.stage_step(stage).nodes > 1
        assert "accelerator" not in executors[f"exec-{stage}"]["container"]["resources"]
        launch = json.loads(
            body_tasks(spec)[stage]["inputs"]["parameters"]["launch"]["runtimeValue"]["constant"]
        )
        assert (launch["gpus"], launch["memory"]) == (8, "800Gi")
        assert launch["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "value": None, "effect": "NoSchedule"}
        ]
        assert launch["node_selector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert k8s[f"exec-{stage}"]["pvcMount"][0]["mountPath"] == "/mnt/vlpipe-work"
    one_node, one_node_recipe = (
        load_ir(compiled["internvl3-1b"]["internvl3-recipe"]),
        load_recipe("internvl3-1b"),
    )
    for stage in ("sft", "mpo", "prm"):  # one node: the step's pod trains
        assert one_node_recipe.stage_step(stage).nodes == 1
        resources = one_node[0]["deploymentSpec"]["executors"][f"exec-{stage}"]["container"]["resources"]
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert resources["accelerator"]["resourceCount"] == "8"
        assert resources["resourceMemoryLimit"] == "800Gi"
        one_node_k8s = one_node[1]["deploymentSpec"]["executors"][f"exec-{stage}"]
        assert one_node_k8s["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
        assert one_node_k8s["pvcMount"][0]["mountPath"] == "/mnt/vlpipe-work"
        assert one_node_k8s["nodeSelector"]["labels"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    # Every evaluation shard gets its GPU; the merge needs none.
    assert executors["exec-evaluate-shard"]["container"]["resources"]["accelerator"]["resourceCount"] == "1"
    assert k8s["exec-evaluate-shard"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "accelerator" not in executors["exec-merge-evaluation"]["container"].get("resources", {})
    # CPU steps get no GPU and no GPU toleration.
    assert "accelerator" not in executors["exec-prepare-data"]["container"].get("resources", {})
    assert "tolerations" not in k8s["exec-prepare-data"]
    # Every step gets the credentials from the secrets and MLflow's URL from the recipe.
    for name, executor in executors.items():
        if "container" not in executor:
            continue
        secrets = {
            s["secretName"]: {e["envVar"]: e["secretKey"] for e in s["keyToEnv"]}
            for s in k8s[name]["secretAsEnv"]
        }
        assert secrets == {
            "vlpipe-s3": {
                "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
            },
            "vlpipe-mlflow": {"MLFLOW_TRACKING_USERNAME": "username", "MLFLOW_TRACKING_PASSWORD": "password"},
        }
        env = {e["name"]: e["value"] for e in executor["container"]["env"]}
        assert env["MLFLOW_TRACKING_URI"] == recipe.cluster.tracking_uri
        assert env["VLPIPE_MODEL_STORE"] == recipe.cluster.model_store == "s3://vlpipe-models/checkpoints"
        assert env["AWS_ENDPOINT_URL"] == recipe.cluster.env["AWS_ENDPOINT_URL"]
    # Training steps retry (they resume from the work volume).
    assert body_tasks(spec)["sft"]["retryPolicy"]["maxRetryCount"] == 2
    assert spec["defaultPipelineRoot"] == recipe.cluster.pipeline_root


def test_no_credential_from_the_environment_appears_in_any_compiled_file(compiled):
    leaks = [*FAKE_CREDENTIALS.values(), "leaky-user", "leaky-password"]
    for files in compiled.values():
        for path in files.values():
            text = path.read_text()
            assert not [value for value in leaks if value in text], path


def test_recompiling_the_same_commit_gives_byte_identical_files(compiled, tmp_path):
    again = compile_recipe(load_recipe("internvl3-8b"), tmp_path, commit=COMMIT)
    for name, path in again.items():
        assert path.read_bytes() == compiled["internvl3-8b"][name].read_bytes()


def test_compile_command_writes_one_file_per_pipeline(tmp_path, monkeypatch):
    monkeypatch.setenv("VLPIPE_GIT_COMMIT", COMMIT)
    result = CliRunner().invoke(app, ["compile", "--recipe", "tiny", "--out", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    code = f"{VERSION}+{COMMIT[:12]}"
    written = sorted((tmp_path / "one").iterdir())
    assert sorted(p.name for p in written) == sorted(
        f"{p.name.split('-0.1.0+')[0]}-{code}.{pipeline_digest(p)}.yaml" for p in written
    )
    assert sorted(p.name.split(f"-{code}")[0] for p in written) == sorted(PIPELINES)
    result = CliRunner().invoke(app, ["compile", "--recipe", "nope", "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "shipped recipes" in result.output


def test_a_critic_section_trains_the_prm_base_from_the_sft_checkpoint(tmp_path):
    import yaml

    from vlpipe.pipelines.config import PipelineConfig, recipe_path

    raw = yaml.safe_load(recipe_path("tiny").read_text())
    raw["critic"] = raw["stages"]["sft"]  # more SFT with the SFT settings
    files = compile_recipe(PipelineConfig.model_validate(raw), tmp_path, commit=COMMIT)
    spec, _ = load_ir(files["internvl3-recipe"])
    tasks = body_tasks(spec)
    edges = artifact_edges(tasks)
    assert {("sft", "critic"), ("prepare-data", "critic"), ("critic", "prm")} <= edges
    assert ("sft", "prm") not in edges  # the PRM starts from the critic, the MPO branch from SFT
    assert ("sft", "mpo") in edges
    settings = json.loads(constant(tasks["critic"], "config"))
    assert settings["trainer"] == raw["stages"]["sft"]["config"]["trainer"]
