"""`make bench` helper for serving: HTTP overhead of a chat completion, and errors under concurrent load.

On a random `tiny` checkpoint (it measures cost, not answers), `bench_serving`:

1. times the same greedy chat completion (an image and a question) through the HTTP server
   (`POST /openai/v1/chat/completions` on loopback, over a keep-alive `http.client` connection) and
   in-process (the route's own steps without HTTP: `to_conversation` → `VLPipeModel.chat_sync` →
   `completion_response`), interleaved so a busy machine slows both alike; goal: HTTP overhead at p50 at
   most 15%;
2. runs `clients` concurrent clients (default 32) sending chat completions for `duration_s` seconds (default
   60); goal: zero errors (every answer a 200 with a choice).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import platform
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

GOAL_HTTP_OVERHEAD_P50 = 0.15
GOAL_ERRORS = 0


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


def _load(url: str, body: dict, clients: int, duration_s: float, timeout_s: float) -> dict[str, Any]:
    """`clients` threads posting `body` until `duration_s` passes; counts errors by kind."""
    import httpx

    latencies: list[float] = []
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    stop_at = time.monotonic() + duration_s

    def client() -> None:
        with httpx.Client(base_url=url, timeout=timeout_s) as http:
            while time.monotonic() < stop_at:
                started = time.perf_counter()
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
    threads = [threading.Thread(target=client, name=f"bench-client-{i}") for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    completed = len(latencies)
    return {
        "clients": clients,
        "duration_s": round(wall, 2),
        "requests_ok": completed,
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "requests_per_s": round(completed / wall, 2),
        **_ms(latencies),
        "goal_errors": GOAL_ERRORS,
        "meets_goal": sum(errors.values()) <= GOAL_ERRORS and completed > 0,
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
                load = _load(url, body, clients, duration_s, request_timeout_s)
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
        },
        "latency": {
            "http": _ms(timings["http"]),
            "in_process": _ms(timings["in_process"]),
            "http_overhead_p50": round(overhead, 4),
            "goal_http_overhead_p50": GOAL_HTTP_OVERHEAD_P50,
            "meets_goal": overhead <= GOAL_HTTP_OVERHEAD_P50,
        },
        "load": load,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serving.json").write_text(json.dumps(result, indent=2))
    return result
