"""`make bench`: benchmarks whose results go to JSON under `.vlpipe/bench/` and a printed table.

Today: data — token utilisation of packed batches on the demo mixture against per-sample padding to the batch
maximum (goal ≥ 98%), and data-pipeline throughput on real photographs (decode → 448-pixel tiles → JPEG
augmentation → tokenize → pack), per CPU core.
"""

from __future__ import annotations

import io
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table


def _write(out: Path, name: str, result: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": name,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        **result,
    }
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    return path


def bench_packing(work: Path, *, samples: int = 3000, max_tokens: int = 2048, seed: int = 0) -> dict:
    """Token utilisation of greedy packing vs padding to the batch maximum, on the demo pre-training mixture
    encoded for the `small` preset (64-pixel tiles, 16 tokens per tile)."""
    from vlpipe.model.checkpoint import load_checkpoint
    from vlpipe.model.data.demo import DemoSizes, iter_demo_texts, write_demo_dataset
    from vlpipe.model.data.loader import DataConfig, MixtureLoader
    from vlpipe.model.data.packing import (
        GreedyPacker,
        PackingConfig,
        pack_rows,
        padded_utilisation,
        token_utilisation,
    )
    from vlpipe.model.init import init_random

    data = work / "data"
    if not (data / "meta_pretrain.json").exists():
        sizes = DemoSizes(text_corpus=500, captions=400, reasoning_train=1000, reasoning_test=10, mpo_pairs=10,
                          prm_solutions=10, reasoning_prm=10)  # fmt: skip
        write_demo_dataset(str(data), seed=seed, sizes=sizes, overwrite=True)
    if not (work / "small" / "config.json").exists():
        init_random("small", str(work / "small"), corpus=list(iter_demo_texts(str(data))), seed=seed)
    lm = load_checkpoint(work / "small")
    loader = MixtureLoader(
        DataConfig(meta=str(data / "meta_pretrain.json"), mode="pretrain", max_length=max_tokens),
        lm.tokenizer, lm.image_cfg, lm.tokens_per_tile,
    )  # fmt: skip
    it = iter(loader)
    encoded = [next(it) for _ in range(samples)]
    cfg = PackingConfig(max_tokens=max_tokens, max_tiles=64, buffer_size=64)
    packer = GreedyPacker(cfg)
    rows = [row for s in encoded for row in packer.add(s)] + packer.flush()
    packed = token_utilisation(pack_rows(rows, max_tokens, lm.tokenizer.pad_token_id))
    per_row = len(encoded) / len(rows)
    padded = padded_utilisation(encoded, batch_size=max(1, round(per_row)))
    return {
        "samples": len(encoded),
        "rows": len(rows),
        "max_tokens": max_tokens,
        "samples_per_row": round(per_row, 2),
        "packed_token_utilisation": round(packed, 4),
        "padded_token_utilisation": round(padded, 4),
        "goal_packed_utilisation": 0.98,
        "meets_goal": packed >= 0.98,
        "achieved_language_share": round(loader.achieved_language_share, 4),
    }


def bench_pipeline_throughput(*, seconds: float = 20.0, seed: int = 0) -> dict:
    """Samples/s and 448-tiles/s on one core: decode → tile (1b preset settings) → JPEG augment → tokenize →
    pack, on scikit-image's real photographs cropped to varied sizes and aspect ratios."""
    from PIL import Image

    from vlpipe.model.conversation import ConversationEncoder
    from vlpipe.model.data.corpus import load_photos
    from vlpipe.model.data.packing import GreedyPacker, PackingConfig
    from vlpipe.model.image import decode_image, process_image
    from vlpipe.model.init import image_config_for
    from vlpipe.model.presets import get_preset
    from vlpipe.model.tokenizer import default_corpus, train_bpe_tokenizer

    torch.set_num_threads(1)
    preset = get_preset("1b")
    image_cfg = image_config_for(preset)
    tokenizer = train_bpe_tokenizer(default_corpus(), vocab_size=400)
    encoder = ConversationEncoder(tokenizer, preset.tokens_per_tile, max_length=16384, mode="sft")
    packer = GreedyPacker(PackingConfig(max_tokens=16384, max_tiles=48))
    photos, _ = load_photos()
    rng = random.Random(seed)
    files = []
    for name, array in sorted(photos.items()):
        for _ in range(4):
            h, w = array.shape[:2]
            cw, ch = rng.randint(w // 3, w), rng.randint(h // 3, h)
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            scale = rng.uniform(1.0, 3.0)  # up-scale some crops so grids of several 448 tiles occur
            image = Image.fromarray(array[y : y + ch, x : x + cw]).resize((int(cw * scale), int(ch * scale)))
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=92)
            files.append((name, buf.getvalue()))
    record = {"conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                                {"from": "gpt", "value": "A photograph of everyday objects and scenes."}]}  # fmt: skip
    n_samples = n_tiles = 0
    timings = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        name, data = files[n_samples % len(files)]
        t0 = time.perf_counter()
        image = decode_image(data, source=name)
        pixels = process_image(image, image_cfg, augment=True, rng=rng)
        sample = encoder.encode(
            {**record, "image": name}, [pixels.shape[0]], pixel_values=pixels, sample_id=name
        )
        packer.add(sample)
        timings.append(time.perf_counter() - t0)
        n_samples += 1
        n_tiles += pixels.shape[0]
    elapsed = time.perf_counter() - start
    return {
        "photos": sorted(photos),
        "tile_size": image_cfg.tile_size,
        "max_tiles": image_cfg.max_tiles,
        "cores": 1,
        "samples": n_samples,
        "tiles": n_tiles,
        "mean_tiles_per_sample": round(n_tiles / n_samples, 2),
        "samples_per_s_per_core": round(n_samples / elapsed, 2),
        "tiles_per_s_per_core": round(n_tiles / elapsed, 2),
        "median_ms_per_sample": round(1000 * statistics.median(timings), 2),
    }


def bench_training_packing(work: Path, *, repeats: int = 4) -> dict:
    """SFT tokens/s with packing vs padding (vlpipe.components.training.bench) on two SFT sets: the demo SFT mixture
    (captions + reasoning, short and alike: little padding to remove) and a long-tailed multi-image set built
    from it (1-8 image turns per conversation, like interleaved SFT data). The 2x goal is judged on the latter.
    Each set trains full passes of both modes `repeats` times, interleaved; the speedups are medians of the
    per-repetition ratios, with their spread ((max - min) / median)."""
    from vlpipe.components.training.bench import bench_sft_packing, write_multi_image_sft

    data, ckpt = work / "data", work / "small"
    if not (data / "meta_sft.json").exists() or not (ckpt / "config.json").exists():
        bench_packing(work, samples=10)  # writes the demo data and the small checkpoint
    started = time.perf_counter()
    demo = bench_sft_packing(ckpt, data / "meta_sft.json", repeats=repeats)
    multi = bench_sft_packing(
        ckpt, write_multi_image_sft(data, work / "multi_image"), samples=128, repeats=repeats
    )
    result = {
        "speedup_demo_sft": demo["speedup_tokens_per_s"],
        "speedup_demo_sft_spread": demo["speedup_spread"],
        "speedup_multi_image_sft": multi["speedup_tokens_per_s"],
        "speedup_multi_image_sft_spread": multi["speedup_spread"],
        "packed_tokens_per_s": multi["packed"]["tokens_per_s"],
        "padded_tokens_per_s": multi["padded"]["tokens_per_s"],
        "packed_peak_memory_gb": multi["packed"]["peak_memory_gb"],
        "padded_peak_memory_gb": multi["padded"]["peak_memory_gb"],
        "repeats": repeats,
        "seconds": round(time.perf_counter() - started, 1),
        "goal_speedup": 2.0,
        "meets_goal": multi["meets_goal"],
        "demo_sft": demo,
        "multi_image_sft": multi,
    }
    if "mfu" in multi["packed"]:
        result["packed_mfu"], result["padded_mfu"] = multi["packed"]["mfu"], multi["padded"]["mfu"]
    return result


def _bench_prm_scoring(work: Path) -> dict:
    """PRM scoring of an S-step answer in one forward vs one per step prefix, and eval items/s."""
    from vlpipe.components.evaluate.bench import bench_prm_scoring

    return bench_prm_scoring(work / "prm_scoring")


def _bench_annotation_index(work: Path) -> dict:
    """Annotation index: build time and memory per record at 100k, 1M and 5M records (vs the figures before)."""
    from vlpipe.components.data.bench import bench_annotation_index

    return bench_annotation_index(work / "annotation-index")


def _bench_record_set(work: Path) -> dict:
    """MPO/PRM record set: memory per record holding parsed pairs vs offsets parsed on access (100k pairs)."""
    from vlpipe.components.data.bench import bench_record_set

    return bench_record_set(work / "record-set")


def _bench_serving(work: Path) -> dict:
    """Chat completion p50/p99 through the HTTP server vs in-process; errors under 32 clients for 60 s."""
    from vlpipe.serving.bench import bench_serving

    return bench_serving(work / "serving")


def run_benchmarks(out: Path, *, console: Console) -> dict[str, dict]:
    """Run every benchmark, write `out/<name>.json`, print a table; returns the results."""
    work = out / "work"
    results = {
        "data_packing": bench_packing(work),
        "data_pipeline_throughput": bench_pipeline_throughput(),
        "data_annotation_index": _bench_annotation_index(work),
        "data_record_set": _bench_record_set(work),
        "training_sft_packing": bench_training_packing(work),
        "eval_prm_scoring": _bench_prm_scoring(work),
        "serving_latency": _bench_serving(work),
    }
    table = Table(title="vlpipe benchmarks")
    table.add_column("benchmark")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, result in results.items():
        path = _write(out, name, result)
        for key, value in result.items():
            if isinstance(value, int | float | bool) and not isinstance(value, list):
                table.add_row(name, key, str(value))
        console.print(f"wrote {path}")
    console.print(table)
    return results
