"""The tiny recipe against the local platform, as it would run on a cluster (`make test-integration`).

The platform (an MLflow tracking server with basic auth and proxied artifacts, and an S3 store, both on
loopback) is the one `make platform-up` started (found through `VLPIPE_PLATFORM_HOME`), or, when none is
running, one this module starts and stops itself. Then: the demo data is written to `s3://vlpipe-data/...`,
the `tiny` recipe runs through `kfp.local` reading its data from S3, handing its checkpoints between steps
through `s3://vlpipe-models/...` (the recipe's `cluster.model_store`) and logging every run, artifact and
model version to the tracking server (whose artifacts land in `s3://vlpipe-mlflow/...`). The promoted model
is then served by `vlpipe serve --model-uri models:/<name>@champion` and answers a chat request.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from tests.servers import wait_until_ready

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
STAGES = ("init", "pretrain", "sft", "mpo", "prm")


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    """The running platform's environment (started here when `make platform-up` was not run)."""
    from vlpipe.infra import local_platform

    home = os.environ.get("VLPIPE_PLATFORM_HOME")
    running = local_platform.load(Path(home)) if home else None
    own_home = None
    if running is None:
        own_home = tmp_path_factory.mktemp("platform-home")
        running = local_platform.up(own_home)
    yield running
    if own_home is not None:
        local_platform.down(own_home, purge=True)


@pytest.fixture(scope="module")
def client_env(platform, tmp_path_factory):
    """This process as a platform client: the platform's environment, a fresh local home (no stores)."""
    import s3fs

    home = tmp_path_factory.mktemp("client-home")
    mp = pytest.MonkeyPatch()
    for name in [k for k in os.environ if k.startswith(("MLFLOW_", "AWS_"))]:
        mp.delenv(name)
    for name, value in platform.env.items():
        mp.setenv(name, value)
    mp.setenv("VLPIPE_HOME", str(home))
    s3fs.S3FileSystem.clear_instance_cache()
    yield home
    s3fs.S3FileSystem.clear_instance_cache()
    mp.undo()


@pytest.fixture(scope="module")
def recipe_run(platform, client_env):
    """Demo data to S3, then the tiny recipe with S3 data, an S3 model store and the tracking server."""
    from vlpipe.model.data.demo import DemoSizes, write_demo_dataset
    from vlpipe.pipelines.config import PipelineConfig, recipe_path
    from vlpipe.pipelines.local import run_local

    key = uuid.uuid4().hex[:8]
    raw = yaml.safe_load(recipe_path("tiny").read_text())
    data_root = f"s3://vlpipe-data/integration-{key}/demo"
    write_demo_dataset(data_root, seed=0, sizes=DemoSizes(**raw["data"]["demo"]["sizes"]))
    raw["data"] = {"source": "meta", "root": data_root, "mix_samples": raw["data"]["mix_samples"]}
    raw.setdefault("cluster", {})["model_store"] = f"s3://vlpipe-models/integration-{key}"
    raw["registry"]["model_name"] = f"vlpipe-integration-{key}"
    raw["tracking"]["experiment"] = f"vlpipe-integration-{key}"
    summary = run_local(PipelineConfig.model_validate(raw))
    return {"key": key, "summary": summary, "recipe": raw}


def _s3_keys(bucket: str, prefix: str) -> list[str]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def test_the_recipe_runs_through_the_servers(recipe_run, platform, client_env):
    from mlflow import MlflowClient

    summary, key = recipe_run["summary"], recipe_run["key"]
    name = recipe_run["recipe"]["registry"]["model_name"]
    assert summary["tracking_uri"] == platform.tracking_uri
    assert summary["parent"]["status"] == "FINISHED"
    assert all(stage["status"] == "FINISHED" for stage in summary["stages"].values()), summary["stages"]
    assert summary["promotion"]["decision"] == "promoted"
    assert summary["registered"]["aliases"] == ["champion"]

    # Data came from S3: the data step recorded the s3:// files it validated.
    client = MlflowClient()
    data_run = client.get_run(summary["stages"]["data"]["run_id"])
    assert data_run.data.params["source"] == "meta"
    assert data_run.data.params["sft_meta"] == f"s3://vlpipe-data/integration-{key}/demo/meta_sft.json"

    # Checkpoints went through the model store: every stage's files are in the bucket, and the kfp.local
    # artifacts hold only pointers.
    keys = _s3_keys("vlpipe-models", f"integration-{key}/")
    for task in ("init-model", "pretrain", "sft", "mpo", "prm"):
        assert any(k.endswith(f"/{task}/model/model.safetensors") for k in keys), (task, keys[:20])
    run_dir = max(Path(summary["pipeline_root"]).iterdir(), key=lambda p: p.stat().st_mtime)
    assert sorted(p.name for p in (run_dir / "mpo" / "model").iterdir()) == ["vlpipe-pointer.json"]
    version = client.get_model_version(name, summary["registered"]["version"])
    assert version.tags["checkpoint.policy"].startswith(f"s3://vlpipe-models/integration-{key}/")

    # MLflow artifacts are proxied by the server into s3://vlpipe-mlflow; nothing was stored locally.
    parent = client.get_run(summary["parent"]["run_id"])
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:/")
    experiment_id = parent.info.experiment_id
    artifacts = _s3_keys("vlpipe-mlflow", f"artifacts/{experiment_id}/")
    eval_run = summary["stages"]["eval"]["run_id"]
    assert any(
        k.startswith(f"artifacts/{experiment_id}/{eval_run}/") and k.endswith(".png") for k in artifacts
    )
    assert any("MLmodel" in k for k in artifacts)  # the registered policy's MLflow model
    assert not (client_env / "mlflow.db").exists() and not (client_env / "mlartifacts").exists()

    # No credential reached MLflow: no param or tag of any run holds a secret value of the platform.
    secrets = [platform.env[k] for k in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD")]
    for run in client.search_runs([experiment_id]):
        values = [*run.data.params.values(), *run.data.tags.values()]
        assert not [v for v in values if any(s in v for s in secrets)], run.info.run_id


def test_the_server_refuses_requests_without_credentials(platform):
    response = httpx.get(f"{platform.tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1")
    assert response.status_code == 401
    wrong = httpx.get(
        f"{platform.tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1",
        auth=(platform.env["MLFLOW_TRACKING_USERNAME"], "not-the-password"),
    )
    assert wrong.status_code == 401


def test_the_champion_is_served_from_its_registry_uri(recipe_run, platform, client_env, tmp_path):
    from PIL import Image

    name = recipe_run["recipe"]["registry"]["model_name"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "VLPIPE_HOME": str(tmp_path / "serving-home")}
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vlpipe.pipelines.cli",
                "serve",
                "--model-uri",
                f"models:/{name}@champion",
                "--name",
                "vlpipe",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],  # fmt: skip
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(f"{url}/v2/models/vlpipe/ready", process, log_path, timeout_s=180)
        image = tmp_path / "scene.png"
        Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
        data_url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
        body = {
            "model": "vlpipe",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url}},
                        {"type": "text", "text": "How many shapes are there?"},
                    ],
                }
            ],
            "max_tokens": 8,
            "temperature": 0,
        }
        response = httpx.post(f"{url}/openai/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["choices"][0]["message"]["role"] == "assistant"
        assert answer["usage"]["completion_tokens"] >= 1
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _s3_client(env: dict[str, str], *, key: str | None = None):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=key or env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
        config=Config(retries={"max_attempts": 1}),
    )


def test_a_restarted_platform_keeps_its_credentials_runs_and_artifacts(tmp_path, monkeypatch):
    """`platform-up` → `platform-down` → `platform-up`: the printed environment still authenticates, the
    earlier run's artifact is served, the S3 objects are there, unknown keys are refused, and every file
    holding a credential or its hash is 0600."""
    from botocore.exceptions import ClientError
    from mlflow import MlflowClient

    from vlpipe.infra import local_platform

    home = tmp_path / "restart-home"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # a failure fails in seconds, not minutes
    payload = os.urandom(64 * 1024)
    first = local_platform.up(home)
    try:
        for name, value in first.env.items():
            monkeypatch.setenv(name, value)
        client = MlflowClient(first.tracking_uri)
        experiment = client.create_experiment(f"restart-{uuid.uuid4().hex[:8]}")
        run_id = client.create_run(experiment).info.run_id
        note = tmp_path / "note.txt"
        note.write_text("kept across restarts")
        client.log_artifact(run_id, str(note))
        client.set_terminated(run_id)
        _s3_client(first.env).put_object(Bucket="vlpipe-data", Key="restart/object.bin", Body=payload)
    finally:
        assert sorted(local_platform.down(home)) == ["mlflow", "moto"]

    second = local_platform.up(home)
    try:
        assert second.pids != first.pids
        for name in (
            "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        ):
            assert second.env[name] == first.env[name], name
        auth = (first.env["MLFLOW_TRACKING_USERNAME"], first.env["MLFLOW_TRACKING_PASSWORD"])
        search = f"{second.tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1"
        assert httpx.get(search, auth=auth, timeout=60).status_code == 200  # the first `up`'s password
        assert httpx.get(search, timeout=60).status_code == 401

        for name, value in second.env.items():  # the new ports
            monkeypatch.setenv(name, value)
        client = MlflowClient(second.tracking_uri)
        assert client.get_run(run_id).info.status == "FINISHED"
        downloaded = client.download_artifacts(run_id, "note.txt", str(tmp_path / "downloaded"))
        assert Path(downloaded).read_text() == "kept across restarts"
        s3 = _s3_client(second.env)
        assert s3.get_object(Bucket="vlpipe-data", Key="restart/object.bin")["Body"].read() == payload

        unknown = _s3_client(second.env, key="AKIAUNKNOWNKEY000000")
        with pytest.raises(ClientError) as refused:
            unknown.get_object(Bucket="vlpipe-data", Key="restart/object.bin")
        assert refused.value.response["Error"]["Code"] == "InvalidAccessKeyId"
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403

        directory = second.directory
        assert directory.stat().st_mode & 0o777 == 0o700
        for name in ("credentials.json", "env", "auth.db", "basic_auth.ini", "mlflow.db"):
            assert (directory / name).stat().st_mode & 0o777 == 0o600, name
        secrets = list(json.loads((directory / "credentials.json").read_text()).values())
        assert (
            second.env["MLFLOW_TRACKING_PASSWORD"] in secrets and second.env["AWS_ACCESS_KEY_ID"] in secrets
        )
        texts = [p.read_text(errors="replace") for p in directory.glob("*.log")]
        for pid in second.pids.values():  # the servers and their workers: no credential on a command line
            group = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _pgrp(p) == pid]
            texts += [(p / "cmdline").read_bytes().decode(errors="replace") for p in group]
        assert not [t for t in texts if any(s in t for s in secrets)]
    finally:
        local_platform.down(home, purge=True)


def _pgrp(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, ValueError, IndexError):
        return None
