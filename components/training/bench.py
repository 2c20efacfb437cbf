"""SFT throughput with packing versus per-sample padding, on the same model, data and machine, in one run.

Both modes train (forward, square-averaged LM loss, backward, AdamW step) on exactly the same encoded
samples: packed into block-diagonal rows of `max_tokens`, or `padded_batch` samples per micro-batch padded to
the longest. A repetition trains every micro-batch of both modes once, the two modes' micro-batches
interleaved so both advance together in time (`schedule`), each step timed on its own, after one untimed
warm-up repetition; load from other processes then hits both modes alike. On a CPU the benchmark runs
on one thread (a thread pool's barriers stall whenever another process takes a core, which slows many small
steps far more than few large ones). Throughput counts real (non-padding) tokens per second in both modes
(`sample_index >= 0`: the same samples, so the same tokens); the speedup is the median of the
per-repetition ratios, reported with its spread ((max - min) / median) and every repetition's value. Memory is
the process's resident set after each step (CPU) or the CUDA peak (GPU); on a GPU MFU = 6 x parameters x
tokens/s divided by the GPU's peak dense bf16 FLOP/s (`runtime.PEAK_BF16_FLOPS`).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from vlpipe.model.collate import collate_padded
from vlpipe.model.data.packing import GreedyPacker, PackingConfig, model_inputs, pack_rows
from vlpipe.objectives.lm import lm_loss


def _memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def real_tokens(batch: dict) -> int:
    """Real (non-padding) tokens of a micro-batch, counted the same way for packed and padded batches."""
    return int((batch["sample_index"] >= 0).sum())


def _step(model: Any, optimizer: torch.optim.Optimizer, batch: dict, attn: str) -> None:
    logits = model(**model_inputs(batch, attn)).logits
    loss = lm_loss(logits, batch["labels"], batch["sample_index"], reduction="square")
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def spread(values: list[float]) -> float:
    """(max - min) / median: 0.1 means the repetitions agree within 10% of their median."""
    return (max(values) - min(values)) / statistics.median(values)


def schedule(lengths: dict[str, int], rep: int) -> list[tuple[str, int]]:
    """The order of one repetition's micro-batches: the modes' lists merged by progress (the mode that is
    further behind, as a fraction of its micro-batches, goes next), so both modes advance together in time and
    a burst of load from elsewhere hits both alike; ties go to the first mode on even repetitions, the second
    on odd ones.

    Worked example: lengths {a: 2, b: 4}, rep 0 → a0 b0 b1 a1 b2 b3 (after a0 and b0, a is at 1/2 and b at
    1/4, so b goes; after b1 both are at 1/2, a tie, so a).
    """
    names = list(lengths) if rep % 2 == 0 else list(lengths)[::-1]
    done = dict.fromkeys(names, 0)
    order = []
    while any(done[n] < lengths[n] for n in names):
        name = min((n for n in names if done[n] < lengths[n]), key=lambda n: done[n] / lengths[n])
        order.append((name, done[name]))
        done[name] += 1
    return order


def interleaved(
    model: Any, modes: dict[str, list[dict]], attn: str, repeats: int, peak_flops: float | None = None
) -> dict[str, Any]:
    """Train every micro-batch of two modes `repeats` times, the modes' micro-batches interleaved (`schedule`),
    each step timed on its own.

    Args:
        model: the model (trained in place; its starting weights are restored at the end).
        modes: two modes, name → micro-batches (both over the same samples).
        attn: the attention implementation for `model_inputs`.
        repeats: timed repetitions (each trains every micro-batch of both modes once), after one untimed.
        peak_flops: the device's peak FLOP/s, for MFU (None: no MFU).

    Returns:
        Per mode: the median over repetitions of its tokens/s (real tokens / seconds of its steps), each
        repetition's, their spread, utilisation, peak memory (and MFU); the per-repetition ratios of the first
        mode's tokens/s to the second's, their median and spread.
    """
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = list(modes)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for name, index in schedule({n: len(modes[n]) for n in names}, 1):
        # One untimed repetition: optimizer state, the allocator and every micro-batch shape's kernels (CPU
        # primitives are built per shape; padded micro-batches come in many) are ready before any timed step.
        _step(model, optimizer, modes[name][index], attn)
    tokens = {n: sum(real_tokens(b) for b in modes[n]) for n in names}
    runs: dict[str, list[float]] = {n: [] for n in names}
    peaks: dict[str, float] = dict.fromkeys(names, 0.0)
    for rep in range(repeats):
        seconds = dict.fromkeys(names, 0.0)
        for name, index in schedule({n: len(modes[n]) for n in names}, rep):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            _sync()
            started = time.perf_counter()
            _step(model, optimizer, modes[name][index], attn)
            _sync()
            seconds[name] += time.perf_counter() - started
            peaks[name] = max(peaks[name], _memory_gb())
        for name in names:
            runs[name].append(tokens[name] / seconds[name])
    model.load_state_dict(initial)
    flops_per_token = 6.0 * sum(p.numel() for p in model.parameters())
    out: dict[str, Any] = {}
    for name in names:
        slots = sum(b["sample_index"].numel() for b in modes[name])
        median = statistics.median(runs[name])
        out[name] = {
            "tokens_per_s": round(median, 1),
            "tokens_per_s_runs": [round(v, 1) for v in runs[name]],
            "spread": round(spread(runs[name]), 3),
            "real_tokens": tokens[name],
            "token_utilisation": round(tokens[name] / slots, 4),
            "micro_batches": len(modes[name]),
            "peak_memory_gb": round(peaks[name], 3),
        }
        if peak_flops:
            out[name]["mfu"] = round(flops_per_token * median / peak_flops, 4)
    first, second = names
    ratios = [a / b for a, b in zip(runs[first], runs[second], strict=True)]
    out["ratio_runs"] = [round(r, 3) for r in ratios]
    out["ratio"] = round(statistics.median(ratios), 3)
    out["ratio_spread"] = round(spread(ratios), 3)
    return out


def write_multi_image_sft(data: Path, out: Path, *, records: int = 400, seed: int = 0) -> Path:
    """A long-tailed SFT set from the demo reasoning task: conversations of k image turns (k from 1 to 8,
    P(k) proportional to 1/k), each turn its own image, question and answer, like interleaved multi-image SFT.

    Returns:
        The meta file of the new dataset.
    """
    import json
    import random

    rng = random.Random(seed)
    source = [json.loads(line) for line in (data / "reasoning" / "train.jsonl").read_text().splitlines()]
    weights = [1 / k for k in range(1, 9)]
    out.mkdir(parents=True, exist_ok=True)
    with (out / "multi_image.jsonl").open("w") as f:
        for i in range(records):
            k = rng.choices(range(1, 9), weights)[0]
            picked = rng.sample(source, k)
            turns = [turn for r in picked for turn in r["conversations"]]  # each human turn has its <image>
            f.write(
                json.dumps({"id": f"mi-{i}", "image": [r["image"] for r in picked], "conversations": turns})
                + "\n"
            )
    meta = {"multi_image": {"root": str(data / "images"), "annotation": str(out / "multi_image.jsonl")}}
    (out / "meta.json").write_text(json.dumps(meta))
    return out / "meta.json"


def bench_sft_packing(
    checkpoint: Path,
    meta: Path,
    *,
    samples: int = 240,
    max_tokens: int = 1024,
    padded_batch: int = 8,
    rows_per_batch: int = 4,
    repeats: int = 4,
    seed: int = 0,
    peak: float | None = None,
) -> dict[str, Any]:
    """Tokens/s of SFT steps with packing and with padding to the batch maximum (see the module docstring).

    Args:
        checkpoint: the model (the `small` preset in `make bench`).
        meta: the SFT meta file.
        samples: encoded samples trained on in each mode, in every repetition.
        max_tokens: packed row length.
        padded_batch: samples per padded micro-batch.
        rows_per_batch: packed rows per micro-batch (similar token slots to a padded micro-batch).
        repeats: interleaved repetitions of both modes (the speedup is their median).
        seed: mixture seed.
        peak: peak FLOP/s for MFU; default the GPU's (`runtime.peak_flops`), none on a CPU.

    Returns:
        Per-mode throughput (median, runs, spread), utilisation, peak memory and (GPU) MFU, the speedup's
        median, runs and spread, and whether it meets the 2x goal.
    """
    from vlpipe.components.training.runtime import peak_flops
    from vlpipe.model.checkpoint import load_checkpoint
    from vlpipe.model.data.loader import DataConfig, MixtureLoader
    from vlpipe.model.data.mixing import MixtureConfig

    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_checkpoint(checkpoint, device=device)
    loader = MixtureLoader(
        DataConfig(
            meta=str(meta),
            mode="sft",
            max_length=max_tokens,
            augment=False,
            mixture=MixtureConfig(language_ratio=0, multimodal_ratio=1, seed=seed),
        ),
        loaded.tokenizer,
        loaded.image_cfg,
        loaded.tokens_per_tile,
    )
    it = iter(loader)
    encoded = [next(it) for _ in range(samples)]
    pad = loaded.tokenizer.pad_token_id
    packer = GreedyPacker(PackingConfig(max_tokens=max_tokens, max_tiles=256, buffer_size=32))
    rows = [row for s in encoded for row in packer.add(s)] + packer.flush()
    packed = [
        pack_rows(rows[i : i + rows_per_batch], max_tokens, pad) for i in range(0, len(rows), rows_per_batch)
    ]
    padded = [
        collate_padded(encoded[i : i + padded_batch], pad) for i in range(0, len(encoded), padded_batch)
    ]
    if device == "cuda":
        packed, padded = ([_to(b, device) for b in batches] for batches in (packed, padded))
    attn = loaded.model.config._attn_implementation
    model = loaded.model.train()
    threads = torch.get_num_threads()
    if device == "cpu":
        # One thread: a thread pool's barriers stall whenever another process takes a core, which slows
        # many small steps (padding) far more than few large ones (packing) and made the ratio follow the
        # machine's load. Throughput is per core, as in the data-pipeline benchmark.
        torch.set_num_threads(1)
    try:
        modes = {"packed": packed, "padded": padded}
        result = interleaved(model, modes, attn, repeats, peak if peak is not None else peak_flops())
    finally:
        torch.set_num_threads(threads)
    lengths = [len(s) for s in encoded]
    speedup = result["ratio"]
    return {
        "preset": loaded.metadata.get("preset"),
        "samples": samples,
        "mean_sample_tokens": round(sum(lengths) / len(lengths), 1),
        "max_sample_tokens": max(lengths),
        "repeats": repeats,
        "packed": {
            **result["packed"],
            "max_tokens": max_tokens,
            "rows": len(rows),
            "rows_per_batch": rows_per_batch,
        },
        "padded": {**result["padded"], "batch_size": padded_batch},
        "speedup_tokens_per_s": speedup,
        "speedup_runs": result["ratio_runs"],
        "speedup_spread": result["ratio_spread"],
        "goal_speedup": 2.0,
        "meets_goal": speedup >= 2.0,
        "device": device,
        "threads": 1 if device == "cpu" else threads,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
