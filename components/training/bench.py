"""SFT throughput with packing versus per-sample padding, on the same model, data and machine, in one run.

Both modes train (forward, square-averaged LM loss, backward, AdamW step) on exactly the same encoded
samples, once each: packed into block-diagonal rows of `max_tokens`, or `padded_batch` samples per
micro-batch padded to the longest. Throughput counts real (non-padding) tokens per second; memory is the
process's resident set after each backward (CPU) or the CUDA peak per step (GPU).
"""

from __future__ import annotations

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


def _train(model: Any, batches: list[dict], attn: str, warmup: int = 2) -> dict[str, float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens, seconds, peak = 0, 0.0, 0.0
    slots = 0
    for i, batch in enumerate(batches):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        logits = model(**model_inputs(batch, attn)).logits
        loss = lm_loss(logits, batch["labels"], batch["sample_index"], reduction="square")
        loss.backward()
        peak = max(peak, _memory_gb())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            seconds += time.perf_counter() - started
            tokens += int((batch["sample_index"] >= 0).sum())
            slots += batch["sample_index"].numel()
    return {
        "tokens_per_s": tokens / seconds,
        "token_utilisation": tokens / slots,
        "micro_batches": len(batches),
        "peak_memory_gb": round(peak, 3),
        "seconds": round(seconds, 2),
    }


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
    seed: int = 0,
) -> dict[str, Any]:
    """Tokens/s of SFT steps with packing and with padding to the batch maximum.

    Args:
        checkpoint: the model (the `small` preset in `make bench`).
        meta: the SFT meta file.
        samples: encoded samples trained on in each mode.
        max_tokens: packed row length.
        padded_batch: samples per padded micro-batch.
        rows_per_batch: packed rows per micro-batch (similar token slots to a padded micro-batch).
        seed: mixture seed.

    Returns:
        Per-mode throughput, utilisation and peak memory, the speedup, and whether it meets the 2x goal.
    """
    from vlpipe.model.checkpoint import load_checkpoint
    from vlpipe.model.data.loader import DataConfig, MixtureLoader
    from vlpipe.model.data.mixing import MixtureConfig

    torch.manual_seed(seed)
    loaded = load_checkpoint(checkpoint)
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
    attn = loaded.model.config._attn_implementation
    model = loaded.model.train()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    packed_result = _train(model, packed, attn)
    model.load_state_dict(initial)  # both modes start from the same weights
    padded_result = _train(model, padded, attn)
    speedup = packed_result["tokens_per_s"] / padded_result["tokens_per_s"]
    lengths = [len(s) for s in encoded]
    return {
        "preset": loaded.metadata.get("preset"),
        "samples": samples,
        "mean_sample_tokens": round(sum(lengths) / len(lengths), 1),
        "max_sample_tokens": max(lengths),
        "packed": {
            **packed_result,
            "max_tokens": max_tokens,
            "rows": len(rows),
            "rows_per_batch": rows_per_batch,
        },
        "padded": {**padded_result, "batch_size": padded_batch},
        "speedup_tokens_per_s": round(speedup, 3),
        "goal_speedup": 2.0,
        "meets_goal": speedup >= 2.0,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
    }
