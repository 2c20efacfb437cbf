"""The MLflow pyfunc model: logged checkpoint → loaded pyfunc → answers equal to direct V2PE generation."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image

from vlpipe.model.checkpoint import load_checkpoint
from vlpipe.model.conversation import ConversationEncoder, EncodedSample
from vlpipe.model.generate import generate
from vlpipe.model.image import decode_image, process_image
from vlpipe.model.init import init_random
from vlpipe.model.tokenizer import IM_END
from vlpipe.serving.pyfunc import (
    SERVING_PACKAGES,
    VLPipePyfunc,
    decode_image_field,
    generation_settings,
    log_checkpoint_model,
)

QUESTION = "How many red shapes are there?"
TEXT_PROMPT = "Count from one to three."
V2PE_DELTA = 0.25  # not 1, so that generation only matches when serving applies the checkpoint's δ


def _png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("ckpt") / "ckpt"
    return init_random("tiny", str(out), seed=0, v2pe_delta=V2PE_DELTA)


@pytest.fixture(scope="module")
def logged(checkpoint, tmp_path_factory):
    """The checkpoint logged in a run of a throwaway sqlite tracking store, and its loaded pyfunc."""
    tmp = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
        mp.chdir(tmp)  # the default artifact root (./mlruns) lands in tmp
        with mlflow.start_run():
            info = log_checkpoint_model(checkpoint, metadata={"purpose": "test"})
        yield info, mlflow.pyfunc.load_model(info.model_uri), tmp


def _direct(
    checkpoint: str, rows: list[tuple[str, bytes | None]], **kwargs
) -> tuple[list[EncodedSample], list[list[int]], list[str]]:
    """Generation on the checkpoint without serving code: the training path spelled out step by step."""
    loaded = load_checkpoint(checkpoint)
    tok = loaded.tokenizer
    encoder = ConversationEncoder(tok, loaded.tokens_per_tile, max_length=4096, mode="sft")
    samples = []
    for i, (prompt, png) in enumerate(rows):
        record = {"id": str(i), "conversations": [{"from": "human", "value": prompt}]}
        if png is None:
            samples.append(
                encoder.encode(record, [], v2pe_deltas=loaded.v2pe_delta, add_generation_prompt=True)
            )
            continue
        pixels = process_image(decode_image(png, source=str(i)), loaded.image_cfg)
        record["image"] = "image.png"
        record["conversations"][0]["value"] = f"<image>\n{prompt}"
        samples.append(
            encoder.encode(
                record,
                [pixels.shape[0]],
                pixel_values=pixels,
                v2pe_deltas=loaded.v2pe_delta,
                add_generation_prompt=True,
            )
        )
    ids = generate(
        loaded.model,
        samples,
        eos_token_id=tok.convert_tokens_to_ids(IM_END),
        pad_token_id=tok.pad_token_id,
        **kwargs,
    )
    return samples, ids, [tok.decode(row, skip_special_tokens=True) for row in ids]


def test_predict_equals_direct_generation(checkpoint, logged):
    _, model, _ = logged
    png = _png(64, 32)
    # tiny tiles are 32 px: a 64x32 image is a 2x1 grid, so 2 tiles + 1 thumbnail.
    assert process_image(Image.open(io.BytesIO(png)), load_checkpoint(checkpoint).image_cfg).shape[0] == 3
    frame = pd.DataFrame([{"prompt": QUESTION, "image": _b64(png)}, {"prompt": TEXT_PROMPT, "image": None}])
    got = model.predict(frame, params={"max_new_tokens": 12, "temperature": 0.0})

    samples, ids, expected = _direct(checkpoint, [(QUESTION, png), (TEXT_PROMPT, None)], max_new_tokens=12)
    assert all(len(row) > 0 for row in ids)  # non-empty answers, so the comparison says something
    assert got == expected
    # What the model sees is the training encoding: same ids, same V2PE positions, same tiles.
    served = model.unwrap_python_model().encode(frame)
    for mine, theirs in zip(served, samples, strict=True):
        assert torch.equal(mine.input_ids, theirs.input_ids)
        assert torch.equal(mine.position_ids, theirs.position_ids)
        assert (mine.pixel_values is None) == (theirs.pixel_values is None)
        if mine.pixel_values is not None:
            assert torch.equal(mine.pixel_values, theirs.pixel_values)
    # 3 tiles x 4 tokens per tile at δ = 0.25: visual positions step by 0.25, so V2PE really is applied.
    visual = served[0].position_ids[served[0].input_ids == model.unwrap_python_model().loaded.image_token_id]
    assert visual.numel() == 12 and torch.allclose(visual.diff(), torch.full((11,), V2PE_DELTA))

    # A data URL, a prompt that already has <image>, list-of-dicts input and a missing image key: same answers.
    rows = [
        {"prompt": f"<image>\n{QUESTION}", "image": f"data:image/png;base64,{_b64(png)}"},
        {"prompt": TEXT_PROMPT},
    ]
    assert model.predict(rows, params={"max_new_tokens": 12}) == expected


def test_sampling_is_reproducible_with_a_seed(checkpoint, logged):
    _, model, _ = logged
    frame = pd.DataFrame([{"prompt": TEXT_PROMPT}, {"prompt": QUESTION, "image": _b64(_png(32, 32))}])
    params = {"max_new_tokens": 10, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    first = model.predict(frame, params=params)
    assert model.predict(frame, params=params) == first
    _, _, expected = _direct(
        checkpoint,
        [(TEXT_PROMPT, None), (QUESTION, _png(32, 32))],
        max_new_tokens=10,
        do_sample=True,
        temperature=1.0,
        top_p=0.9,
        seed=7,
    )
    assert first == expected


def test_bad_rows_raise_value_errors_naming_the_row(logged):
    _, model, _ = logged
    good = {"prompt": QUESTION, "image": _b64(_png(32, 32))}
    with pytest.raises(ValueError, match=r"row 1: 'image' is not valid base64"):
        model.predict(pd.DataFrame([good, {"prompt": QUESTION, "image": "not base64 !!"}]))
    with pytest.raises(ValueError, match=r"row 0: corrupt_image"):
        model.predict(pd.DataFrame([{"prompt": QUESTION, "image": _b64(b"definitely not a png")}]))
    with pytest.raises(ValueError, match=r"row 0: 'image' data URL must be base64"):
        model.predict(pd.DataFrame([{"prompt": QUESTION, "image": "data:image/png,rawbytes"}]))
    with pytest.raises(ValueError, match=r"row 1: image_count_mismatch"):
        model.predict(pd.DataFrame([good, {"prompt": "<image>\nWhat is this?", "image": None}]))
    # MLflow's schema check rejects a missing required column before predict; the model checks rows itself too.
    python_model = model.unwrap_python_model()
    with pytest.raises(ValueError, match=r"row 1: 'prompt' is missing"):
        python_model.predict(None, [good, {"prompt": None, "image": good["image"]}])
    with pytest.raises(ValueError, match=r"row 0: 'prompt' is int, not a string"):
        python_model.predict(None, pd.DataFrame([{"prompt": 3}]))
    with pytest.raises(ValueError, match=r"input has no 'prompt' column"):
        python_model.predict(None, pd.DataFrame([{"question": QUESTION}]))
    with pytest.raises(ValueError, match=r"max_new_tokens must be at least 1"):
        python_model.predict(None, [good], params={"max_new_tokens": 0})


def test_max_pixels_cap(logged):
    info, _, _ = logged
    capped = mlflow.pyfunc.load_model(info.model_uri, model_config={"max_pixels": 32 * 32})
    frame = pd.DataFrame([{"prompt": QUESTION, "image": _b64(_png(32, 32))}])
    assert len(capped.predict(frame, params={"max_new_tokens": 2})) == 1
    with pytest.raises(ValueError, match=r"row 1: image_too_large: image is 64x32 = 2048 pixels"):
        capped.predict(pd.concat([frame, pd.DataFrame([{"prompt": QUESTION, "image": _b64(_png(64, 32))}])]))


def test_logged_model_layout(checkpoint, logged):
    info, model, tmp = logged
    assert type(model.unwrap_python_model()) is VLPipePyfunc  # pickled by reference, not by value
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp / "download")))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    ckpt = local / mlmodel["flavors"]["python_function"]["artifacts"]["checkpoint"]["path"]
    assert (ckpt / "config.json").is_file() and (ckpt / "vlpipe.json").is_file()
    assert mlmodel["metadata"] == {
        "vlpipe_checkpoint": checkpoint,
        "preset": "tiny",
        "stage": "init",
        "v2pe_delta": V2PE_DELTA,
        "purpose": "test",
    }
    requirements = (local / "requirements.txt").read_text().split()
    pinned = {line.split("==")[0] for line in requirements}
    assert set(SERVING_PACKAGES) <= pinned and "vlpipe" not in pinned
    assert all("+" not in line for line in requirements)  # no local labels such as torch's +cpu
    assert (local / "serving_input_example.json").is_file()
    signature = info.signature
    assert [c.name for c in signature.inputs.inputs] == ["prompt", "image"]
    assert [c.required for c in signature.inputs.inputs] == [True, False]
    assert {p.name: p.default for p in signature.params.params} == {
        "max_new_tokens": 64,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": None,
    }


def test_registering_creates_a_model_version(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    with mlflow.start_run() as run:
        info = log_checkpoint_model(checkpoint, name="answerer", registered_model_name="vlpipe-tiny")
    assert info.registered_model_version == 1
    versions = MlflowClient().search_model_versions("name='vlpipe-tiny'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", run.info.run_id)]
    assert mlflow.pyfunc.load_model("models:/vlpipe-tiny/1").predict(
        pd.DataFrame([{"prompt": TEXT_PROMPT}]), params={"max_new_tokens": 3}
    ) == mlflow.pyfunc.load_model(info.model_uri).predict(
        pd.DataFrame([{"prompt": TEXT_PROMPT}]), params={"max_new_tokens": 3}
    )


def test_log_needs_an_active_run_and_a_checkpoint(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="mlflow.start_run"):
        log_checkpoint_model(checkpoint)
    (tmp_path / "empty").mkdir()
    with mlflow.start_run(), pytest.raises(FileNotFoundError, match="config.json"):
        log_checkpoint_model(str(tmp_path / "empty"))


def test_generation_settings():
    assert generation_settings(None) == {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0, "seed": None}
    assert generation_settings({"max_new_tokens": 5, "seed": 3, "top_p": None})["top_p"] == 1.0
    assert generation_settings({"temperature": 1, "seed": -1})["temperature"] == 1.0  # an int is a number
    for bad, match in [
        ({"beams": 2}, "unknown params"),
        ({"temperature": -0.1}, "temperature must be 0 .greedy. or between 0.001 and 2.0"),
        ({"temperature": 1e-45}, "temperature must be 0"),  # logits / 1e-45 overflow to inf
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"max_new_tokens": "many"}, "max_new_tokens must be an integer .* not a string"),
        ({"max_new_tokens": "5"}, "not a string"),  # no string-to-number coercion
        ({"max_new_tokens": 1.9}, "not a fractional number"),  # never truncated to 1
        ({"max_new_tokens": float("inf")}, "not a fractional number"),
        ({"max_new_tokens": True}, "not a boolean"),
        ({"seed": 2**64}, "seed must be an integer from"),
        ({"seed": -(2**70)}, "seed must be an integer from"),
        ({"temperature": "0.5"}, "temperature must be a number, not a string"),
    ]:
        with pytest.raises(ValueError, match=match) as exc:
            generation_settings(bad)
        assert repr(next(iter(bad.values()))) not in str(exc.value)  # the value sent is not echoed


def test_decode_image_field():
    png = _png(8, 8)
    assert decode_image_field(_b64(png), "row 0") == png
    wrapped = "\n".join(_b64(png)[i : i + 20] for i in range(0, len(_b64(png)), 20))  # MIME-style lines
    assert decode_image_field(f"DATA:image/png;base64,{wrapped}", "row 0") == png
    assert decode_image_field(png, "row 0") == png
    with pytest.raises(ValueError, match="row 2: 'image' must be a base64 string, got int"):
        decode_image_field(3, "row 2")
    with pytest.raises(ValueError, match="row 4: 'image' decodes to no bytes"):
        decode_image_field("data:image/png;base64,", "row 4")
    with pytest.raises(ValueError, match="row 5: 'image' data URL must have an image media type"):
        decode_image_field(f"data:text/plain;base64,{_b64(png)}", "row 5")


def test_log_from_s3_localizes_first(checkpoint, s3_server, tmp_path, monkeypatch):
    import boto3

    from vlpipe.model.storage import upload_dir

    monkeypatch.setenv("VLPIPE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="models")
    upload_dir(checkpoint, "s3://models/tiny/final")
    with mlflow.start_run():
        info = log_checkpoint_model("s3://models/tiny/final")
    assert info.metadata["vlpipe_checkpoint"] == "s3://models/tiny/final"
    frame = pd.DataFrame([{"prompt": TEXT_PROMPT}])
    _, _, expected = _direct(checkpoint, [(TEXT_PROMPT, None)], max_new_tokens=4)
    assert mlflow.pyfunc.load_model(info.model_uri).predict(frame, params={"max_new_tokens": 4}) == expected


def test_module_import_is_light():
    # Pipeline components import this module to log models; torch and transformers load only with a model.
    code = (
        "import sys, vlpipe.serving.pyfunc; assert not {'torch', 'transformers', 'model'} & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
