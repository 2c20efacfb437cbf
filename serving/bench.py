"""`make bench` helper for serving: HTTP overhead of a chat completion, errors under concurrent load, and the
speed of batching, streaming and features-once Best-of-N.

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

3. `bench_batching`: throughput at 32 concurrent clients, batched vs one request at a time (the same server
   code, `batch_max_size` 32 vs 1), p99 of each, health-check latency during the load; goal >= 4x, 0 errors;
4. `bench_streaming`: time to the first streamed chunk / total time of a 64-token answer; goal <= 0.25;
5. `bench_best_of_features_once`: Best-of-8 evaluation items/s with the prompt (image features + prefill)
   computed once vs per sample, on the `small` preset with a 7-tile image; expected >= 1.5x.

The result's top level repeats the goals' figures (`good_request_errors`, `bad_request_5xx`,
`batching_throughput_speedup`, `stream_first_chunk_share`, `best_of_features_once_speedup`, ...) for the printed
table.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import platform
import queue
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
    batching_clients: int = 32,
    batching_requests_per_client: int = 4,
    batching_rounds: int = 2,
    stream_requests: int = 10,
    stream_tokens: int = 64,
    best_of_items: int = 6,
    best_of_rounds: int = 3,
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
        batching_clients, batching_requests_per_client, batching_rounds: `bench_batching`'s settings.
        stream_requests, stream_tokens: `bench_streaming`'s settings.
        best_of_items, best_of_rounds: `bench_best_of_features_once`'s settings.

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
            batching = bench_batching(
                checkpoint,
                clients=batching_clients,
                requests_per_client=batching_requests_per_client,
                rounds=batching_rounds,
                max_tokens=max_tokens,
                request_timeout_s=request_timeout_s,
            )
            streaming = bench_streaming(checkpoint, requests=stream_requests, max_tokens=stream_tokens)
            best_of = bench_best_of_features_once(
                Path(work), items=best_of_items, rounds=best_of_rounds, seed=seed
            )
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
        "batching": batching,
        "streaming": streaming,
        "best_of_features_once": best_of,
        "batching_throughput_speedup": batching["throughput_speedup"],
        "batching_errors": batching["batched"]["errors"] + batching["one_at_a_time"]["errors"],
        "batching_p99_ms": batching["batched"]["p99_ms"],
        "one_at_a_time_p99_ms": batching["one_at_a_time"]["p99_ms"],
        "health_p99_ms_under_load": batching["health_during_load"]["p99_ms"],
        "stream_first_chunk_share": streaming["first_chunk_share_p50"],
        "best_of_features_once_speedup": best_of["speedup"],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serving.json").write_text(json.dumps(result, indent=2))
    return result


# -- batching, streaming and features-once benchmarks (issue 20) -----------------------------------------------
GOAL_BATCHING_SPEEDUP = 4.0
GOAL_FIRST_CHUNK_SHARE = 0.25
GOAL_FEATURES_ONCE_SPEEDUP = 1.5
GOAL_HEALTH_P99_MS = 100.0


def _closed_loop(
    url: str, body: dict, clients: int, requests_per_client: int, timeout_s: float
) -> dict[str, Any]:
    """`clients` threads, each sending `requests_per_client` requests back to back on its own keep-alive
    connection; throughput, p50/p99 and errors."""
    payload = json.dumps(body).encode()
    host, port = url.removeprefix("http://").rsplit(":", 1)
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client() -> None:
        connection = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
        barrier.wait()
        for _ in range(requests_per_client):
            started = time.perf_counter()
            try:
                connection.request(
                    "POST", "/openai/v1/chat/completions", payload, {"content-type": "application/json"}
                )
                response = connection.getresponse()
                data = response.read()
                kind = (
                    None
                    if response.status == 200 and json.loads(data)["choices"]
                    else f"http_{response.status}"
                )
            except (OSError, ValueError, KeyError, http.client.HTTPException) as exc:
                kind = type(exc).__name__
                connection.close()
                connection = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
            elapsed = time.perf_counter() - started
            with lock:
                if kind is None:
                    latencies.append(elapsed)
                else:
                    errors[kind] += 1
        connection.close()

    threads = [threading.Thread(target=client, name=f"bench-client-{i}") for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {
        "requests_ok": len(latencies),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "duration_s": round(wall, 3),
        "requests_per_s": round(len(latencies) / wall, 3),
        **_ms(latencies),
    }


def _health_probe(url: str, stop: Any, results: Any) -> None:
    """GET /v2/health/live every 50 ms until `stop` is set; the latencies go to `results` (a queue)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    out: list[float] = []
    while not stop.is_set():
        started = time.perf_counter()
        connection.request("GET", "/v2/health/live")
        connection.getresponse().read()
        out.append(time.perf_counter() - started)
        stop.wait(0.05)
    connection.close()
    results.put(out)


def _load_process(
    url: str, body: dict, clients: int, requests_per_client: int, timeout_s: float, results
) -> None:
    results.put(_closed_loop(url, body, clients, requests_per_client, timeout_s))


def _load_elsewhere(
    url: str, body: dict, clients: int, requests_per_client: int, timeout_s: float, *, probe: bool
) -> tuple[dict[str, Any], list[float]]:
    """`_closed_loop` in a separate process (the clients' Python must not compete with the server's for the
    GIL, as remote clients do not), with a health probe in another one while it runs."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    results, health, stop = context.Queue(), context.Queue(), context.Event()
    load = context.Process(
        target=_load_process, args=(url, body, clients, requests_per_client, timeout_s, results)
    )
    prober = context.Process(target=_health_probe, args=(url, stop, health)) if probe else None
    if prober is not None:
        prober.start()
    load.start()
    deadline = time.monotonic() + timeout_s * requests_per_client + 120
    outcome = None
    while outcome is None:
        try:
            outcome = results.get(timeout=1.0)
        except queue.Empty:
            if not load.is_alive() or time.monotonic() > deadline:
                stop.set()
                load.kill()
                raise RuntimeError(f"the load process failed (exit code {load.exitcode})") from None
    load.join()
    checks: list[float] = []
    if prober is not None:
        stop.set()
        checks = health.get(timeout=60)
        prober.join()
    return outcome, checks


def bench_batching(
    checkpoint: str,
    *,
    clients: int = 32,
    requests_per_client: int = 4,
    rounds: int = 2,
    max_tokens: int = 16,
    request_timeout_s: float = 300.0,
) -> dict[str, Any]:
    """Throughput at `clients` concurrent clients, batched (`batch_max_size` = clients) vs one request at a time
    (`batch_max_size` 1), the same server code; the phases alternate `rounds` times and the ratio is of the
    summed requests/s. The clients run in another process, and health-check latency is sampled from a third
    one during the batched phases."""
    from vlpipe.serving.limits import ServingLimits
    from vlpipe.serving.predictor import VLPipeModel, serve_in_background

    body = _chat_body(max_tokens)
    phases: dict[str, list[dict]] = {"batched": [], "one_at_a_time": []}
    health: list[float] = []
    models = {
        "batched": VLPipeModel(
            "batched",
            checkpoint,
            limits=ServingLimits(batch_max_size=clients, batch_wait_ms=5),
            device="cpu",
            dtype="float32",
        ),
        "one_at_a_time": VLPipeModel(
            "one_at_a_time", checkpoint, limits=ServingLimits(batch_max_size=1), device="cpu", dtype="float32"
        ),
    }
    for model in models.values():
        model.load()
    with serve_in_background(list(models.values()), limits=ServingLimits()) as url:
        for name in models:  # warm-up
            _closed_loop(url, body | {"model": name}, 2, 2, request_timeout_s)
        for _ in range(rounds):
            for name in models:
                outcome, checks = _load_elsewhere(
                    url, body | {"model": name}, clients, requests_per_client, request_timeout_s,
                    probe=name == "batched",
                )  # fmt: skip
                phases[name].append(outcome)
                health.extend(checks)
    batcher = models["batched"].batcher
    assert batcher is not None

    def summary(runs: list[dict]) -> dict[str, Any]:
        ok = sum(r["requests_ok"] for r in runs)
        wall = sum(r["duration_s"] for r in runs)
        return {
            "requests_ok": ok,
            "errors": sum(r["errors"] for r in runs),
            "requests_per_s": round(ok / wall, 3),
            "p50_ms": round(_percentile([r["p50_ms"] for r in runs], 0.5), 3),
            "p99_ms": round(max(r["p99_ms"] for r in runs), 3),
            "runs": runs,
        }

    batched, single = summary(phases["batched"]), summary(phases["one_at_a_time"])
    speedup = batched["requests_per_s"] / single["requests_per_s"]
    errors = batched["errors"] + single["errors"]
    return {
        "clients": clients,
        "max_tokens": max_tokens,
        "batched": batched,
        "one_at_a_time": single,
        "mean_batch_rows": round(batcher.rows_stepped / max(1, batcher.steps), 2),
        "throughput_speedup": round(speedup, 3),
        "health_during_load": _ms(health)
        | {"max_ms": round(max(health, default=0) * 1000, 3), "checks": len(health)},
        "goal_speedup": GOAL_BATCHING_SPEEDUP,
        "meets_goal": speedup >= GOAL_BATCHING_SPEEDUP and errors == 0,
        "goal_health_p99_ms": GOAL_HEALTH_P99_MS,
        "health_meets_goal": _percentile(health, 0.99) * 1000 <= GOAL_HEALTH_P99_MS,
    }


def bench_streaming(
    checkpoint: str, *, requests: int = 10, max_tokens: int = 64, request_timeout_s: float = 120.0
) -> dict[str, Any]:
    """Time to the first streamed content chunk vs total time of a `max_tokens`-token streamed answer (greedy,
    one client, the batching server); the ratio is the median over `requests` answers that ran to
    `max_tokens` (a random model that ends earlier is counted and left out)."""
    import httpx

    from vlpipe.serving.predictor import VLPipeModel, serve_in_background

    model = VLPipeModel("vlpipe", checkpoint, device="cpu", dtype="float32")
    model.load()
    body = _chat_body(max_tokens) | {"stream": True}
    shares: list[float] = []
    firsts: list[float] = []
    totals: list[float] = []
    chunk_counts: list[int] = []
    short = 0
    with serve_in_background(model) as url, httpx.Client(base_url=url, timeout=request_timeout_s) as client:
        for attempt in range(requests + 1):  # the first one warms up
            started = time.perf_counter()
            first = None
            pieces = 0
            finish = None
            with client.stream("POST", "/openai/v1/chat/completions", json=body) as response:
                for line in response.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    choice = json.loads(line.removeprefix("data: "))["choices"][0]
                    if choice["delta"].get("content"):
                        pieces += 1
                        first = first or time.perf_counter()
                    finish = choice.get("finish_reason") or finish
            total = time.perf_counter() - started
            if attempt == 0:
                continue
            if finish != "length" or first is None:
                short += 1
                continue
            firsts.append(first - started)
            totals.append(total)
            shares.append((first - started) / total)
            chunk_counts.append(pieces)
    share = _percentile(shares, 0.5)
    return {
        "max_tokens": max_tokens,
        "answers": len(shares),
        "answers_shorter_than_max_tokens": short,
        "content_chunks_per_answer_p50": _percentile([float(c) for c in chunk_counts], 0.5),
        "first_chunk": _ms(firsts),
        "total": _ms(totals),
        "first_chunk_share_p50": round(share, 4),
        "goal_first_chunk_share": GOAL_FIRST_CHUNK_SHARE,
        "meets_goal": bool(shares) and share <= GOAL_FIRST_CHUNK_SHARE,
    }


def bench_best_of_features_once(
    work: Path,
    *,
    preset: str = "small",
    items: int = 6,
    n: int = 8,
    max_new_tokens: int = 16,
    image_size: tuple[int, int] = (384, 256),
    rounds: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Best-of-`n` evaluation items/s (the evaluation stage's call: `generate([prompt] * n, do_sample=True)`)
    with the prompt prefilled once (`share_prompts=True`: one vision-encoder pass and one prefill per item)
    vs once per sample, on `preset` with an image of several tiles. The two modes alternate `rounds` times;
    the ratio is of the summed times. The samples are checked to be identical."""
    import numpy as np
    import torch
    from PIL import Image

    from vlpipe.model.checkpoint import load_checkpoint
    from vlpipe.model.conversation import ConversationEncoder
    from vlpipe.model.generate import generate
    from vlpipe.model.init import init_random
    from vlpipe.model.prompt import generation_prompt
    from vlpipe.model.tokenizer import IM_END

    loaded = load_checkpoint(init_random(preset, str(work / f"{preset}-ckpt"), seed=seed))
    tok = loaded.tokenizer
    encoder = ConversationEncoder(tok, loaded.tokens_per_tile, max_length=8192, mode="sft")
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(items):
        pixels = rng.integers(0, 256, (image_size[1], image_size[0], 3), dtype=np.uint8)
        turns = [("human", f"<image>\nQuestion {i}: how many shapes are there?")]
        prompts.append(generation_prompt(encoder, loaded, turns, [Image.fromarray(pixels)], sample_id=str(i)))
    ids = {"eos_token_id": tok.convert_tokens_to_ids(IM_END), "pad_token_id": tok.pad_token_id}
    settings = {"max_new_tokens": max_new_tokens, "do_sample": True, "temperature": 1.0, **ids}

    def run(share: bool) -> tuple[float, list]:
        started = time.perf_counter()
        out = [
            generate(loaded.model, [p] * n, seed=k, share_prompts=share, **settings)
            for k, p in enumerate(prompts)
        ]
        return time.perf_counter() - started, out

    run(True), run(False)  # warm-up
    times: dict[bool, float] = {True: 0.0, False: 0.0}
    same = True
    for _ in range(rounds):
        once, a = run(True)
        each, b = run(False)
        times[True] += once
        times[False] += each
        same = same and a == b
    speedup = times[False] / times[True]
    return {
        "preset": preset,
        "n": n,
        "items": items * rounds,
        "max_new_tokens": max_new_tokens,
        "image_size": list(image_size),
        "tiles_per_image": prompts[0].num_tiles[0],
        "prompt_tokens": len(prompts[0]),
        "items_per_s_features_once": round(items * rounds / times[True], 3),
        "items_per_s_per_sample": round(items * rounds / times[False], 3),
        "same_samples": same,
        "speedup": round(speedup, 3),
        "goal_speedup": GOAL_FEATURES_ONCE_SPEEDUP,
        "meets_goal": speedup >= GOAL_FEATURES_ONCE_SPEEDUP and same,
        "torch_threads": torch.get_num_threads(),
    }
