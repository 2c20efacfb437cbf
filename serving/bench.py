"""`make bench` helper for serving: HTTP overhead of a chat completion, and errors under concurrent load.

On a random `tiny` checkpoint (it measures cost, not answers), `bench_serving`:

1. times the same greedy chat completion (an image and a question) through the HTTP server
   (`POST /openai/v1/chat/completions` on loopback, over a keep-alive `http.client` connection) and
   in-process (the route's own steps without HTTP: `to_conversation` → `VLPipeModel.chat_sync` →
   `completion_response`), interleaved so a busy machine slows both alike; goal: HTTP overhead at p50 at
   most 15%;
2. runs `clients` concurrent clients (default 32) sending chat completions for `duration_s` seconds (default
   60), a share of them (`bad_share`, default 1 in 4) hostile: NaN/Infinity/1e400 numbers, lone UTF-16
   surrogates, vanishing temperatures, seeds beyond 64 bits, strings for numbers, a non-image data URL, a
   decompression bomb, deeply nested JSON (`BAD_BODIES`); goal: zero errors for the good requests (every
   answer a 200 with a choice) and zero 5xx (and no transport error) for the bad ones.

The result's top level repeats the load goals (`good_request_errors`, `bad_request_5xx`) for the printed table.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import platform
import random
import struct
import tempfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

GOAL_HTTP_OVERHEAD_P50 = 0.15
GOAL_ERRORS = 0
GOAL_BAD_5XX = 0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _ms(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(_percentile(values, 0.5) * 1000, 3),
        "p99_ms": round(_percentile(values, 0.99) * 1000, 3),
    }


def _chat_body(max_tokens: int) -> dict[str, Any]:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "How many shapes?"}]
    return {
        "model": "vlpipe",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
    }


def _bomb_png() -> bytes:
    """The header of a 30000 x 30000 PNG (no pixel data): what a decompression bomb shows the decoder."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 30_000, 30_000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def bad_bodies(good: dict[str, Any]) -> dict[str, bytes]:
    """Hostile chat bodies (raw JSON bytes) built from a good one; every one must get a 4xx."""
    text = json.dumps(good)
    image_url = good["messages"][0]["content"][0]["image_url"]["url"]
    png_b64 = image_url.partition(",")[2]
    bomb = "data:image/png;base64," + base64.b64encode(_bomb_png()).decode("ascii")

    def with_field(name: str, raw: str) -> bytes:
        return (text[:-1] + f', "{name}": {raw}}}').encode()

    return {
        "nan_temperature": with_field("temperature", "NaN"),
        "infinite_top_p": with_field("top_p", "Infinity"),
        "1e400_max_tokens": with_field("max_tokens", "1e400"),
        "tiny_temperature": with_field("temperature", "1e-45"),
        "seed_2**64": with_field("seed", str(2**64)),
        "string_max_tokens": with_field("max_tokens", '"5"'),
        "string_stream": with_field("stream", '"yes"'),
        "lone_surrogate": text.replace("How many shapes?", "How many \\ud800 shapes?").encode(),
        "text_plain_data_url": text.replace(image_url, "data:text/plain;base64," + png_b64).encode(),
        "decompression_bomb": text.replace(image_url, bomb).encode(),
        "deep_nesting": b'{"messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
    }


def _load(
    url: str, body: dict, clients: int, duration_s: float, timeout_s: float, bad_share: float = 0.0
) -> dict[str, Any]:
    """`clients` threads posting `body` until `duration_s` passes, every request a bad one (`bad_bodies`, in
    turn) with probability `bad_share`; counts good-request errors and bad-request answers by kind."""
    import httpx

    latencies: list[float] = []
    errors: Counter[str] = Counter()
    bad_statuses: Counter[str] = Counter()
    bad_latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + duration_s
    bad = list(bad_bodies(body).values()) if bad_share > 0 else []
    headers = {"content-type": "application/json"}

    def client(index: int) -> None:
        rng = random.Random(index)
        sent_bad = 0
        with httpx.Client(base_url=url, timeout=timeout_s) as http:
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                if bad and rng.random() < bad_share:
                    content = bad[(index + sent_bad) % len(bad)]
                    sent_bad += 1
                    try:
                        response = http.post("/openai/v1/chat/completions", content=content, headers=headers)
                        kind = f"http_{response.status_code // 100}xx"
                    except httpx.HTTPError as exc:
                        kind = type(exc).__name__
                    with lock:
                        bad_statuses[kind] += 1
                        bad_latencies.append(time.perf_counter() - started)
                    continue
                try:
                    response = http.post("/openai/v1/chat/completions", json=body)
                    ok = response.status_code == 200 and len(response.json()["choices"]) == 1
                    kind = None if ok else f"http_{response.status_code}"
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    kind = type(exc).__name__
                elapsed = time.perf_counter() - started
                with lock:
                    if kind is None:
                        latencies.append(elapsed)
                    else:
                        errors[kind] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,), name=f"bench-client-{i}") for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    completed = len(latencies)
    bad_total = sum(bad_statuses.values())
    bad_5xx = bad_statuses["http_5xx"]
    bad_failed = bad_total - bad_statuses["http_4xx"]  # 5xx, 2xx/3xx or no answer at all
    return {
        "clients": clients,
        "duration_s": round(wall, 2),
        "requests_ok": completed,
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "requests_per_s": round(completed / wall, 2),
        **_ms(latencies),
        "bad_requests": {
            "share": bad_share,
            "sent": bad_total,
            "answers": dict(bad_statuses),
            "status_5xx": bad_5xx,
            "not_4xx": bad_failed,
            **_ms(bad_latencies),
        },
        "goal_errors": GOAL_ERRORS,
        "goal_bad_5xx": GOAL_BAD_5XX,
        "meets_goal": sum(errors.values()) <= GOAL_ERRORS and completed > 0 and bad_failed <= GOAL_BAD_5XX,
    }


def bench_serving(
    out_dir: Path,
    *,
    duration_s: float = 60.0,
    clients: int = 32,
    latency_requests: int = 100,
    max_tokens: int = 16,
    preset: str = "tiny",
    threads: int | None = 1,
    request_timeout_s: float = 120.0,
    seed: int = 0,
    bad_share: float = 0.25,
) -> dict[str, Any]:
    """Measure the serving overhead and robustness; writes `serving.json` under `out_dir`.

    Args:
        out_dir: where the JSON result goes.
        duration_s: length of the concurrent-load phase.
        clients: concurrent clients in that phase.
        latency_requests: timed requests per path (HTTP and in-process) for the overhead.
        max_tokens: generated tokens per request (greedy; a random model may stop earlier, the same way on
            both paths).
        preset: model preset of the random checkpoint.
        threads: torch intra-op threads during the benchmark (None: leave as is); 1 keeps timings stable on a
            shared machine.
        request_timeout_s: client timeout per request under load (a timeout counts as an error).
        seed: initialisation seed.
        bad_share: the chance that a load request is a hostile one (`bad_bodies`); 0 for good ones only.

    Returns:
        The result dict (also written to `out_dir/serving.json`).
    """
    import torch

    from vlpipe.model.init import init_random
    from vlpipe.serving.openai_api import (
        ChatCompletionRequest,
        chat_settings,
        completion_response,
        to_conversation,
    )
    from vlpipe.serving.predictor import VLPipeModel, serve_in_background

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    body = _chat_body(max_tokens)
    try:
        with tempfile.TemporaryDirectory(prefix="vlpipe-bench-serving-") as work:
            checkpoint = init_random(preset, str(Path(work) / "ckpt"), seed=seed)
            model = VLPipeModel("vlpipe", checkpoint, device="cpu", dtype="float32")
            model.load()

            def in_process() -> dict:
                request = ChatCompletionRequest.model_validate(body)
                settings = chat_settings(request, model.limits)
                result = model.chat_sync(to_conversation(request, model.limits), settings)
                return completion_response(model.name, result, response_id="bench", created=0)

            with serve_in_background(model) as url:
                # The timed client is the standard library's keep-alive connection: httpx alone adds ~1 ms of
                # Python per request here, which is the client's cost, not the server's.
                host, port = url.removeprefix("http://").rsplit(":", 1)
                connection = http.client.HTTPConnection(host, int(port), timeout=request_timeout_s)
                payload = json.dumps(body).encode()

                def over_http() -> dict:
                    connection.request(
                        "POST", "/openai/v1/chat/completions", payload, {"content-type": "application/json"}
                    )
                    response = connection.getresponse()
                    data = response.read()
                    if response.status != 200:
                        raise RuntimeError(f"chat completion failed: {response.status} {data[:200]!r}")
                    return json.loads(data)

                expected = in_process()["choices"][0]["message"]["content"]
                for _ in range(3):  # warm-up
                    assert over_http()["choices"][0]["message"]["content"] == expected
                    in_process()
                timings: dict[str, list[float]] = {"http": [], "in_process": []}
                for _ in range(latency_requests):
                    for name, fn in (("http", over_http), ("in_process", in_process)):
                        started = time.perf_counter()
                        fn()
                        timings[name].append(time.perf_counter() - started)
                connection.close()
                load = _load(url, body, clients, duration_s, request_timeout_s, bad_share)
    finally:
        torch.set_num_threads(previous_threads)
    http_p50 = _percentile(timings["http"], 0.5)
    local_p50 = _percentile(timings["in_process"], 0.5)
    overhead = http_p50 / local_p50 - 1.0
    result = {
        "benchmark": "serving",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "settings": {
            "preset": preset,
            "max_tokens": max_tokens,
            "threads": threads,
            "requests": latency_requests,
            "bad_share": bad_share,
        },
        "latency": {
            "http": _ms(timings["http"]),
            "in_process": _ms(timings["in_process"]),
            "http_overhead_p50": round(overhead, 4),
            "goal_http_overhead_p50": GOAL_HTTP_OVERHEAD_P50,
            "meets_goal": overhead <= GOAL_HTTP_OVERHEAD_P50,
        },
        "load": load,
        "good_request_errors": load["errors"],
        "bad_request_5xx": load["bad_requests"]["status_5xx"],
        "bad_requests_not_4xx": load["bad_requests"]["not_4xx"],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serving.json").write_text(json.dumps(result, indent=2))
    return result
