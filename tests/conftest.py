"""Shared fixtures: a tiny tokenizer and model built offline, and a loopback S3 server."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _isolated_tracking(tmp_path_factory):
    """Keep every test's MLflow runs and local state out of the repository (./mlruns, .vlpipe/)."""
    home = tmp_path_factory.mktemp("vlpipe-home")
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "VLPIPE_HOME")}
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
    os.environ["VLPIPE_HOME"] = str(home)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _reset_mlflow_uris():
    """A stage sets MLflow's process-wide tracking URI; reset it after each test so the next test's
    MLFLOW_TRACKING_URI (set with monkeypatch) is the one used."""
    yield
    import sys

    if "mlflow" in sys.modules:
        from mlflow.tracking._model_registry import utils as registry_utils
        from mlflow.tracking._tracking_service import utils as tracking_utils

        tracking_utils._tracking_uri = None
        registry_utils._registry_uri = None


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from vlpipe.model.tokenizer import default_corpus, train_bpe_tokenizer

    return train_bpe_tokenizer(default_corpus(), vocab_size=400)


@pytest.fixture(scope="session")
def tiny_preset():
    from vlpipe.model.presets import get_preset

    return get_preset("tiny")


@pytest.fixture()
def tiny_model(tiny_preset, tiny_tokenizer):
    from vlpipe.model.build import build_model

    return build_model(tiny_preset, tiny_tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_image_cfg(tiny_preset):
    from vlpipe.model.init import image_config_for

    return image_config_for(tiny_preset)


@pytest.fixture()
def s3_server(monkeypatch):
    """A moto S3 server on 127.0.0.1 (free port) with dummy credentials; yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    # Port 0: the server binds a free port itself (a port probed here and bound later can be taken meanwhile, and
    # then start() would wait for ever).
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = "http://{}:{}".format(*server.get_host_and_port())
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield endpoint
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        # Threaded moto servers share one in-process backend: reset it, or buckets leak into the next test.
        import urllib.request

        urllib.request.urlopen(
            urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10
        )
        server.stop()
