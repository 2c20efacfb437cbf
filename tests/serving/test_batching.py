"""Batched serving over HTTP: concurrent requests generated together give the answers they get alone (greedy and
seeded sampling), streamed chunks arrive while the answer is generated and join to the non-streamed text, a
disconnecting stream frees its rows, a full queue is a 429 with Retry-After, a request past its deadline a 504,
health answers while generation runs, video inputs (vLLM's `video_url`) are sampled as evaluation samples them
and batched with the rest, and the OpenAI Python client and KServe's InferenceRESTClient work.

The served models run in float64, so batch shape cannot flip a greedy token (exact equality, not luck). The
"slow" model sleeps before every forward pass (a slow accelerator, without loading the CPU) so that a request
lasts long enough to be watched."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from vlpipe.model.init import init_random
from vlpipe.serving.limits import ServingLimits
from vlpipe.serving.openai_api import ChatSettings, Conversation
from vlpipe.serving.predictor import VLPipeModel, serve_in_background

CHAT = "/openai/v1/chat/completions"
STEP_S = 0.03  # the slow model's sleep per forward pass
FAST = ServingLimits(
    max_tokens=64, default_max_tokens=8, batch_max_size=8, batch_wait_ms=50, max_n=4, max_video_frames=4,
    max_video_bytes=40_000,
)  # fmt: skip
LONG_TOKENS = 400  # a slow answer of this many tokens lasts >= LONG_TOKENS * STEP_S = 12 s (the sleeps alone)
SLOW = ServingLimits(
    max_tokens=LONG_TOKENS,
    default_max_tokens=8,
    batch_max_size=2,
    batch_wait_ms=0,
    max_queue=1,
    # Past what any test's setup takes on a loaded machine (the streamed answer, filling the batch and queue
    # before the first request's deadline), and below the 12 s a long answer takes at the least: 504s.
    request_timeout_s=8.0,
)


def _png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _user(text: str, *images: bytes) -> dict:
    parts = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(i).decode()}}
        for i in images
    ]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    checkpoint = init_random(
        "tiny", str(tmp_path_factory.mktemp("batching") / "ckpt"), seed=4, v2pe_delta=0.5
    )
    fast = VLPipeModel("fast", checkpoint, limits=FAST, device="cpu", dtype="float64")
    slow = VLPipeModel("slow", checkpoint, limits=SLOW, device="cpu", dtype="float64")
    fast.load()
    slow.load()
    slow.loaded.model.register_forward_pre_hook(lambda *args: time.sleep(STEP_S))
    with serve_in_background([fast, slow], limits=FAST) as url:
        yield url, fast, slow


@pytest.fixture()
def http(served):
    with httpx.Client(base_url=served[0], timeout=60) as client:
        yield client


def _wait_for(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


MIXED = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Describe every shape and colour you can see, one by one, in detail."}],
    [_user("How many red shapes?", _png(64, 32, 0))],
    [_user("Compare the two pictures.", _png(32, 32, 1), _png(48, 32, 2))],
]


def test_concurrent_requests_are_batched_and_answer_as_alone(served, http):
    _, fast, _ = served
    bodies = [{"model": "fast", "messages": m, "max_tokens": 12, "temperature": 0} for m in MIXED]
    bodies.append(
        {"model": "fast", "messages": MIXED[2], "max_tokens": 10, "temperature": 1.0, "n": 2, "seed": 9}
    )
    alone = [http.post(CHAT, json=b).json()["choices"] for b in bodies]  # one at a time
    peak_before = fast.batcher.peak_rows
    assert peak_before <= 2  # the n=2 request
    with ThreadPoolExecutor(len(bodies) * 2) as pool:
        together = list(pool.map(lambda b: http.post(CHAT, json=b).json()["choices"], bodies * 2))
    assert together == alone * 2
    assert fast.batcher.peak_rows > 2  # the wait window gathered several requests into one batch
    texts = [c[0]["message"]["content"] for c in alone[:4]]
    assert len(set(texts)) == 4  # different prompts, different answers: the rows did not mix
    sampled = [c["message"]["content"] for c in alone[4]]
    assert sampled[0] != sampled[1]  # two rows, two generators


def test_streamed_chunks_arrive_during_generation_and_join_to_the_answer(http):
    body = {"model": "slow", "messages": MIXED[2], "max_tokens": 24, "temperature": 0}
    whole = http.post(CHAT, json=body).json()["choices"][0]
    arrivals: list[tuple[float, dict]] = []
    with http.stream("POST", CHAT, json=body | {"stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                arrivals.append((time.monotonic(), json.loads(line.removeprefix("data: "))))
    chunks = [c for _, c in arrivals]
    content = [t for t, c in arrivals if c["choices"][0]["delta"].get("content")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]
    assert len(content) > 1
    # Each token takes at least STEP_S: the first piece left long before the last one was generated.
    assert arrivals[-1][0] - content[0] > STEP_S * 10


def test_a_disconnecting_stream_frees_its_rows(served, http):
    _, _, slow = served
    body = {"model": "slow", "messages": MIXED[0], "max_tokens": LONG_TOKENS, "temperature": 0}
    with http.stream("POST", CHAT, json=body | {"stream": True}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the role chunk: generation has started
        assert slow.batcher.active_rows == 1
    # The client hung up after the first chunk; its row leaves the batch long before its LONG_TOKENS (>= 12 s)
    # and before its request timeout (8 s after it arrived) would end it.
    _wait_for(lambda: slow.batcher.active_rows == 0, timeout_s=SLOW.request_timeout_s / 2)
    assert http.post(CHAT, json=body | {"max_tokens": 2}).status_code == 200


def test_a_full_queue_is_429_with_retry_after_and_a_late_answer_504(served, http):
    _, _, slow = served
    long = {"model": "slow", "messages": MIXED[0], "max_tokens": LONG_TOKENS, "temperature": 0}
    with ThreadPoolExecutor(3) as pool:
        # Two rows fill the batch (batch_max_size 2), the next request waits (max_queue 1), the fourth is refused.
        # One at a time: two submitted together could both reach the one-place queue before the batcher takes
        # the first, and the second would be refused (a test race, not a server fault).
        running = []
        for rows in (1, 2):
            running.append(pool.submit(http.post, CHAT, json=long))
            _wait_for(lambda rows=rows: slow.batcher.active_rows == rows)
        waiting = pool.submit(http.post, CHAT, json=long)
        _wait_for(lambda: slow.batcher.queued == 1)
        refused = http.post(CHAT, json=long)
        health = [http.get("/v2/health/live") for _ in range(5)]  # answered while the batch generates
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        error = refused.json()["error"]
        assert error["code"] == 429 and "retry in" in error["message"]
        assert all(h.status_code == 200 for h in health)
        # LONG_TOKENS at >= 30 ms each is past the 8 s request timeout: every one of them is a 504.
        for future in [*running, waiting]:
            response = future.result(timeout=60)
            assert response.status_code == 504, response.text
            assert "request timeout of 8.0 s" in response.json()["error"]["message"]
    _wait_for(lambda: slow.batcher.active_rows == 0 and slow.batcher.queued == 0)


def test_v1_rows_are_batched_with_seeded_samples_per_row(served, http):
    rows = [{"prompt": "Hi"}, {"prompt": "Name a shape."}, {"prompt": "Hi"}]
    params = {"max_new_tokens": 6, "temperature": 1.0, "seed": 3}
    batch = http.post("/v1/models/fast:predict", json={"instances": rows, "parameters": params}).json()
    assert len(batch["predictions"]) == 3
    # Row i samples with row_seed(seed, i): alone, row 2 of the batch is row 0 of a one-row request seeded so.
    first = http.post("/v1/models/fast:predict", json={"instances": rows[:1], "parameters": params}).json()
    assert first["predictions"][0] == batch["predictions"][0]
    assert batch["predictions"][0] != batch["predictions"][2]  # same prompt, different row seeds


def test_the_openai_client_plain_and_streamed(served):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=served[0] + "/openai/v1", api_key="unused", timeout=60, max_retries=0)
    messages = MIXED[3]
    plain = client.chat.completions.create(model="fast", messages=messages, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(
        model="fast", messages=messages, max_tokens=12, temperature=0, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert plain.choices[0].message.content and text == plain.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1


def test_kserve_rest_client_v1_and_v2(served):
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    url, fast, _ = served

    async def call() -> tuple[dict, object]:
        v1 = InferenceRESTClient(RESTConfig(protocol="v1", timeout=60, retries=0))
        v2 = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60, retries=0))
        body = {"instances": [{"prompt": "Hi"}], "parameters": {"max_new_tokens": 5, "temperature": 0}}
        prompt = InferInput("prompt", [1], "BYTES", data=["Hi"])
        request = InferRequest("fast", [prompt], parameters={"max_new_tokens": 5, "temperature": 0})
        try:
            return await v1.infer(url, body, model_name="fast"), await v2.infer(
                url, request, model_name="fast"
            )
        finally:
            await v1.close()
            await v2.close()

    first, second = asyncio.run(call())
    answer = first["predictions"][0]
    assert answer and second.outputs[0].data == [answer]


def test_chat_sync_and_the_batcher_agree(served):
    _, fast, _ = served
    conversation = Conversation((("human", "Name a shape."),))
    settings = ChatSettings(max_tokens=6, temperature=1.0, n=2, seed=1)

    async def batched():
        return await fast.chat(conversation, settings)

    result = asyncio.run(batched())  # the batcher thread serves several event loops' tickets
    direct = fast.chat_sync(conversation, settings)
    assert [c.text for c in result.completions] == [c.text for c in direct.completions]
    assert threading.active_count() > 1


def _clip(frames: int, seed: int = 0) -> bytes:
    from vlpipe.model.video import encode_clip

    rng = np.random.default_rng(seed)
    return encode_clip(
        [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(frames)]
    )


def _video_user(text: str, clip: bytes, mime: str = "video/mp4") -> dict:
    url = f"data:{mime};base64," + base64.b64encode(clip).decode()
    return {
        "role": "user",
        "content": [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": text}],
    }


def test_a_video_chat_answers_as_its_sampled_frames_do(served, http):
    import random

    from vlpipe.model.generate import generate
    from vlpipe.model.prompt import generation_prompt
    from vlpipe.model.tokenizer import IM_END
    from vlpipe.model.video import decode_video_frames, expand_video_prompt

    _, fast, _ = served
    clip = _clip(12)
    body = {
        "model": "fast",
        "messages": [_video_user("What happens?", clip)],
        "max_tokens": 10,
        "temperature": 0,
    }
    with ThreadPoolExecutor(3) as pool:  # batched with two image requests
        answers = list(pool.map(lambda b: http.post(CHAT, json=b), [body, *({"model": "fast", "messages": m,
                       "max_tokens": 10, "temperature": 0} for m in MIXED[2:])]))  # fmt: skip
    assert all(a.status_code == 200 for a in answers), answers[0].text
    # Spelled out: 4 frames (max_video_frames) at the middles of 4 equal segments of 12: 1, 4, 7, 10.
    frames = decode_video_frames(
        clip, sample_id="v", num_frames=4, sampling="middle", rng=random.Random(0), max_pixels=10**6
    )
    turns = expand_video_prompt([{"from": "human", "value": "<video>\nWhat happens?"}], 4, "v")
    assert turns[0]["value"].startswith(
        "Frame1: <image>\nFrame2: <image>\nFrame3: <image>\nFrame4: <image>\n"
    )
    loaded = fast.loaded
    prompt = generation_prompt(
        fast.pyfunc.encoder, loaded, [("human", turns[0]["value"])], frames, sample_id="v", frames=True
    )
    assert prompt.num_tiles == [1, 1, 1, 1]
    tok = loaded.tokenizer
    ids = generate(loaded.model, [prompt], eos_token_id=tok.convert_tokens_to_ids(IM_END),
                   pad_token_id=tok.pad_token_id, max_new_tokens=10)  # fmt: skip
    assert answers[0].json()["choices"][0]["message"]["content"] == tok.decode(
        ids[0], skip_special_tokens=True
    )
    assert answers[0].json()["usage"]["prompt_tokens"] == len(prompt)


@pytest.mark.parametrize(
    ("content", "status", "match"),
    [
        ([("video", b"\x00" * 40_001)], 413, "max_video_bytes of 40000"),
        ([("video", b"not a video at all")], 400, "cannot read the video"),
        ([("video", "clip"), ("video", "clip")], 400, "at most one video"),
        ([("image", "png"), ("video", "clip")], 400, "at most one video"),
        ([("video", "clip", "text/plain")], 400, "data:video/mp4;base64"),
    ],
)
def test_bad_videos_get_4xx_naming_the_limit(http, content, status, match):
    parts = []
    for kind, data, *mime in content:
        data = {"clip": _clip(3), "png": _png(32, 32, 0)}.get(data, data)
        url = f"data:{mime[0] if mime else ('video/mp4' if kind == 'video' else 'image/png')};base64,"
        url += base64.b64encode(data).decode()
        parts.append({"type": f"{kind}_url", f"{kind}_url": {"url": url}})
    body = {
        "model": "fast",
        "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "?"}]}],
    }
    response = http.post(CHAT, json=body)
    assert response.status_code == status, response.text
    assert match in response.json()["error"]["message"]
    assert http.get("/v2/health/ready").status_code == 200


class _IdleEngine:
    """An engine with nothing running (the batcher's thread only asks how many rows are active)."""

    active = 0
    rows: list = []
    pending: list = []


def test_a_burst_that_fits_the_batch_is_not_refused():
    """`max_queue` counts requests waiting for room in the batch: a burst that arrives before the generation
    thread admits anything is accepted while the batch has free rows for it (CI once saw the second of two
    simultaneous requests refused by a one-place queue with an empty two-row batch)."""
    from vlpipe.serving.batching import Batcher, QueueFull

    release = threading.Event()

    def slow_engine():  # the thread admits nothing until the test has submitted its burst
        release.wait(30)
        return _IdleEngine()

    batcher = Batcher(slow_engine, batch_max_size=3, batch_wait_ms=0, max_queue=1)

    async def burst() -> list[str]:
        outcomes = []
        for size in (
            1,
            2,
            1,
            1,
        ):  # rows per request: 1 + 2 fill the batch, the third waits, the fourth is refused
            try:
                batcher.submit([(None, [object()] * size)])
                outcomes.append("accepted")
            except QueueFull as full:
                outcomes.append(f"429 after {full.retry_after_s} s")
        release.set()
        await asyncio.to_thread(batcher.stop)  # fails the submitted tickets on this (still running) loop
        return outcomes

    outcomes = asyncio.run(burst())
    assert outcomes[:3] == ["accepted"] * 3
    assert outcomes[3].startswith("429 after ")
