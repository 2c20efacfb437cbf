"""`make run` until the full pipeline lands: what exists, end to end, on the demo data.

demo data → tokenizer + `tiny` model → a short SFT on the SFT mixture (captions + reasoning), read through the
meta file with quarantine and provenance, packed into block-diagonal sequences, with square-averaged LM loss →
HF checkpoint → reload (identical logits) → V2PE generation on held-out items.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.console import Console

from model.checkpoint import load_checkpoint, save_checkpoint
from model.collate import collate_padded
from model.conversation import ConversationEncoder, EncodedSample
from model.data.loader import DataConfig, MixtureLoader
from model.data.mixing import MixtureConfig
from model.data.packing import PackingConfig, model_inputs, packed_batches, token_utilisation
from model.generate import generate
from model.image import load_image, process_image
from model.init import init_random
from model.tokenizer import IM_END
from objectives.lm import lm_loss


def _records(path: Path, limit: int) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for _, line in zip(range(limit), f, strict=False)]


def _encode(enc: ConversationEncoder, loaded, record: dict, images_root: Path, **kwargs) -> EncodedSample:
    image = load_image(str(images_root / record["image"]))
    pixels = process_image(image, loaded.image_cfg)
    return enc.encode(record, [pixels.shape[0]], pixel_values=pixels, **kwargs)


def run_demo(out: Path, *, preset: str, steps: int, seed: int, console: Console) -> dict:
    """Run the demo and return a summary dict (also written to `out/summary.json`)."""
    from model.data.demo import DemoSizes, extract_answer, iter_demo_texts, write_demo_dataset

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    if not (data_dir / "meta_sft.json").exists():
        console.print(f"[bold]1/5[/bold] writing demo data to {data_dir}")
        sizes = DemoSizes(
            text_corpus=200,
            captions=100,
            reasoning_train=400,
            reasoning_test=100,
            mpo_pairs=20,
            prm_solutions=40,
        )
        write_demo_dataset(str(data_dir), seed=seed, sizes=sizes, overwrite=True)
    console.print(f"[bold]2/5[/bold] tokenizer + random {preset} model")
    init_dir = out / "init"
    init_random(preset, str(init_dir), corpus=list(iter_demo_texts(str(data_dir))), seed=seed)
    loaded = load_checkpoint(init_dir)
    model, tok = loaded.model, loaded.tokenizer

    console.print(f"[bold]3/5[/bold] SFT for {steps} packed steps (square-averaged LM loss)")
    data_cfg = DataConfig(
        meta=str(data_dir / "meta_sft.json"),
        mode="sft",
        max_length=512,
        mixture=MixtureConfig(language_ratio=0, multimodal_ratio=1, seed=seed),
    )
    loader = MixtureLoader(data_cfg, tok, loaded.image_cfg, loaded.tokens_per_tile)
    packing = PackingConfig(max_tokens=1024, max_tiles=64, buffer_size=16)
    batches = packed_batches(iter(loader), packing, tok.pad_token_id)
    images_root = data_dir / "images"
    enc = ConversationEncoder(tok, loaded.tokens_per_tile, max_length=512, mode="sft")
    probe_samples = [
        _encode(enc, loaded, r, images_root) for r in _records(data_dir / "reasoning/train.jsonl", 2)
    ]
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    losses, utilisation = [], []
    for _ in range(steps):
        batch = next(batches)
        logits = model(**model_inputs(batch, model.config._attn_implementation)).logits
        loss = lm_loss(logits, batch["labels"], batch["sample_index"], reduction="square")
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        utilisation.append(token_utilisation(batch))
    model.eval()

    console.print("[bold]4/5[/bold] HF checkpoint save + reload")
    ckpt = out / "sft"
    save_checkpoint(ckpt, model, tok, loaded.image_cfg, metadata={"preset": preset, "stage": "demo-sft"})
    reloaded = load_checkpoint(ckpt)
    probe = collate_padded(probe_samples, tok.pad_token_id)
    with torch.no_grad():
        a = model(**{k: v for k, v in probe.items() if k not in ("labels", "sample_index")}).logits
        b = reloaded.model(**{k: v for k, v in probe.items() if k not in ("labels", "sample_index")}).logits
    max_diff = float((a - b).abs().max())

    console.print("[bold]5/5[/bold] greedy generation with V2PE on held-out items")
    test = _records(data_dir / "reasoning/test.jsonl", 100)
    prompts = []
    for r in test:
        record = {
            "id": r["id"],
            "image": r["image"],
            "conversations": [{"from": "human", "value": r["question"]}],
        }
        prompts.append(
            _encode(
                enc,
                reloaded,
                record,
                images_root,
                add_generation_prompt=True,
                v2pe_deltas=reloaded.v2pe_delta,
            )
        )
    answers = generate(
        reloaded.model,
        prompts,
        eos_token_id=tok.convert_tokens_to_ids(IM_END),
        pad_token_id=tok.pad_token_id,
        max_new_tokens=96,
    )
    texts = [tok.decode(a) for a in answers]
    correct = sum(extract_answer(t) == r["answer"] for t, r in zip(texts, test, strict=True))
    summary = {
        "preset": preset,
        "train_samples": sum(loader.stats.samples.values()),
        "token_utilisation": round(sum(utilisation) / len(utilisation), 4),
        "quarantined": len(loader.quarantine),
        "data_manifest_sha256": loader.manifest(packing=packing.model_dump())["manifest_sha256"],
        "steps": steps,
        "loss_first": round(losses[0], 4),
        "loss_last10_mean": round(sum(losses[-10:]) / min(10, len(losses)), 4),
        "reload_max_logit_diff": max_diff,
        "heldout_items": len(test),
        "heldout_greedy_accuracy": correct / len(test),
        "chance_accuracy": 0.2,  # answers are uniform over 0–4
        "example_answer": texts[0],
        "checkpoint": str(ckpt),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
