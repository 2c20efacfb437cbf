"""`vlpipe submit`: upload the pipeline or a new version, reuse an existing version, start a run — against a
fake `kfp.Client` (no cluster here). Credentials come from the environment, never from arguments."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from vlpipe.components.release import VERSION
from vlpipe.pipelines import submit as submit_module
from vlpipe.pipelines.cli import app
from vlpipe.pipelines.config import load_recipe
from vlpipe.pipelines.submit import submit_recipe

COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


class FakeClient:
    """Records what `submit_recipe` asks of the Kubeflow API."""

    def __init__(
        self, pipelines: dict[str, str] | None = None, versions: dict[str, str] | None = None
    ) -> None:
        self.pipelines = dict(pipelines or {})  # name -> id
        self.versions = dict(versions or {})  # version name -> id
        self.calls: list[tuple] = []

    def get_pipeline_id(self, name):
        return self.pipelines.get(name)

    def upload_pipeline(self, path, pipeline_name=None, description=None):
        with open(path) as f:
            spec = next(yaml.safe_load_all(f))
        self.calls.append(("upload_pipeline", pipeline_name, spec["pipelineInfo"]["name"]))
        self.pipelines[pipeline_name] = "pipeline-1"
        return SimpleNamespace(pipeline_id="pipeline-1")

    def upload_pipeline_version(self, path, pipeline_version_name, pipeline_id=None, description=None):
        self.calls.append(("upload_pipeline_version", pipeline_version_name, pipeline_id))
        self.versions[pipeline_version_name] = f"version-{len(self.versions) + 1}"
        return SimpleNamespace(pipeline_version_id=self.versions[pipeline_version_name])

    def list_pipeline_versions(self, pipeline_id, page_size=10, filter=None):
        import json

        wanted = json.loads(filter)["predicates"][0]["string_value"]
        found = [SimpleNamespace(pipeline_version_id=v) for k, v in self.versions.items() if k == wanted]
        return SimpleNamespace(pipeline_versions=found)

    def create_experiment(self, name):
        self.calls.append(("create_experiment", name))
        return SimpleNamespace(experiment_id="experiment-1")

    def run_pipeline(self, **kwargs):
        self.calls.append(("run_pipeline", kwargs))
        return SimpleNamespace(run_id="run-1")


@pytest.fixture(autouse=True)
def _commit(monkeypatch):
    monkeypatch.setenv("VLPIPE_GIT_COMMIT", COMMIT)


def _version(recipe, pipeline: str = "internvl3-recipe") -> str:
    """What the pipeline's version must be: package + commit + the digest of its compiled file."""
    import tempfile

    from vlpipe.pipelines.compile import compile_recipe, pipeline_digest

    with tempfile.TemporaryDirectory() as tmp:
        digest = pipeline_digest(compile_recipe(recipe, tmp, commit=COMMIT)[pipeline])
    return f"{VERSION}+{COMMIT[:12]}.{digest}"


def test_first_submission_uploads_the_pipeline_and_its_version_then_runs():
    client = FakeClient()
    result = submit_recipe(load_recipe("internvl3-8b"), host="http://kfp.example", client=client)
    version = _version(load_recipe("internvl3-8b"))
    assert result.pipeline_name == "internvl3-recipe-internvl3-8b" and result.version_name == version
    assert result.uploaded and result.run_id == "run-1" and result.experiment == "internvl3-8b"
    assert client.calls[0] == ("upload_pipeline", "internvl3-recipe-internvl3-8b", "internvl3-recipe")
    assert client.calls[1] == ("upload_pipeline_version", version, "pipeline-1")
    run = client.calls[-1][1]
    assert run["pipeline_id"] == "pipeline-1" and run["version_id"] == result.version_id
    assert run["experiment_id"] == "experiment-1" and run["params"] == {"pipeline_version": version}
    assert run["service_account"] == "vlpipe-pipeline-runner"  # the RBAC of infra/k8s/base/rbac.yaml


def test_resubmitting_the_same_commit_reuses_the_version():
    version = _version(load_recipe("tiny"), "sft-mpo")
    client = FakeClient(pipelines={"sft-mpo-tiny": "pipeline-7"}, versions={version: "version-7"})
    result = submit_recipe(
        load_recipe("tiny"),
        host="http://kfp.example",
        pipeline="sft-mpo",
        experiment="mine",
        arguments={"checkpoint_uri": "s3://models/pretrained"},
        client=client,
    )
    assert not result.uploaded and result.version_id == "version-7"
    assert not [c for c in client.calls if c[0].startswith("upload")]
    assert ("create_experiment", "mine") in client.calls
    assert client.calls[-1][1]["params"] == {
        "pipeline_version": version,
        "checkpoint_uri": "s3://models/pretrained",
    }
    assert client.calls[-1][1]["service_account"] is None  # no cluster settings: Kubeflow's default


def test_a_new_commit_adds_a_version_to_the_existing_pipeline():
    client = FakeClient(
        pipelines={"internvl3-recipe-tiny": "pipeline-3"}, versions={"0.1.0+000000000000": "v-old"}
    )
    result = submit_recipe(load_recipe("tiny"), host="http://kfp.example", client=client)
    assert result.uploaded and result.pipeline_id == "pipeline-3" and result.version_id != "v-old"


def test_a_changed_setting_uploads_a_new_version_and_an_identical_submit_reuses_it():
    client = FakeClient()
    first = submit_recipe(load_recipe("tiny"), host="http://kfp.example", client=client)
    again = submit_recipe(load_recipe("tiny"), host="http://kfp.example", client=client)
    changed = submit_recipe(
        load_recipe("tiny", ["stages.sft.config.trainer.optimizer.lr=1e-4"]),
        host="http://kfp.example",
        client=client,
    )
    assert first.uploaded and not again.uploaded and changed.uploaded
    assert again.version_name == first.version_name and again.version_id == first.version_id
    assert changed.version_name != first.version_name and changed.pipeline_id == first.pipeline_id
    code = f"{VERSION}+{COMMIT[:12]}."
    assert first.version_name.startswith(code) and changed.version_name.startswith(code)
    uploads = [c for c in client.calls if c[0] == "upload_pipeline_version"]
    assert [c[1] for c in uploads] == [first.version_name, changed.version_name]


def test_submit_command_takes_credentials_only_from_the_environment(monkeypatch):
    made = {}

    def fake_client(**kwargs):
        made.update(kwargs)
        return FakeClient()

    import kfp

    monkeypatch.setattr(kfp, "Client", fake_client)
    monkeypatch.setenv(submit_module.TOKEN_ENV, "token-from-env")
    result = CliRunner().invoke(
        app, ["submit", "--host", "http://kfp.example", "--recipe", "tiny", "--param", "parent_run_id="]
    )
    assert result.exit_code == 0, result.output
    assert made == {"host": "http://kfp.example", "existing_token": "token-from-env"}
    assert "started run run-1" in result.output
    result = CliRunner().invoke(
        app, ["submit", "--host", "http://kfp.example", "--recipe", "tiny", "--token", "x"]
    )
    assert result.exit_code != 0  # there is no option for credentials
