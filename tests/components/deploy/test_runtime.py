"""The deployment runtime choice end to end: real vlpipe checkpoints (tiny preset, V2PE δ 1 and 0.25) and a
real registered MLflow model, their `config.json` read where KServe would download them, recipes refused at
load time, and the deploy step against a local MLflow registry, a moto S3 on 127.0.0.1 and the stubbed KServe
API of `tests.serving.test_deploy`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import mlflow
import pytest
from pydantic import ValidationError

from tests.pipelines.test_promote_deploy import NAME, TRACKING, _aliases, _promote, registry  # noqa: F401
from tests.serving.test_deploy import FakeClock, FakeCustomObjectsApi, _client
from vlpipe.components.deploy.config import DeployConfig, DeploySettings
from vlpipe.components.deploy.deploy import deploy_champion
from vlpipe.model.build import V2PE_CONFIG_KEY as MODEL_V2PE_KEY
from vlpipe.model.init import init_random
from vlpipe.model.storage import upload_dir
from vlpipe.pipelines.config import PipelineConfig, read_recipe
from vlpipe.serving.deploy import V2PE_CONFIG_KEY, check_vllm_checkpoint, served_checkpoint
from vlpipe.serving.pyfunc import log_checkpoint_model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[float, str]:
    """Tiny checkpoints as vlpipe writes them, by V2PE δ."""
    root = tmp_path_factory.mktemp("ckpts")
    return {
        delta: init_random("tiny", str(root / f"delta-{delta}"), seed=0, v2pe_delta=delta)
        for delta in (1.0, 0.25)
    }


@pytest.fixture(scope="module")
def registered_model(checkpoints, tmp_path_factory) -> Path:
    """The δ = 1 checkpoint as the register step logs it (a `VLPipePyfunc` MLflow model), downloaded: the
    layout of a registered version's files on S3."""
    tmp = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
        mp.chdir(tmp)
        with mlflow.start_run():
            info = log_checkpoint_model(checkpoints[1.0])
        return Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp / "model")))


def test_the_v2pe_key_is_the_models():
    assert V2PE_CONFIG_KEY == MODEL_V2PE_KEY


def test_the_checkpoint_inside_a_registered_model_is_what_vllm_reads(checkpoints, registered_model):
    checkpoint, config = served_checkpoint(str(registered_model))
    # MLflow keeps the logged directory's own name under artifacts/: only the MLmodel says where it is.
    assert Path(checkpoint) == registered_model / "artifacts" / Path(checkpoints[1.0]).name
    assert config["architectures"] == ["InternVLForConditionalGeneration"] and config[V2PE_CONFIG_KEY] == 1.0
    check_vllm_checkpoint(config, checkpoint)  # δ 1, transformers' InternVL: accepted
    plain, config = served_checkpoint(checkpoints[0.25])  # a checkpoint directory is its own checkpoint
    assert plain == checkpoints[0.25] and config[V2PE_CONFIG_KEY] == 0.25
    with pytest.raises(
        ValueError, match=r"has V2PE δ v2pe_delta=0.25: deploy.runtime: huggingface-vllm serves"
    ):
        check_vllm_checkpoint(config, plain, runtime_key="deploy.runtime")


def test_checkpoints_vllm_would_serve_differently_are_refused():
    with pytest.raises(ValueError, match="set runtime: vlpipe, whose predictor applies the checkpoint's δ"):
        check_vllm_checkpoint(
            {"architectures": ["InternVLForConditionalGeneration"], "v2pe_delta": 0.5}, "ckpt"
        )
    # OpenGVLab's remote-code format is not what vlpipe writes or checks.
    with pytest.raises(ValueError, match=r"\['InternVLChatModel'\] checkpoint.*export_checkpoint"):
        check_vllm_checkpoint({"architectures": ["InternVLChatModel"]}, "ckpt")
    check_vllm_checkpoint({"architectures": ["InternVLForConditionalGeneration"]}, "published -hf checkpoint")


def test_served_checkpoint_refuses_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        served_checkpoint(str(tmp_path))
    (tmp_path / "MLmodel").write_text("flavors: {python_function: {artifacts: {}}}\n")
    with pytest.raises(FileNotFoundError, match="MLflow model without a 'checkpoint' artifact"):
        served_checkpoint(str(tmp_path))
    (tmp_path / "MLmodel").unlink()
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        served_checkpoint(str(tmp_path))


# -- recipes ---------------------------------------------------------------------------------------------------
def _recipe(**deploy) -> dict:
    raw = copy.deepcopy(read_recipe("internvl3-1b"))
    raw["deploy"].update(deploy)
    return raw


def _invalid(raw: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        PipelineConfig.model_validate(raw)


def test_a_recipe_chooses_the_runtime_and_serve_settings():
    recipe = PipelineConfig.model_validate(_recipe(runtime="huggingface-vllm", serve={"max_images": 2}))
    service = recipe.deploy_config().deploy.serving_deployment()
    assert service.runtime == "huggingface-vllm" and service.serve == {"max_images": 2}
    recipe = PipelineConfig.model_validate(_recipe(serve={"max_tokens": 512, "max_best_of": 4}))
    service = recipe.deploy_config().deploy.serving_deployment()
    assert service.runtime == "vlpipe" and service.serve == {"max_tokens": 512, "max_best_of": 4}
    assert PipelineConfig.model_validate(_recipe()).deploy.runtime == "vlpipe"  # the default


def test_recipes_refuse_what_the_vllm_runtime_cannot_serve(checkpoints):
    _invalid(_recipe(serve={"max_tokenz": 512}), r"deploy.serve.max_tokenz: not a serving limit")
    _invalid(_recipe(serve={"max_images": -1}), r"deploy.serve.max_images: Input should be greater")
    _invalid(_recipe(runtime="vllm"), r"deploy.runtime\n  Input should be 'vlpipe' or 'huggingface-vllm'")
    prm = _recipe(runtime="huggingface-vllm")
    prm["deploy"]["service"]["prm_uri"] = "s3://models/prm"
    _invalid(
        prm, r"deploy.service.prm_uri is set: Best-of-N with a PRM \(best_of\).*set deploy.runtime: vlpipe"
    )
    _invalid(
        _recipe(runtime="huggingface-vllm", serve={"max_best_of": 4}),
        r"deploy.serve.max_best_of does not apply to deploy.runtime: huggingface-vllm \(best_of needs a PRM",
    )
    _invalid(_recipe(vllm={"max_model_len": 4096}), "deploy.vllm applies to deploy.runtime: huggingface-vllm")
    _invalid(_recipe(runtime="huggingface-vllm", vllm={"max_model_len": 0}), "max_model_len")
    moved = _recipe()
    moved["deploy"]["service"]["runtime"] = "huggingface-vllm"
    _invalid(moved, "deploy.service.runtime: set it as deploy.runtime")
    # A local starting checkpoint with δ ≠ 1 is known now; δ = 1 passes.
    init = _recipe(runtime="huggingface-vllm")
    init["init"] = {"checkpoint": checkpoints[0.25]}
    _invalid(init, r"init.checkpoint \(.*\) has v2pe_delta=0.25; set deploy.runtime: vlpipe")
    init["init"] = {"checkpoint": checkpoints[1.0]}
    assert PipelineConfig.model_validate(init).deploy.runtime == "huggingface-vllm"


# -- the deploy step -------------------------------------------------------------------------------------------
def _vllm_config(storage_uri: str) -> DeployConfig:
    settings = DeploySettings(
        enabled=True,
        runtime="huggingface-vllm",
        service={"name": "vlpipe-steps", "namespace": "models", "storage_uri": storage_uri, "gpus": 1},
        serve={"max_images": 2},
        canary={"step_timeout_s": 60, "poll_interval_s": 5},
    )
    return DeployConfig(recipe="steps", tracking=TRACKING, deploy=settings)


def test_the_deploy_step_serves_the_registered_checkpoint_on_vllm_and_refuses_delta(
    registry,  # noqa: F811
    s3_server,
    checkpoints,
    registered_model,
    tmp_path,
):
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="models")
    upload_dir(registered_model, "s3://models/v1")  # a registered version's files: MLmodel + artifacts/
    upload_dir(checkpoints[0.25], "s3://models/v2")  # a checkpoint trained with another δ
    client, parent, add = registry
    api, clock = FakeCustomObjectsApi(), FakeClock()
    kserve = _client(api)
    first = add(pass_at_1=0.40, best_of_n=0.50)
    _promote(parent, first, tmp_path)
    result = deploy_champion(
        _vllm_config("s3://models/v1"), model_uri=f"models:/{NAME}/{first}", parent_run_id=parent,
        report_path=str(tmp_path / "deploy.md"), kserve_client=kserve, sleep=clock.sleep, clock=clock,
    )  # fmt: skip
    assert result["status"] == "created" and result["runtime"] == "huggingface-vllm"
    model = api.objects["models", "vlpipe-steps"]["spec"]["predictor"]["model"]
    assert (
        model["storageUri"]
        == f"s3://models/v1/artifacts/{Path(checkpoints[1.0]).name}"
        == result["storage_uri"]
    )
    assert model["modelFormat"] == {"name": "huggingface"} and "--backend=vllm" in model["args"]
    assert '--limit-mm-per-prompt={"image": 2}' in model["args"]
    assert "runtime `huggingface-vllm`" in (tmp_path / "deploy.md").read_text()

    second = add(pass_at_1=0.45, best_of_n=0.55)
    _promote(parent, second, tmp_path)
    calls = len(api.calls)
    with pytest.raises(
        ValueError, match=r"s3://models/v2 has V2PE δ v2pe_delta=0.25.*set deploy.runtime: vlpipe"
    ):
        deploy_champion(
            _vllm_config("s3://models/v2"), model_uri=f"models:/{NAME}/{second}", parent_run_id=parent,
            kserve_client=kserve, sleep=clock.sleep, clock=clock,
        )  # fmt: skip
    assert len(api.calls) == calls  # refused before KServe was asked anything
    assert api.objects["models", "vlpipe-steps"]["spec"]["predictor"]["model"]["storageUri"].startswith(
        "s3://models/v1/"
    )
    assert json.loads(json.dumps(_aliases(client, second))) == ["champion"]  # the registry is not the cluster
