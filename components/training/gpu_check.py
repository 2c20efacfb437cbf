"""`make gpu-check` / `vlpipe gpu-check`: does training work on this machine's accelerator? (not part of CI)

Three checks, each a function that returns `{name, status: passed|failed|skipped, reason, metrics}`:

1. `packed-logits/<attn>`: 4 samples of different lengths (text-only, one image, two images) packed into one
   row by the project's packer (`GreedyPacker` + `pack_rows` + `model_inputs`) give each sample the logits it
   gets alone; once with SDPA (block-diagonal mask) and once with flash-attention varlen (`cu_seq_lens`),
   which is `skipped` when the `flash_attn` package does not import (or there is no GPU). A control run with
   one causal mask over the whole row must differ more (the comparison can tell a leak).
2. `train-step`: pre-training steps (LM loss on every text token, square-averaged, AdamW) on packed rows:
   tokens/s, peak memory (`torch.cuda.max_memory_allocated`) and MFU = 6 * params * tokens/s / peak FLOP/s.
3. `all-reduce`: a 2-process all-reduce (NCCL, one process per GPU) with its bus bandwidth; `skipped` on a
   machine with one GPU.

Full form (CUDA): `1b` preset, random init (no download; the offline BPE tokenizer, vocabulary as the preset
sets it), logits in bf16, the step as bf16 autocast over fp32 weights, rows of 8192 tokens. Reduced form (CPU, or `--reduced`): `tiny`, fp32, SDPA, rows of
256 tokens, no MFU, and the all-reduce over gloo on 127.0.0.1, so the script itself runs in the test suite.
A skipped check is never counted as passed; the exit status is 1 when any check failed.

Only torch, transformers, tokenizers, pydantic, numpy, pillow and fsspec are imported on this path (no MLflow,
kfp, DeepSpeed or S3 clients), so it runs on a bare GPU machine:
`python -m vlpipe.components.training.gpu_check --out DIR` (see `infra/gpu/run_on_device.sh`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlpipe.model.conversation import ConversationEncoder, EncodedSample
from vlpipe.model.data.config import PackingConfig
from vlpipe.model.data.packing import GreedyPacker, model_inputs, pack_rows
from vlpipe.model.presets import ModelPreset, get_preset
from vlpipe.objectives.lm import lm_loss

# H100/H200 SXM dense bf16 peak; used when the GPU is not in `runtime.PEAK_BF16_FLOPS` and no override is given.
DEFAULT_PEAK_TFLOPS = 989.0
# packed vs alone, max |diff| <= ATOL + RTOL * max |logit|: fp32 agrees to rounding; bf16 rounds every layer's
# output to 8 mantissa bits, and the packed and per-sample forward passes use different kernels and shapes.
TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (0.0, 0.05)}
PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


@dataclass(frozen=True)
class Form:
    """What one run checks with: the full form on a GPU, the reduced one on a CPU."""

    name: str  # "full" or "reduced"
    device: torch.device
    dtype: torch.dtype
    preset: str
    row_tokens: int  # packed row length of the training step
    rows: int  # packed rows per step
    steps: int  # timed training steps (one untimed warm-up step comes first)
    backend: str  # all-reduce backend


def pick_form(reduced: bool = False, preset: str | None = None) -> Form:
    """The full form on CUDA (unless `reduced`), else the reduced form; `preset` overrides the model."""
    if torch.cuda.is_available() and not reduced:
        return Form("full", torch.device("cuda"), torch.bfloat16, preset or "1b", 8192, 2, 3, "nccl")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return Form("reduced", device, torch.float32, preset or "tiny", 256, 2, 1, "gloo")


def result(name: str, status: str, reason: str = "", **metrics: Any) -> dict[str, Any]:
    """One check's outcome: `status` is passed, failed or skipped; `reason` says why (always for skipped)."""
    return {"name": name, "status": status, "reason": reason, "metrics": metrics}


def flash_attn_missing(device: torch.device) -> str | None:
    """Why flash-attention varlen cannot run here, or None when it can."""
    if importlib.util.find_spec("flash_attn") is None:
        return "flash_attn not installed"
    if device.type != "cuda":
        return "flash_attn needs a CUDA GPU"
    try:
        import flash_attn  # noqa: F401
    except Exception as err:  # a wheel built for another torch/CUDA fails here, not at find_spec
        return f"flash_attn does not import: {type(err).__name__}: {err}"
    return None


# -- model and data --------------------------------------------------------------------------------------------
def build(form: Form) -> tuple[torch.nn.Module, Any, ModelPreset]:
    """A randomly initialised model of the form's preset on its device and dtype, and the offline tokenizer."""
    from vlpipe.model.build import build_model
    from vlpipe.model.tokenizer import default_corpus, train_bpe_tokenizer

    preset = get_preset(form.preset)
    tokenizer = train_bpe_tokenizer(default_corpus(), vocab_size=400)  # the tests' tokenizer; no download
    with form.device:  # initialise on the GPU: a 1B model's init on the CPU takes minutes
        model = build_model(preset, tokenizer, seed=0)
    return model.to(form.dtype), tokenizer, preset


def make_samples(
    tokenizer: Any,
    preset: ModelPreset,
    tiles_per_sample: list[list[int]],
    *,
    words: list[int],
    mode: str = "sft",
    seed: int = 0,
) -> list[EncodedSample]:
    """Encoded samples: sample i has images of `tiles_per_sample[i]` tiles (random pixels) and a question of
    about `words[i]` words; fractional V2PE steps (δ = 0.5) on the first image, as training draws them."""
    from vlpipe.model.tokenizer import default_corpus

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    vocab = " ".join(default_corpus()).split()
    side = preset.vision.image_size
    longest = sum(max(sum(t), 1) for t in tiles_per_sample) * preset.tokens_per_tile + 4 * sum(words) + 64
    encoder = ConversationEncoder(tokenizer, preset.tokens_per_tile, max_length=longest, mode=mode)
    samples = []
    for i, (tiles, n_words) in enumerate(zip(tiles_per_sample, words, strict=True)):
        question = " ".join(rng.choice(vocab) for _ in range(n_words))
        record: dict[str, Any] = {
            "id": f"s{i}",
            "conversations": [
                {"from": "human", "value": "<image>\n" * len(tiles) + question},
                {"from": "gpt", "value": " ".join(rng.choice(vocab) for _ in range(1 + n_words // 4))},
            ],
        }
        if tiles:
            record["image"] = [f"{i}_{k}.png" for k in range(len(tiles))]
        pixels = torch.randn(sum(tiles), 3, side, side, generator=gen) if tiles else None
        deltas = [0.5] + [1.0] * (len(tiles) - 1) if tiles else 1.0
        samples.append(encoder.encode(record, tiles, pixel_values=pixels, v2pe_deltas=deltas))
    return samples


def to_device(inputs: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Tensors to `device`; pixel values (and a float mask) to the model's dtype."""
    moved = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if key == "pixel_values" or (key == "attention_mask" and value.is_floating_point()):
                value = value.to(dtype)
        moved[key] = value
    return moved


# -- 1. packed = per-sample logits -----------------------------------------------------------------------------
def check_packed_logits(
    model: torch.nn.Module, tokenizer: Any, preset: ModelPreset, form: Form, attn: str
) -> dict[str, Any]:
    """Packed-row logits equal per-sample logits under `attn` ("sdpa" or "flash_attention_2").

    Returns:
        A result with `max_abs_diff`, `tolerance`, `max_abs_logit`, `top1_agreement` and the leak control's
        `leak_max_abs_diff`; skipped when flash-attention cannot run here.
    """
    name = f"packed-logits/{attn}"
    if attn == "flash_attention_2" and (missing := flash_attn_missing(form.device)):
        return result(name, SKIPPED, missing)
    full = form.name == "full"
    samples = make_samples(
        tokenizer,
        preset,
        [[2], [], [1, 2], [1]] if full else [[3], [], [1, 2], [1]],
        words=[40, 120, 25, 8] if full else [6, 12, 5, 2],
    )
    packer = GreedyPacker(
        PackingConfig(max_tokens=sum(len(s) for s in samples) + 8, max_tiles=64, min_remaining=0)
    )
    rows = [row for s in samples for row in packer.add(s)] + packer.flush()
    assert len(rows) == 1 and len(rows[0]) == len(samples), "the packer was expected to fill one row"
    length = sum(len(s) for s in rows[0]) + 8  # the row ends in padding, as real rows do
    batch = pack_rows(rows, length, tokenizer.pad_token_id)
    leaky = dict(
        batch,
        attention_mask=torch.ones(length, length, dtype=torch.bool).tril().expand(1, 1, -1, -1),
        cu_seq_lens_q=torch.tensor([0, length], dtype=torch.int32),
        cu_seq_lens_k=torch.tensor([0, length], dtype=torch.int32),
        max_length_q=length,
        max_length_k=length,
    )
    model.set_attn_implementation(attn)
    model.eval()
    with torch.no_grad():
        packed = model(**to_device(model_inputs(batch, attn, form.dtype), form.device, form.dtype)).logits[0]
        leaked = model(**to_device(model_inputs(leaky, attn, form.dtype), form.device, form.dtype)).logits[0]
        diff = leak = scale = 0.0
        agree = total = 0
        start = 0
        for i, s in enumerate(rows[0]):
            alone = (
                model(
                    **to_device(
                        {
                            "input_ids": s.input_ids[None],
                            "position_ids": s.position_ids[None],
                            "attention_mask": torch.ones(1, len(s), dtype=torch.long),
                            **({"pixel_values": s.pixel_values} if s.pixel_values is not None else {}),
                        },
                        form.device,
                        form.dtype,
                    )
                )
                .logits[0]
                .float()
            )
            cut = packed[start : start + len(s)].float()
            diff = max(diff, float((cut - alone).abs().max()))
            if i > 0:  # the first sub-sample sees nothing before it, leak or not
                leak = max(leak, float((leaked[start : start + len(s)].float() - alone).abs().max()))
            scale = max(scale, float(alone.abs().max()))
            agree += int((cut.argmax(-1) == alone.argmax(-1)).sum())
            total += len(s)
            start += len(s)
    atol, rtol = TOLERANCE[form.dtype]
    tolerance = atol + rtol * scale
    metrics = {
        "samples": len(samples),
        "row_tokens": length,
        "dtype": str(form.dtype).removeprefix("torch."),
        "max_abs_diff": diff,
        "tolerance": tolerance,
        "max_abs_logit": scale,
        "top1_agreement": agree / total,
        "leak_max_abs_diff": leak,
    }
    if not diff <= tolerance:  # also catches NaN
        return result(name, FAILED, f"max |packed - alone| {diff:.3g} > tolerance {tolerance:.3g}", **metrics)
    if not leak > diff:
        return result(
            name,
            FAILED,
            f"a leaking mask ({leak:.3g}) is no further from per-sample logits than packing",
            **metrics,
        )
    return result(name, PASSED, f"max |diff| {diff:.3g} <= {tolerance:.3g}", **metrics)


# -- 2. one pre-training step ----------------------------------------------------------------------------------
def step_batches(tokenizer: Any, preset: ModelPreset, form: Form, count: int) -> list[dict[str, Any]]:
    """`count` packed batches of `form.rows` rows of `form.row_tokens` tokens (pre-training labels)."""
    cfg = PackingConfig(
        max_tokens=form.row_tokens,
        max_tiles=max(1, form.row_tokens // (2 * preset.tokens_per_tile)),
        min_remaining=32,
    )
    packer = GreedyPacker(cfg)
    rng = random.Random(1)
    rows: list[list[EncodedSample]] = []
    i = 0
    need = count * form.rows
    while len(rows) < need:
        n_images = rng.choice([0, 1, 1, 2])
        tiles = [rng.randint(1, min(4, cfg.max_tiles)) for _ in range(n_images)]
        if sum(tiles) > cfg.max_tiles:
            tiles = [1] * min(n_images, cfg.max_tiles)
        words = rng.randint(form.row_tokens // 40, form.row_tokens // 8)
        (sample,) = make_samples(tokenizer, preset, [tiles], words=[words], mode="pretrain", seed=1000 + i)
        i += 1
        if len(sample) <= form.row_tokens:
            rows += packer.add(sample)
    return [
        pack_rows(rows[b * form.rows : (b + 1) * form.rows], form.row_tokens, tokenizer.pad_token_id)
        for b in range(count)
    ]


def check_train_step(
    model: torch.nn.Module,
    tokenizer: Any,
    preset: ModelPreset,
    form: Form,
    attn: str,
    peak_flops: float | None,
) -> dict[str, Any]:
    """One untimed warm-up step, then `form.steps` timed optimizer steps on packed rows.

    Mixed precision as DeepSpeed's bf16 mode trains: bf16 compute (autocast) over fp32 weights and AdamW
    states; pure bf16 weights would round most 1e-4 updates away.

    Args:
        peak_flops: the accelerator's dense bf16 peak in FLOP/s for MFU; None (CPU) reports no MFU.

    Returns:
        A result with `tokens_per_s` (real tokens), `step_s`, `loss` per step, `params`, the share of
        parameter tensors the steps changed and, on a GPU, `peak_memory_gib` and `mfu`.
    """
    name = "train-step"
    batches = step_batches(tokenizer, preset, form, 1 + form.steps)
    model.set_attn_implementation(attn)
    model.float().train()
    autocast = torch.autocast(form.device.type, dtype=form.dtype, enabled=form.dtype != torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in model.parameters())
    before = _checksums(params)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=form.device.type == "cuda")
    cuda = form.device.type == "cuda"
    losses: list[float] = []
    tokens = 0
    seconds = 0.0
    for i, batch in enumerate(batches):
        if cuda:
            torch.cuda.synchronize()
            if i == 1:
                torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        inputs = to_device(model_inputs(batch, attn, form.dtype), form.device, form.dtype)
        with autocast:
            logits = model(**inputs).logits
            loss = lm_loss(
                logits, batch["labels"].to(form.device), batch["sample_index"].to(form.device), "square"
            )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))  # synchronises
        if i > 0:
            seconds += time.perf_counter() - started
            tokens += int((batch["sample_index"] >= 0).sum())
        del logits, loss
    peak_memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else None  # before the checksums' copies
    changed = sum(a != b for a, b in zip(before, _checksums(params), strict=True)) / len(params)
    tokens_per_s = tokens / seconds
    metrics: dict[str, Any] = {
        "preset": preset.name,
        "dtype": "float32" if form.dtype == torch.float32 else "bfloat16 autocast, float32 weights",
        "attn_implementation": attn,
        "params": n_params,
        "rows_per_step": form.rows,
        "row_tokens": form.row_tokens,
        "timed_steps": form.steps,
        "tokens_per_step": tokens / form.steps,
        "step_s": seconds / form.steps,
        "tokens_per_s": tokens_per_s,
        "loss": losses,
        "params_changed": changed,
    }
    if peak_memory is not None:
        metrics["peak_memory_gib"] = peak_memory
        if peak_flops:
            metrics["peak_tflops"] = peak_flops / 1e12
            metrics["mfu"] = 6.0 * n_params * tokens_per_s / peak_flops
    if not all(map(_finite, losses)):
        return result(name, FAILED, f"non-finite loss: {losses}", **metrics)
    if changed < 0.5:  # a few tensors get no gradient (InternViT's mask token), most must move
        return result(
            name, FAILED, f"the steps changed only {changed:.0%} of the parameter tensors", **metrics
        )
    note = f"{tokens_per_s:,.0f} tokens/s"
    if "mfu" in metrics:
        note += f", MFU {metrics['mfu']:.1%}, peak {metrics['peak_memory_gib']:.1f} GiB"
    return result(name, PASSED, note, **metrics)


def _checksums(params: list[torch.Tensor]) -> list[float]:
    return [float(p.detach().double().sum()) for p in params]


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


# -- 3. all-reduce over two processes --------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def all_reduce_worker(rank: int, world: int, backend: str, port: int, out: str, mib: int) -> None:
    """One rank of the all-reduce check (top level, so `torch.multiprocessing.spawn` can pickle it)."""
    import datetime

    import torch.distributed as dist

    if backend == "nccl":
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        small = torch.full((1024,), float(rank + 1), device=device)
        dist.all_reduce(small)
        correct = bool((small == world * (world + 1) / 2).all())  # 1 + 2 + ... + world
        big = torch.ones(mib * 2**20 // 4, device=device)
        dist.all_reduce(big)  # warm-up
        if backend == "nccl":
            torch.cuda.synchronize()
        dist.barrier()
        started = time.perf_counter()
        repeats = 5
        for _ in range(repeats):
            dist.all_reduce(big)
        if backend == "nccl":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / repeats
        if rank == 0:
            size = big.numel() * 4
            Path(out).write_text(
                json.dumps(
                    {
                        "correct": correct,
                        "world_size": world,
                        "backend": backend,
                        "tensor_mib": mib,
                        "seconds": seconds,
                        # NCCL-tests' bus bandwidth of a ring all-reduce: size/time * 2(n-1)/n.
                        "bus_gb_per_s": size / seconds * 2 * (world - 1) / world / 1e9,
                    }
                )
            )
    finally:
        dist.destroy_process_group()


def check_all_reduce(form: Form) -> dict[str, Any]:
    """A 2-process all-reduce: NCCL over two GPUs (full form) or gloo on 127.0.0.1 (reduced form)."""
    name = f"all-reduce/{form.backend}"
    if form.backend == "nccl" and (count := torch.cuda.device_count()) < 2:
        return result(name, SKIPPED, f"one GPU ({count} visible); NCCL all-reduce needs two")
    import torch.multiprocessing as mp

    mib = 256 if form.backend == "nccl" else 4
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        mp.spawn(all_reduce_worker, args=(2, form.backend, _free_port(), str(out), mib), nprocs=2, join=True)
        found = json.loads(out.read_text())
    if not found.pop("correct"):
        return result(name, FAILED, "all-reduce gave a wrong sum", **found)
    return result(name, PASSED, f"bus bandwidth {found['bus_gb_per_s']:.1f} GB/s", **found)


# -- the runner ------------------------------------------------------------------------------------------------
def guarded(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one check; an exception is that check's failure (with its last traceback lines), not a crash."""
    try:
        return fn()
    except Exception as err:
        tail = "".join(traceback.format_exception(err)[-3:]).strip()
        return result(name, FAILED, f"{type(err).__name__}: {err}", traceback=tail)


def run_checks(
    *, reduced: bool = False, preset: str | None = None, peak_tflops: float | None = None
) -> dict[str, Any]:
    """Run every check in the form this machine supports.

    Args:
        reduced: force the reduced form on a GPU.
        preset: the model preset (default `1b` full, `tiny` reduced).
        peak_tflops: dense bf16 peak for MFU; default: the GPU's from `runtime.PEAK_BF16_FLOPS`, else 989.

    Returns:
        The report: form, environment, each check's result and `ok` (no check failed).
    """
    from vlpipe.components.training.runtime import peak_flops as known_peak

    form = pick_form(reduced, preset)
    started = time.perf_counter()
    peak: float | None = None
    if form.device.type == "cuda":
        peak = peak_tflops * 1e12 if peak_tflops else known_peak() or DEFAULT_PEAK_TFLOPS * 1e12
    checks: list[dict[str, Any]] = []
    try:
        model, tokenizer, preset_obj = build(form)
    except Exception as err:
        checks.append(result("build-model", FAILED, f"{type(err).__name__}: {err}"))
    else:
        for attn in ("sdpa", "flash_attention_2"):
            checks.append(
                guarded(
                    f"packed-logits/{attn}",
                    lambda attn=attn: check_packed_logits(model, tokenizer, preset_obj, form, attn),
                )
            )
        step_attn = "sdpa" if flash_attn_missing(form.device) else "flash_attention_2"
        checks.append(
            guarded(
                "train-step", lambda: check_train_step(model, tokenizer, preset_obj, form, step_attn, peak)
            )
        )
        del model
        if form.device.type == "cuda":
            torch.cuda.empty_cache()
    checks.append(guarded(f"all-reduce/{form.backend}", lambda: check_all_reduce(form)))
    return {
        "form": form.name,
        "preset": form.preset,
        "device": torch.cuda.get_device_name()
        if form.device.type == "cuda"
        else platform.processor() or "cpu",
        "gpus": torch.cuda.device_count(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, **_versions()},
        "seconds": round(time.perf_counter() - started, 1),
        "checks": checks,
        "ok": all(c["status"] != FAILED for c in checks),
    }


def _versions() -> dict[str, str]:
    import transformers

    found = {"transformers": transformers.__version__, "cuda": torch.version.cuda or "none"}
    if importlib.util.find_spec("flash_attn") is not None:
        from importlib.metadata import version

        found["flash_attn"] = version("flash_attn")
    return found


def format_metrics(metrics: dict[str, Any]) -> str:
    """The headline numbers of a check, on one line."""
    keys = (
        "max_abs_diff", "tolerance", "leak_max_abs_diff", "top1_agreement", "tokens_per_s", "step_s", "mfu",
        "peak_memory_gib", "params", "bus_gb_per_s",
    )  # fmt: skip
    shown = []
    for key in keys:
        if key in metrics:
            value = metrics[key]
            if key == "mfu":
                shown.append(f"mfu={value:.1%}")
            elif isinstance(value, float):
                shown.append(f"{key}={value:.3g}")
            else:
                shown.append(f"{key}={value:,}")
    return " ".join(shown)


def print_report(report: dict[str, Any], console: Any = None) -> None:
    """A table of the checks: rich when available (and given a console), plain text otherwise."""
    title = (
        f"gpu-check ({report['form']} form, {report['preset']}, {report['device']}, "
        f"torch {report['versions']['torch']}, {report['seconds']} s)"
    )
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        for c in report["checks"]:
            print(f"  {c['name']:<30} {c['status']:<8} {c['reason']}")
            if c["metrics"]:
                print(f"  {'':<30} {'':<8} {format_metrics(c['metrics'])}")
        return
    table = Table(title=title)
    for column in ("check", "status", "reason", "metrics"):
        table.add_column(column, overflow="fold")
    colour = {PASSED: "green", FAILED: "red", SKIPPED: "yellow"}
    for c in report["checks"]:
        status = f"[{colour[c['status']]}]{c['status']}[/]"
        table.add_row(c["name"], status, c["reason"], format_metrics(c["metrics"]))
    (console or Console(width=None if sys.stdout.isatty() else 160)).print(table)


def main(argv: list[str] | None = None) -> int:
    """`python -m vlpipe.components.training.gpu_check [--out DIR] [--reduced] [--preset P] [--peak-tflops F]`.

    Returns:
        0 when no check failed (skipped checks do not fail the run), else 1.
    """
    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", default=os.path.join(os.environ.get("VLPIPE_HOME", ".vlpipe"), "gpu-check"))
    parser.add_argument("--reduced", action="store_true", help="the CPU form (tiny, fp32, SDPA) on a GPU too")
    parser.add_argument("--preset", default=None, help="model preset (default: 1b on a GPU, tiny on a CPU)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU")
    args = parser.parse_args(argv)
    report = run_checks(reduced=args.reduced, preset=args.preset, peak_tflops=args.peak_tflops)
    return finish(report, Path(args.out))


def finish(report: dict[str, Any], out: Path, console: Any = None) -> int:
    """Print the table, write `out/report.json`; the exit status (1 when a check failed, skipped or not)."""
    report["ok"] = all(c["status"] != FAILED for c in report["checks"])
    print_report(report, console)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {out / 'report.json'}", flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    # Run the copy imported under its package name, so spawned all-reduce workers unpickle
    # `vlpipe.components.training.gpu_check.all_reduce_worker`, not a function of `__main__`.
    from vlpipe.components.training import gpu_check

    sys.exit(gpu_check.main())
