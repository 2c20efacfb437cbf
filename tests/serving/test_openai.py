"""OpenAI-compatible chat over HTTP: answers equal direct generation (text, images, multi-turn), sampling with a
seed, Best-of-N with the PRM, streaming, bad input (4xx, the server keeps serving), and the tokens counter."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.prompts import encode_turns
from vlpipe.model.checkpoint import load_checkpoint
from vlpipe.model.generate import generate
from vlpipe.model.image import decode_image, process_image
from vlpipe.model.init import init_random
from vlpipe.model.tokenizer import IM_END
from vlpipe.serving.limits import RequestRejected, ServingLimits
from vlpipe.serving.openai_api import ChatSettings, Conversation
from vlpipe.serving.predictor import VLPipeModel, serve_in_background
from vlpipe.serving.scoring import PRMScorer

QUESTION = "How many red shapes are there?"
V2PE_DELTA = 0.25
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
CHAT = "/openai/v1/chat/completions"


def _png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": _data_url(data)}}


def _user(text: str, *images: bytes) -> dict:
    return {"role": "user", "content": [*(_image_part(i) for i in images), {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("ckpts")
    policy = init_random("tiny", str(root / "policy"), seed=0, v2pe_delta=V2PE_DELTA)
    return policy, init_random("tiny", str(root / "prm"), seed=1)


@pytest.fixture(scope="module")
def model(checkpoints) -> VLPipeModel:
    policy, prm = checkpoints
    served = VLPipeModel("vlpipe", policy, prm_uri=prm, limits=LIMITS, device="cpu", dtype="float32")
    served.load()
    return served


@pytest.fixture(scope="module")
def http(model):
    with serve_in_background(model) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


def _encode(loaded, turns: list[tuple[str, str]], images: list[bytes]):
    """The generation prompt of InternVL turns, encoded without serving code."""
    return encode_turns(loaded, turns, images)


def _direct(
    checkpoint: str, turns, images=(), n: int = 1, **kwargs
) -> tuple[object, list[list[int]], list[str]]:
    loaded = load_checkpoint(checkpoint)
    tok = loaded.tokenizer
    prompt = _encode(loaded, list(turns), list(images))
    ids = generate(
        loaded.model,
        [prompt] * n,
        eos_token_id=tok.convert_tokens_to_ids(IM_END),
        pad_token_id=tok.pad_token_id,
        **kwargs,
    )
    return prompt, ids, [tok.decode(row, skip_special_tokens=True) for row in ids]


def _tokens_metric(http: httpx.Client) -> float:
    text = http.get("/metrics").text
    match = re.search(r'^vlpipe_generated_tokens_total\{model="vlpipe"\} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _events(response: httpx.Response) -> list:
    """The data of each server-sent event (`[DONE]` as a string)."""
    assert response.text.endswith("\n\n")
    events = [block.removeprefix("data: ") for block in response.text.strip().split("\n\n")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def test_text_chat_equals_direct_generation(checkpoints, http):
    body = {"model": "vlpipe", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 12,
            "temperature": 0}  # fmt: skip
    response = http.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    prompt, ids, expected = _direct(checkpoints[0], [("human", QUESTION)], max_new_tokens=12)
    assert ids[0]
    out = response.json()
    assert (
        out["object"] == "chat.completion" and out["model"] == "vlpipe" and out["id"].startswith("chatcmpl-")
    )
    assert out["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": expected[0]},
            "finish_reason": "length" if len(ids[0]) == 12 else "stop",
        }
    ]
    assert out["usage"] == {
        "prompt_tokens": len(prompt),
        "completion_tokens": len(ids[0]),
        "total_tokens": len(prompt) + len(ids[0]),
    }


def test_image_chat_equals_direct_generation(checkpoints, http):
    png = _png(64, 32)  # 2 tiles + thumbnail at the tiny preset's 32 px
    body = {"messages": [_user(QUESTION, png)], "max_tokens": 10, "temperature": 0}  # `model` may be omitted
    response = http.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    prompt, _, expected = _direct(
        checkpoints[0], [("human", f"<image>\n{QUESTION}")], [png], max_new_tokens=10
    )
    assert prompt.num_tiles == [3]
    assert response.json()["choices"][0]["message"]["content"] == expected[0]


def test_multi_turn_maps_roles_to_internvl_turns(checkpoints, http):
    first, second = _png(32, 32, seed=1), _png(48, 32, seed=2)
    messages = [
        {"role": "system", "content": "You count shapes."},
        _user("What is in the picture?", first),
        {"role": "assistant", "content": [{"type": "text", "text": "Shapes."}]},
        {"role": "user", "content": [{"type": "text", "text": "And here?"}, _image_part(second)]},
    ]
    response = http.post(CHAT, json={"messages": messages, "max_tokens": 10, "temperature": 0})
    assert response.status_code == 200, response.text
    turns = [
        ("system", "You count shapes."),
        ("human", "<image>\nWhat is in the picture?"),
        ("gpt", "Shapes."),
        ("human", "And here?\n<image>"),
    ]
    _, _, expected = _direct(checkpoints[0], turns, [first, second], max_new_tokens=10)
    assert response.json()["choices"][0]["message"]["content"] == expected[0]


def test_sampling_n_answers_is_reproducible_with_a_seed(checkpoints, http):
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8, "n": 3, "temperature": 1.0,
            "top_p": 0.9, "seed": 5}  # fmt: skip
    first = http.post(CHAT, json=body).json()
    assert http.post(CHAT, json=body).json()["choices"] == first["choices"]
    _, ids, expected = _direct(
        checkpoints[0], [("human", QUESTION)], n=3, max_new_tokens=8, do_sample=True, temperature=1.0,
        top_p=0.9, seed=5,
    )  # fmt: skip
    assert [c["message"]["content"] for c in first["choices"]] == expected
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert first["usage"]["completion_tokens"] == sum(len(row) for row in ids)


def test_best_of_returns_the_answers_the_prm_scores_highest(checkpoints, http):
    policy, prm_path = checkpoints
    png = _png(64, 32, seed=3)
    body = {"messages": [_user(QUESTION, png)], "max_tokens": 12, "temperature": 1.0, "seed": 11, "best_of": 4,
            "n": 2}  # fmt: skip
    before = _tokens_metric(http)
    out = http.post(CHAT, json=body).json()
    # Spelled out: sample 4 answers, score each with the PRM in one forward pass, keep the best 2.
    _, ids, texts = _direct(
        policy, [("human", f"<image>\n{QUESTION}")], [png], n=4, max_new_tokens=12, do_sample=True,
        temperature=1.0, seed=11,
    )  # fmt: skip
    prm = load_checkpoint(prm_path)
    pixels = process_image(decode_image(png, source="q"), prm.image_cfg)
    scores = [
        s.score
        for s in PRMScorer(prm, "mean").score_answers(
            f"<image>\n{QUESTION}", texts, [pixels.shape[0]], pixels
        )
    ]
    order = sorted(
        range(4), key=lambda i: (math.isnan(scores[i]), -scores[i] if not math.isnan(scores[i]) else 0)
    )
    assert [c["message"]["content"] for c in out["choices"]] == [texts[i] for i in order[:2]]
    for choice, i in zip(out["choices"], order[:2], strict=True):
        assert choice["prm_score"] == pytest.approx(scores[i], abs=1e-6)
    assert out["choices"][0]["prm_score"] >= out["choices"][1]["prm_score"]
    # Every sampled answer counts, in the usage and in the tokens metric.
    assert out["usage"]["completion_tokens"] == sum(len(row) for row in ids)
    assert _tokens_metric(http) - before == sum(len(row) for row in ids)


def test_streaming_sends_the_same_answer_in_chunks(http):
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 12, "temperature": 0}
    whole = http.post(CHAT, json=body).json()["choices"][0]
    response = http.post(CHAT, json=body | {"stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = _events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len(chunks) > 3  # role, several content pieces, finish
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [
        whole["finish_reason"]
    ]
    # Streaming with best_of and n: every choice streams in turn, its PRM score on its last chunk.
    best = body | {"stream": True, "best_of": 3, "n": 2, "temperature": 1.0, "seed": 2}
    chunks = _events(http.post(CHAT, json=best))[:-1]
    finals = [c["choices"][0] for c in chunks if c["choices"][0]["finish_reason"] is not None]
    assert [f["index"] for f in finals] == [0, 1] and all("prm_score" in f for f in finals)


def test_text_pieces_join_to_the_decoded_answer(model):
    ids = list(range(3, 40)) + [model.loaded.tokenizer.convert_tokens_to_ids("a")]
    assert "".join(model.text_pieces(ids)) == model.decode(ids)
    assert model.text_pieces([]) == []


def _bad(messages=None, **fields) -> dict:
    return {"messages": messages or [{"role": "user", "content": "hi"}], "max_tokens": 4} | fields


BAD_REQUESTS = [
    ("remote-url", _bad([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]}]),
     400, "remote image URLs are not fetched"),
    ("file-url", _bad([{"role": "user", "content": [{"type": "image_url", "image_url": "file:///etc/passwd"}]}]),
     400, "must be a base64 data URL"),
    ("bad-base64", _bad([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]),
     400, "not valid base64"),
    ("not-an-image", _bad([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(b"text!")}}]}]),
     400, "corrupt_image"),
    ("too-many-images", _bad([_user("hi", _png(8, 8), _png(8, 8), _png(8, 8))]), 400, "3 images in the request"),
    ("pixel-cap", _bad([_user("hi", _png(200, 100))]), 413, "image_too_large"),
    ("max-tokens-cap", _bad(max_tokens=33), 400, "max_tokens 33 is above the server's cap of 32"),
    ("max-completion-tokens-cap", _bad(max_completion_tokens=40), 400, "max_tokens 40"),
    ("n-cap", _bad(n=4), 400, "n 4 is above the server's cap of 3"),
    ("best-of-cap", _bad(best_of=5), 400, "best_of 5 is above the server's cap of 4"),
    ("best-of-below-n", _bad(best_of=2, n=3), 400, "best_of (2) must be at least n (3)"),
    ("unknown-model", _bad(model="gpt-4o"), 404, "'gpt-4o' is not served here"),
    ("ends-with-assistant", _bad([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]),
     400, "end the conversation with a user message"),
    ("image-in-assistant", _bad([{"role": "assistant", "content": [_image_part(_png(8, 8))]}, {"role": "user", "content": "hi"}]),
     400, "images belong in user messages"),
    ("too-many-messages", _bad([{"role": "user", "content": "hi"}] * 9), 400, "9 messages"),
    ("prompt-too-long", _bad([{"role": "user", "content": " ".join(str(i) for i in range(3000))}]), 400,
     "too_long"),
    ("placeholder-mismatch", _bad([{"role": "user", "content": "<image> what?"}]), 400, "image_count_mismatch"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "status", "match"), [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_requests_get_4xx_and_the_server_keeps_serving(http, body, status, match):
    response = http.post(CHAT, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert match in error["message"]
    assert error["code"] == status and error["type"] in (
        "invalid_request_error",
        "not_found_error",
        "request_too_large",
    )
    assert http.post(CHAT, json=_bad()).status_code == 200
    assert http.get("/v2/health/live").json() == {"live": True}


@pytest.mark.parametrize(
    "fields",
    [{"n": 0}, {"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"best_of": 0}, {"messages": []}],
    ids=["n-0", "max-tokens-0", "negative-temperature", "top-p-0", "best-of-0", "no-messages"],
)
def test_out_of_range_fields_are_422(http, fields):
    assert http.post(CHAT, json=_bad() | fields).status_code == 422


def test_body_over_the_cap_is_413_in_openai_format(http):
    big = _bad([{"role": "user", "content": "x" * LIMITS.max_body_bytes}])
    response = http.post(CHAT, json=big)
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "request_too_large"
    assert http.post(CHAT, json=_bad()).status_code == 200


def test_best_of_needs_a_prm(checkpoints):
    plain = VLPipeModel("plain", checkpoints[0], limits=LIMITS, device="cpu")
    plain.load()
    conversation = Conversation((("human", "hi"),))
    with pytest.raises(RequestRejected, match="start the server with --prm-uri") as exc:
        plain.chat_sync(conversation, ChatSettings(max_tokens=4, best_of=2))
    assert exc.value.status_code == 400
    assert len(plain.chat_sync(conversation, ChatSettings(max_tokens=4, n=2)).completions) == 2


def test_concurrent_chat_requests_all_succeed(http):
    statuses: list[int] = []

    def client() -> None:
        for _ in range(2):
            statuses.append(http.post(CHAT, json=_bad(stream=len(statuses) % 2 == 0)).status_code)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert statuses == [200] * 12


@pytest.mark.slow
def test_bench_serving_runs_and_writes_json(tmp_path):
    from vlpipe.serving.bench import bench_serving

    result = bench_serving(
        tmp_path, duration_s=2.0, clients=4, latency_requests=3, max_tokens=4, bad_share=0.5,
        batching_clients=4, batching_requests_per_client=1, batching_rounds=1, stream_requests=1,
        stream_tokens=8, best_of_items=1, best_of_rounds=1,
    )  # fmt: skip
    assert json.loads((tmp_path / "serving.json").read_text()) == result
    latency, load = result["latency"], result["load"]
    assert latency["http"]["p50_ms"] > 0 and latency["in_process"]["p50_ms"] > 0
    assert latency["goal_http_overhead_p50"] == 0.15 and isinstance(latency["meets_goal"], bool)
    assert load["clients"] == 4 and load["errors"] == 0 and load["requests_ok"] > 0 and load["meets_goal"]
    bad = load["bad_requests"]  # a share of hostile requests: each one a 4xx, none a 5xx
    assert bad["sent"] > 0 and bad["answers"] == {"http_4xx": bad["sent"]} and bad["status_5xx"] == 0
    assert result["good_request_errors"] == 0 and result["bad_request_5xx"] == 0
    batching, streaming, best_of = result["batching"], result["streaming"], result["best_of_features_once"]
    assert batching["batched"]["requests_ok"] == batching["one_at_a_time"]["requests_ok"] == 4
    assert result["batching_errors"] == 0 and result["batching_throughput_speedup"] > 0
    assert batching["goal_speedup"] == 4.0 and batching["health_during_load"]["checks"] > 0
    assert streaming["answers"] + streaming["answers_shorter_than_max_tokens"] == 1
    assert best_of["same_samples"] is True and best_of["tiles_per_image"] > 1 and best_of["speedup"] > 0


def test_request_bounds_agree_with_generate():
    from vlpipe.model import generate as gen
    from vlpipe.serving import openai_api

    assert (openai_api.MIN_TEMPERATURE, openai_api.SEED_MIN, openai_api.SEED_MAX) == (
        gen.MIN_TEMPERATURE,
        gen.SEED_MIN,
        gen.SEED_MAX,
    )
