"""The KServe predictor over HTTP: V1 and V2 answers equal direct generation, health, metrics, bad input, and
loading from an MLflow `models:/name@alias` URI. The server runs on a thread on 127.0.0.1 (a free port)."""

from __future__ import annotations

import base64
import io
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pytest
import typer
from mlflow import MlflowClient
from PIL import Image

from tests.servers import wait_until_ready
from vlpipe.model.checkpoint import load_checkpoint
from vlpipe.model.conversation import ConversationEncoder
from vlpipe.model.generate import generate
from vlpipe.model.image import decode_image, process_image
from vlpipe.model.init import init_random
from vlpipe.model.tokenizer import IM_END
from vlpipe.serving.cli import serve_command
from vlpipe.serving.limits import ServingLimits
from vlpipe.serving.predictor import VLPipeModel, VLPipeModelServer, resolve_checkpoint, serve_in_background
from vlpipe.serving.pyfunc import log_checkpoint_model

# KServe's V1 route builds FastAPI's deprecated ORJSONResponse itself.
pytestmark = pytest.mark.filterwarnings("ignore:ORJSONResponse is deprecated")
QUESTION = "How many red shapes are there?"
TEXT_PROMPT = "Count from one to three."
V2PE_DELTA = 0.25  # not 1, so answers only match when serving applies the checkpoint's δ
LIMITS = ServingLimits(
    max_body_bytes=256 * 1024,
    max_images=2,
    max_image_pixels=128 * 128,
    max_tokens=32,
    default_max_tokens=8,
    max_n=3,
    max_best_of=4,
    max_batch=3,
    max_messages=8,
)


def _png(width: int, height: int, seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return init_random("tiny", str(tmp_path_factory.mktemp("policy") / "ckpt"), seed=0, v2pe_delta=V2PE_DELTA)


@pytest.fixture(scope="module")
def model(checkpoint) -> VLPipeModel:
    served = VLPipeModel("vlpipe", checkpoint, limits=LIMITS, device="cpu", dtype="float32")
    served.load()
    return served


@pytest.fixture(scope="module")
def http(model):
    with serve_in_background(model, startup_timeout_s=60) as url, httpx.Client(base_url=url, timeout=60) as c:
        yield c


def _direct(
    checkpoint: str, rows: list[tuple[str, bytes | None]], **kwargs
) -> tuple[list[list[int]], list[str]]:
    """Generation without serving code: encode each row as training does, then `vlpipe.model.generate.generate`."""
    loaded = load_checkpoint(checkpoint)
    tok = loaded.tokenizer
    encoder = ConversationEncoder(tok, loaded.tokens_per_tile, max_length=4096, mode="sft")
    samples = []
    for i, (prompt, png) in enumerate(rows):
        record: dict = {"id": str(i), "conversations": [{"from": "human", "value": prompt}]}
        tiles, pixels = [], None
        if png is not None:
            pixels = process_image(decode_image(png, source=str(i)), loaded.image_cfg)
            tiles = [pixels.shape[0]]
            record["image"] = "image.png"
            record["conversations"][0]["value"] = f"<image>\n{prompt}"
        samples.append(
            encoder.encode(
                record, tiles, pixel_values=pixels, v2pe_deltas=loaded.v2pe_delta, add_generation_prompt=True
            )
        )
    ids = generate(
        loaded.model,
        samples,
        eos_token_id=tok.convert_tokens_to_ids(IM_END),
        pad_token_id=tok.pad_token_id,
        **kwargs,
    )
    return ids, [tok.decode(row, skip_special_tokens=True) for row in ids]


def _tokens_metric(http: httpx.Client) -> float:
    text = http.get("/metrics").text
    match = re.search(r'^vlpipe_generated_tokens_total\{model="vlpipe"\} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_v1_predict_equals_direct_generation(checkpoint, http):
    png = _png(64, 32)  # tiny tiles are 32 px: a 2x1 grid plus a thumbnail
    body = {
        "instances": [{"prompt": QUESTION, "image": _b64(png)}, {"prompt": TEXT_PROMPT}],
        "parameters": {"max_new_tokens": 12, "temperature": 0.0},
    }
    response = http.post("/v1/models/vlpipe:predict", json=body)
    assert response.status_code == 200, response.text
    ids, expected = _direct(checkpoint, [(QUESTION, png), (TEXT_PROMPT, None)], max_new_tokens=12)
    assert all(ids)  # non-empty answers, so the comparison says something
    assert response.json() == {"predictions": expected}
    # One row alone: the same as generating that prompt alone (no batch padding involved).
    response = http.post("/v1/models/vlpipe:predict", json={"instances": [{"prompt": TEXT_PROMPT}]})
    default = LIMITS.default_max_tokens  # no max_new_tokens: the server's default length
    assert (
        response.json()["predictions"]
        == _direct(checkpoint, [(TEXT_PROMPT, None)], max_new_tokens=default)[1]
    )


def test_v2_infer_equals_direct_generation(checkpoint, http):
    png = _png(32, 32, seed=1)
    body = {
        "id": "req-1",
        "inputs": [
            {"name": "prompt", "shape": [2], "datatype": "BYTES", "data": [QUESTION, TEXT_PROMPT]},
            {"name": "image", "shape": [2], "datatype": "BYTES", "data": [_b64(png), ""]},
        ],
        "parameters": {"max_new_tokens": 10},
    }
    response = http.post("/v2/models/vlpipe/infer", json=body)
    assert response.status_code == 200, response.text
    _, expected = _direct(checkpoint, [(QUESTION, png), (TEXT_PROMPT, None)], max_new_tokens=10)
    out = response.json()
    assert out["model_name"] == "vlpipe" and out["id"] == "req-1"
    assert out["outputs"] == [
        {"name": "text", "shape": [2], "datatype": "BYTES", "parameters": None, "data": expected}
    ]
    # Without the optional image input, and with a [B, 1] shape.
    body = {"inputs": [{"name": "prompt", "shape": [1, 1], "datatype": "BYTES", "data": [TEXT_PROMPT]}]}
    response = http.post("/v2/models/vlpipe/infer", json=body | {"parameters": {"max_new_tokens": 10}})
    assert response.json()["outputs"][0]["data"] == expected[1:]


def test_health_readiness_and_metadata_routes(http):
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}
    assert http.get("/v2/models/vlpipe/ready").json() == {"name": "vlpipe", "ready": True}
    assert http.get("/v1/models/vlpipe").json() == {"name": "vlpipe", "ready": True}
    assert http.get("/v1/models").json() == {"models": ["vlpipe"]}
    assert http.get("/v2/models/other/ready").status_code == 404
    assert http.get("/openai/v1/models").json()["data"][0]["id"] == "vlpipe"


def test_metrics_count_generated_tokens(checkpoint, http):
    before = _tokens_metric(http)
    body = {"instances": [{"prompt": TEXT_PROMPT}, {"prompt": QUESTION}], "parameters": {"max_new_tokens": 7}}
    assert http.post("/v1/models/vlpipe:predict", json=body).status_code == 200
    ids, _ = _direct(checkpoint, [(TEXT_PROMPT, None), (QUESTION, None)], max_new_tokens=7)
    assert _tokens_metric(http) - before == sum(len(row) for row in ids) > 0
    metrics = http.get("/metrics").text
    assert "# TYPE vlpipe_generated_tokens_total counter" in metrics
    assert "request_predict_seconds" in metrics  # KServe's own histograms are on the same endpoint


def _v2(prompts: list[str], images: list[str] | None = None, **params) -> dict:
    inputs = [{"name": "prompt", "shape": [len(prompts)], "datatype": "BYTES", "data": prompts}]
    if images is not None:
        inputs.append({"name": "image", "shape": [len(images)], "datatype": "BYTES", "data": images})
    return {"inputs": inputs, "parameters": params}


BAD_REQUESTS = [
    ("v1-bad-base64", "/v1/models/vlpipe:predict", {"instances": [{"prompt": "x", "image": "!!"}]}, 400,
     "not valid base64"),
    ("v1-not-an-image", "/v1/models/vlpipe:predict",
     {"instances": [{"prompt": "x", "image": _b64(b"plain text, not an image")}]}, 400, "corrupt_image"),
    ("v1-too-many-images", "/v1/models/vlpipe:predict",
     {"instances": [{"prompt": "x", "image": _b64(_png(8, 8))}] * 3}, 400, "above the server's cap"),
    ("v1-too-many-rows", "/v1/models/vlpipe:predict", {"instances": [{"prompt": "x"}] * 4}, 400,
     "4 rows, above the server's cap of 3"),
    ("v1-pixel-cap", "/v1/models/vlpipe:predict",
     {"instances": [{"prompt": "x", "image": _b64(_png(200, 100))}]}, 413, "image_too_large"),
    ("v1-data-url-not-base64", "/v1/models/vlpipe:predict",
     {"instances": [{"prompt": "x", "image": "data:image/png,raw"}]}, 400, "must be base64-encoded"),
    ("v1-max-tokens-cap", "/v1/models/vlpipe:predict",
     {"instances": [{"prompt": "x"}], "parameters": {"max_new_tokens": 33}}, 400, "above the server's cap of 32"),
    ("v1-unknown-param", "/v1/models/vlpipe:predict",
     {"instances": [{"prompt": "x"}], "parameters": {"beams": 2}}, 400, "unknown params"),
    ("v1-no-instances", "/v1/models/vlpipe:predict", {"inputs": "x"}, 400, "needs \"instances\""),
    ("v1-missing-prompt", "/v1/models/vlpipe:predict", {"instances": [{"image": None}]}, 400, "'prompt' is missing"),
    ("v1-unknown-model", "/v1/models/nope:predict", {"instances": [{"prompt": "x"}]}, 404, "nope"),
    ("v2-unknown-model", "/v2/models/nope/infer", _v2(["x"]), 404, "nope"),
    ("v2-no-prompt", "/v2/models/vlpipe/infer",
     {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}, 400, "'prompt'"),
    ("v2-wrong-dtype", "/v2/models/vlpipe/infer",
     {"inputs": [{"name": "prompt", "shape": [1], "datatype": "INT32", "data": [1]}]}, 400, "BYTES"),
    ("v2-length-mismatch", "/v2/models/vlpipe/infer", _v2(["x", "y"], [""]), 400, "same length"),
    ("v2-bad-base64", "/v2/models/vlpipe/infer", _v2(["x"], ["%%%"]), 400, "not valid base64"),
    ("v2-pixel-cap", "/v2/models/vlpipe/infer", _v2(["x"], [_b64(_png(129, 128))]), 413, "image_too_large"),
    ("v2-max-tokens-cap", "/v2/models/vlpipe/infer", _v2(["x"], max_new_tokens=100), 400, "cap of 32"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "status", "match"), [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_requests_get_4xx_and_the_server_keeps_serving(http, path, body, status, match):
    response = http.post(path, json=body)
    assert response.status_code == status, response.text
    assert match in response.json()["error"]
    assert http.post("/v1/models/vlpipe:predict", json={"instances": [{"prompt": "x"}]}).status_code == 200
    assert http.get("/v2/health/ready").json() == {"ready": True}


def test_decompression_bomb_is_refused_before_decoding(http):
    # 4000 x 4000 grey pixels compress to a few kB; the pixel cap is read from the header, never decoded.
    buffer = io.BytesIO()
    Image.new("L", (4000, 4000)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < LIMITS.max_body_bytes // 4
    body = {"instances": [{"prompt": "x", "image": _b64(buffer.getvalue())}]}
    response = http.post("/v1/models/vlpipe:predict", json=body)
    assert response.status_code == 413
    assert "4000x4000 = 16000000 pixels, above the cap of 16384" in response.json()["error"]


def test_body_over_the_cap_is_413(http):
    big = {"instances": [{"prompt": "x" * LIMITS.max_body_bytes}]}
    response = http.post("/v1/models/vlpipe:predict", json=big)
    assert response.status_code == 413
    assert "above the server's cap of 262144 bytes" in response.json()["error"]

    def chunks():  # no Content-Length: the middleware counts the streamed body
        for _ in range(8):
            yield b"x" * (LIMITS.max_body_bytes // 4)

    response = http.post(
        "/v2/models/vlpipe/infer", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert http.get("/v2/health/live").json() == {"live": True}


def test_two_servers_in_one_process_on_chosen_ports(model):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with serve_in_background(model, port=port) as first, serve_in_background(model) as second:
        assert first == f"http://127.0.0.1:{port}" and second != first
        for url in (first, second):
            assert httpx.get(f"{url}/v2/health/live", timeout=10).json() == {"live": True}
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{first}/v2/health/live", timeout=2)


def test_concurrent_requests_all_succeed(http):
    statuses: list[int] = []

    def client() -> None:
        for _ in range(2):
            body = {"instances": [{"prompt": TEXT_PROMPT}], "parameters": {"max_new_tokens": 4}}
            statuses.append(http.post("/v1/models/vlpipe:predict", json=body).status_code)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert statuses == [200] * 12


def test_resolve_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_checkpoint(str(tmp_path / "empty"))
    (tmp_path / "sklearn").mkdir()
    (tmp_path / "sklearn" / "MLmodel").write_text("flavors:\n  python_function:\n    loader_module: x\n")
    with pytest.raises(ValueError, match="without a 'checkpoint' artifact"):
        resolve_checkpoint(str(tmp_path / "sklearn"))


@pytest.mark.slow
def test_loads_from_an_mlflow_alias(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)  # the default artifact root lands in tmp_path
    with mlflow.start_run():
        info = log_checkpoint_model(checkpoint, registered_model_name="vlpipe-tiny")
    MlflowClient().set_registered_model_alias("vlpipe-tiny", "champion", info.registered_model_version)
    for uri in ("models:/vlpipe-tiny@champion", "models:/vlpipe-tiny/1"):
        local = resolve_checkpoint(uri, cache_dir=tmp_path / "cache")
        assert (tmp_path / "cache") in Path(local).parents
        assert load_checkpoint(local).v2pe_delta == V2PE_DELTA
    served = VLPipeModel("tiny", "models:/vlpipe-tiny@champion", device="cpu")
    served.load()
    png = _png(64, 32)
    rows = [{"prompt": QUESTION, "image": _b64(png)}, {"prompt": TEXT_PROMPT}]
    _, expected = _direct(checkpoint, [(QUESTION, png), (TEXT_PROMPT, None)], max_new_tokens=9)
    assert served.answer_rows(rows, {"max_new_tokens": 9}) == expected
    with pytest.raises(mlflow.exceptions.MlflowException):
        resolve_checkpoint("models:/vlpipe-tiny@missing", cache_dir=tmp_path / "cache")


def test_serve_command_loads_and_starts(checkpoint, monkeypatch):
    started = {}

    def fake_start(self, models):
        started.update(host=self.host, port=self.http_port, names=[m.name for m in models])
        started["ready"] = all(m.ready for m in models)

    monkeypatch.setattr(VLPipeModelServer, "start", fake_start)
    serve_command(checkpoint, port=9123, name="tiny", host="127.0.0.1")
    assert started == {"host": "127.0.0.1", "port": 9123, "names": ["tiny"], "ready": True}
    with pytest.raises(typer.Exit) as exc:
        serve_command("/does/not/exist")
    assert exc.value.exit_code == 2


def test_model_rejects_unloaded_use():
    model = VLPipeModel("cold", "/nowhere")
    with pytest.raises(RuntimeError, match="before load"):
        _ = model.loaded
    assert not model.ready


@pytest.mark.slow
def test_serve_command_serves_in_a_subprocess_until_sigterm(checkpoint, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = f"from vlpipe.serving.cli import serve_command; serve_command({checkpoint!r}, port={port}, name='tiny')"
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-c", code], cwd=Path(__file__).parents[2], stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(f"{url}/v2/models/tiny/ready", process, tmp_path / "server.log", timeout_s=120)
        body = {"messages": [{"role": "user", "content": TEXT_PROMPT}], "max_tokens": 4, "temperature": 0}
        assert httpx.post(f"{url}/openai/v1/chat/completions", json=body, timeout=30).status_code == 200
        process.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught.
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    assert "Shutting down" in (tmp_path / "server.log").read_text()
