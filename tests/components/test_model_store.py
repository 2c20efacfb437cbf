"""Checkpoints handed between steps through a model store (`vlpipe.components.pipeline_run.model_store`)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest

from vlpipe.components.pipeline_run.model_store import (
    METADATA_KEY,
    POINTER_FILE,
    STORE_ENV,
    checkpoint_path,
    checkpoint_uri,
    publish_checkpoint,
    store_uri,
)


def _checkpoint(tmp_path: Path) -> Path:
    src = tmp_path / "final"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "model.safetensors").write_bytes(bytes(range(256)) * 40)
    (src / "sub" / "tokenizer.json").write_text("{}")
    return src


def _artifact(tmp_path: Path, uri_parts: tuple[str, ...] = ("run-123", "sft", "model")) -> SimpleNamespace:
    path = tmp_path.joinpath("pipeline-root", *uri_parts)
    return SimpleNamespace(path=str(path), uri=str(path), metadata={})


def test_store_uri_uses_run_task_and_output():
    assert store_uri("s3://b/ckpt", "/x/root/recipe-2026/sft/model") == "s3://b/ckpt/recipe-2026/sft/model"
    assert store_uri("s3://b", "s3://root/p/recipe-1/prm/model") == "s3://b/recipe-1/prm/model"
    with pytest.raises(ValueError, match="model-store key"):
        store_uri("s3://b", "/model")


def test_without_store_the_artifact_holds_a_copy(tmp_path, monkeypatch):
    monkeypatch.delenv(STORE_ENV, raising=False)
    src, artifact = _checkpoint(tmp_path), _artifact(tmp_path)
    assert publish_checkpoint(src, artifact) is None
    assert (Path(artifact.path) / "model.safetensors").read_bytes() == (
        src / "model.safetensors"
    ).read_bytes()
    assert not (Path(artifact.path) / POINTER_FILE).exists()
    assert checkpoint_path(artifact.path) == artifact.path
    assert METADATA_KEY not in artifact.metadata


def test_store_round_trip_through_s3(tmp_path, monkeypatch, s3_server):
    boto3.client("s3").create_bucket(Bucket="models")
    monkeypatch.setenv(STORE_ENV, "s3://models/checkpoints")
    monkeypatch.setenv("VLPIPE_HOME", str(tmp_path / "home"))
    src, artifact = _checkpoint(tmp_path), _artifact(tmp_path)

    uri = publish_checkpoint(src, artifact)

    assert uri == "s3://models/checkpoints/run-123/sft/model"
    assert artifact.metadata[METADATA_KEY] == uri
    # The artifact holds only the pointer; the files are in the bucket.
    assert sorted(p.name for p in Path(artifact.path).iterdir()) == [POINTER_FILE]
    pointer = json.loads((Path(artifact.path) / POINTER_FILE).read_text())
    assert pointer == {"uri": uri, "files": 3, "bytes": 10240 + 8 + 2}
    keys = sorted(o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="models")["Contents"])
    assert keys == [
        "checkpoints/run-123/sft/model/config.json",
        "checkpoints/run-123/sft/model/model.safetensors",
        "checkpoints/run-123/sft/model/sub/tokenizer.json",
    ]
    local = Path(checkpoint_path(artifact.path))
    assert local != Path(artifact.path)
    assert str(local).startswith(str(tmp_path / "home" / "cache"))
    assert (local / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert (local / "sub" / "tokenizer.json").read_text() == "{}"
    assert checkpoint_uri(artifact.path) == uri


def test_pointer_to_a_missing_checkpoint_names_the_uri(tmp_path, monkeypatch, s3_server):
    boto3.client("s3").create_bucket(Bucket="models")
    monkeypatch.setenv("VLPIPE_HOME", str(tmp_path / "home"))
    src, artifact = _checkpoint(tmp_path), _artifact(tmp_path)
    uri = publish_checkpoint(src, artifact, store="s3://models/c")
    s3 = boto3.resource("s3").Bucket("models")
    s3.objects.filter(Prefix="c/").delete()
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # a later step is a new process: no cached listing
    with pytest.raises(FileNotFoundError, match=uri):
        checkpoint_path(artifact.path)


def test_checkpoint_output_writes_in_place_without_a_store(tmp_path, monkeypatch):
    from vlpipe.components.pipeline_run.model_store import checkpoint_output

    monkeypatch.delenv(STORE_ENV, raising=False)
    artifact = _artifact(tmp_path)
    with checkpoint_output(artifact) as out:
        assert out == artifact.path  # no staging copy
        (Path(out) / "config.json").write_text("{}")
    assert (Path(artifact.path) / "config.json").exists() and METADATA_KEY not in artifact.metadata


def test_checkpoint_output_stages_and_publishes_with_a_store(tmp_path, monkeypatch, s3_server):
    from vlpipe.components.pipeline_run.model_store import checkpoint_output

    boto3.client("s3").create_bucket(Bucket="models")
    monkeypatch.setenv("VLPIPE_HOME", str(tmp_path / "home"))
    artifact = _artifact(tmp_path)
    with checkpoint_output(artifact, store="s3://models/c") as out:
        assert Path(out).parent == tmp_path / "home" / "staging"
        (Path(out) / "config.json").write_text('{"x": 1}')
    assert not Path(out).exists()  # the staging copy is removed once published
    assert artifact.metadata[METADATA_KEY] == "s3://models/c/run-123/sft/model"
    assert json.loads(Path(checkpoint_path(artifact.path), "config.json").read_text()) == {"x": 1}
