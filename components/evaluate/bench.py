"""`make bench` helper for the evaluation stage: PRM scoring in one forward pass vs one forward per step prefix,
and evaluation throughput on a few demo items. Runs on a random checkpoint: it measures cost, not accuracy.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

# Steps of a long demo-style answer (S = 8).
_STEPS = (
    "I see a red circle, a blue square and a red triangle.",
    "The red ones are the circle and the triangle.",
    "I also see a green square and a yellow circle.",
    "The green one is the square.",
    "There are no blue ones left.",
    "The shapes left to right are circle, square, triangle, square and circle.",
    "Two of them are red.",
    "So the answer is 2.",
)


@contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _best_seconds(fns: dict, repeats: int) -> dict[str, float]:
    """Fastest of `repeats` timed calls of each function, interleaved so a busy machine slows all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def bench_prm_scoring(
    out_dir: Path,
    *,
    preset: str = "tiny",
    repeats: int = 7,
    threads: int | None = 1,
    eval_items: int = 4,
    n: int = 8,
    max_new_tokens: int = 48,
    seed: int = 0,
) -> dict:
    """Measure PRM step scoring and evaluation throughput.

    1. An answer of S = 8 steps to a demo question: all steps scored in one forward pass
       (`PRMScorer.score_answers`) against one forward per step prefix (`score_steps_per_prefix`); goal:
       speedup >= 0.8 * S. The scores of both must agree (max |difference| is reported).
    2. `run_evaluation` on `eval_items` demo items with N = `n` samples (MLflow to a SQLite file in `out_dir`).

    Args:
        out_dir: working directory (demo data, checkpoint, evaluation output).
        preset: random checkpoint preset, `tiny` or `small`.
        repeats: timed repetitions of each scoring variant (the fastest is reported).
        threads: torch threads while timing the scoring (None: leave as is). One thread is steadier on a shared
            machine; more threads add fixed per-forward overhead, which favours the single forward.
        eval_items, n, max_new_tokens: size of the throughput run.
        seed: data and initialisation seed.

    Returns:
        A JSON-able dict with timings, the speedup, `goal_speedup`, `meets_goal` and `eval_items_per_second`.
    """
    import torch
    from rich.console import Console

    from vlpipe.components.evaluate.config import EvalConfig
    from vlpipe.components.evaluate.stage import run_evaluation
    from vlpipe.model.checkpoint import load_checkpoint
    from vlpipe.model.data.demo import DemoSizes, iter_demo_texts, write_demo_dataset
    from vlpipe.model.image import load_image, process_image
    from vlpipe.model.init import init_random
    from vlpipe.serving.scoring import PRMScorer, score_steps_per_prefix

    out_dir = Path(out_dir)
    data = out_dir / "eval-data"
    if not (data / "reasoning" / "test.jsonl").exists():
        sizes = DemoSizes(text_corpus=50, captions=20, reasoning_train=50, reasoning_test=max(eval_items, 4),
                          mpo_pairs=1, prm_solutions=1, reasoning_prm=1)  # fmt: skip
        write_demo_dataset(str(data), seed=seed, sizes=sizes, overwrite=True)
    ckpt = out_dir / f"eval-{preset}"
    if not (ckpt / "config.json").exists():
        init_random(preset, str(ckpt), corpus=list(iter_demo_texts(str(data))), seed=seed)
    loaded = load_checkpoint(ckpt)
    scorer = PRMScorer(loaded, "mean")

    image = load_image(str(data / "images" / "reasoning" / "test" / "000000.png"))
    pixels = process_image(image, loaded.image_cfg)
    tiles = [pixels.shape[0]]
    prompt = "<image>\nHow many red shapes are there?"
    steps = list(_STEPS)
    answer = "\n".join(steps)
    one = scorer.score_answers(prompt, [answer], tiles, pixels)[0].step_scores
    per_prefix = score_steps_per_prefix(scorer, prompt, steps, tiles, pixels)
    max_diff = max(abs(a - b) for a, b in zip(one, per_prefix, strict=True))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or previous_threads)
    try:
        best = _best_seconds(
            {
                "one": lambda: scorer.score_answers(prompt, [answer], tiles, pixels),
                "prefix": lambda: score_steps_per_prefix(scorer, prompt, steps, tiles, pixels),
                "batch": lambda: scorer.score_answers(prompt, [answer] * n, tiles, pixels),
            },
            repeats,
        )
    finally:
        torch.set_num_threads(previous_threads)
    one_s, prefix_s, batch_s = best["one"], best["prefix"], best["batch"]
    speedup = prefix_s / one_s
    full_tokens = len(scorer.encode(prompt, steps, tiles, pixels)[0])
    prefix_tokens = sum(
        len(scorer.encode(prompt, steps[:j], tiles, pixels)[0]) for j in range(1, len(steps) + 1)
    )
    goal = 0.8 * len(steps)

    config = EvalConfig(
        policy=str(ckpt),
        prm=str(ckpt),
        benchmarks=[
            {
                "name": "demo",
                "path": str(data / "reasoning" / "test.jsonl"),
                "format": "demo",
                "limit": eval_items,
            }
        ],
        n=n,
        max_new_tokens=max_new_tokens,
        batch_items=eval_items,
        seed=seed,
        output_dir=str(out_dir / "eval-output"),
        device="cpu",
        mlflow={"experiment": "bench-eval", "tags": {"stage": "bench"}},
    )
    with _env("MLFLOW_TRACKING_URI", f"sqlite:///{out_dir.resolve() / 'eval-bench-mlflow.db'}"):
        metrics = run_evaluation(config, Console(quiet=True))
    return {
        "preset": preset,
        "scoring_torch_threads": threads or previous_threads,
        "steps": len(steps),
        "prm_tokens": full_tokens,
        # The speedup expected if a forward's cost were proportional to its tokens; fixed per-forward costs
        # (vision tower, kernel launches) push the real speedup towards S, attention's quadratic cost below.
        "token_ratio": round(prefix_tokens / full_tokens, 2),
        "one_forward_ms": round(one_s * 1000, 2),
        "per_prefix_forwards_ms": round(prefix_s * 1000, 2),
        "speedup": round(speedup, 2),
        "goal_speedup": goal,
        "meets_goal": speedup >= goal,
        "max_abs_score_diff": max_diff,
        f"batch_of_{n}_answers_one_forward_ms": round(batch_s * 1000, 2),
        "eval_items": metrics["evaluated_items"],
        "eval_n": n,
        "eval_max_new_tokens": max_new_tokens,
        "eval_items_per_second": round(metrics["items_per_second"], 3),
    }
