"""The Best-of-N evaluation entrypoint: validate → load → evaluate → save → log, top to bottom.

For each benchmark item: a greedy answer (pass@1; greedy answers of `batch_items` items in one batch) and N
sampled answers (the prompt repeated N times in one batch, seeded per item), both with KV-cache generation on
V2PE positions (`vlpipe.model.generate`) and the training image processing (`vlpipe.model.image.process_image` with the
checkpoint's settings); the PRM scores every step of the N answers in one padded forward
(`vlpipe.serving.scoring`); the best aggregated score picks the answer (ties → earliest sample); final
answers are extracted and checked per benchmark format (`vlpipe.components.evaluate.benchmarks`); metrics are pure
functions of the per-item outcomes (`vlpipe.components.evaluate.metrics`).

Two halves, so the work can be spread over pods: `evaluate_shards` evaluates shards of the benchmarks (contiguous
runs of whole generation batches) and writes their per-item results (a part); `merge_evaluation` computes
everything else from the union of the parts. `run_evaluation` is both in one process, so a one-pod run and a
K-pod run go through the same code and give the same numbers (docs/evaluation.md#sharded-evaluation).

Writes `metrics.json`, `items.jsonl`, `skipped.json`, `config.json` and `best_of_k*.png` to `output_dir`, and
records an MLflow run (params, metrics with Best-of-k at step k, the files above and a per-item table).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from vlpipe.components.evaluate.benchmarks import (
    BenchmarkError,
    BenchmarkItem,
    LoadedBenchmark,
    SkippedRow,
    load_benchmark,
)
from vlpipe.components.evaluate.config import (
    OVERALL,
    EvalConfig,
    EvalShard,
    protocol_label,
    protocol_record,
)
from vlpipe.components.evaluate.judge import OpenAIJudge
from vlpipe.components.evaluate.metrics import (
    ItemOutcome,
    compute_metrics,
    ks_for,
    majority_vote,
    select_best,
)
from vlpipe.components.evaluate.plot import plot_best_of_k
from vlpipe.model.checkpoint import LoadedModel, load_checkpoint
from vlpipe.model.conversation import ConversationEncoder, EncodedSample
from vlpipe.model.errors import SampleError
from vlpipe.model.generate import generate
from vlpipe.model.image import decode_image
from vlpipe.model.prompt import generation_prompt, image_pixels
from vlpipe.model.storage import is_remote, upload_dir
from vlpipe.model.tokenizer import IM_END
from vlpipe.serving.scoring import PRMScorer
from vlpipe.tracking.runs import Run, tracking_uri

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SCALAR_METRICS = (
    "items",
    "rows",
    "pass_at_1",
    "best_of_n",
    "majority",
    "oracle",
    "sample_accuracy",
    "prm_score_correct_mean",
    "prm_score_incorrect_mean",
)
_PER_K_METRICS = ("best_of_k", "majority_at_k", "oracle_at_k")


def item_seed(seed: int, benchmark: str, item_id: str) -> int:
    """The sampling seed of one item: stable across runs, limits, batch sizes and benchmark order."""
    digest = hashlib.sha256(f"{seed}:{benchmark}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


@dataclass
class PreparedItem:
    """An item ready for generation and scoring."""

    item: BenchmarkItem
    prompt: EncodedSample  # the policy's generation prompt, with its pixel values
    prm_tiles: list[int]
    prm_pixels: torch.Tensor | None


def prepare_item(
    item: BenchmarkItem, policy: LoadedModel, encoder: ConversationEncoder, prm: LoadedModel
) -> PreparedItem:
    """Decode and process the item's images for each model and encode the policy's generation prompt.

    Args:
        item: the benchmark item.
        policy: the policy checkpoint (its image settings, tokens per tile and V2PE δ apply to the prompt).
        encoder: the policy's conversation encoder (`max_length` caps the prompt).
        prm: the PRM checkpoint (its own image settings apply to its pixels).

    Raises:
        SampleError: an image does not decode, or the prompt is longer than `max_length` (`too_long`).
    """
    images = [
        decode_image(data, source=f"{item.benchmark}:{item.item_id} image {i}")
        for i, data in enumerate(item.images)
    ]
    prompt = generation_prompt(
        encoder, policy, [("human", item.prompt_text)], images, sample_id=item.item_id, frames=item.frames
    )
    if prm is policy:
        prm_tiles, prm_pixels = prompt.num_tiles, prompt.pixel_values
    else:
        prm_tiles, prm_pixels = image_pixels(images, prm.image_cfg, frames=item.frames)
    return PreparedItem(item, prompt, prm_tiles, prm_pixels)


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else value


class _Evaluator:
    """Holds the models and settings; evaluates a benchmark batch by batch."""

    def __init__(self, config: EvalConfig, policy: LoadedModel, prm: LoadedModel) -> None:
        self.config = config
        self.policy = policy
        self.tokenizer = policy.tokenizer
        self.encoder = ConversationEncoder(
            policy.tokenizer, policy.tokens_per_tile, config.max_length, mode="sft"
        )
        self.prm = prm
        self.scorer = PRMScorer(prm, config.aggregation)
        # The judge serves only the VLMEvalKit protocols (the others have no judge step).
        uses_judge = any(str(b.protocol).startswith("vlmevalkit") for b in config.benchmarks)
        self.judge = OpenAIJudge(config.judge) if config.judge is not None and uses_judge else None
        self.eos_id = int(policy.tokenizer.convert_tokens_to_ids(IM_END))
        self.pad_id = int(policy.tokenizer.pad_token_id)

    def _generate(self, prompts: list[EncodedSample], *, sample: bool, seed: int | None = None) -> list[str]:
        c = self.config
        ids = generate(
            self.policy.model,
            prompts,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            max_new_tokens=c.max_new_tokens,
            do_sample=sample,
            temperature=c.temperature,
            top_p=c.top_p,
            seed=seed,
        )
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in ids]

    def evaluate(self, loaded: LoadedBenchmark) -> tuple[list[dict], list[SkippedRow]]:
        """Evaluate every item of a loaded benchmark (or of a shard's slice of it); returns the per-item
        records and the items skipped while preparing (e.g. prompts longer than `max_length`)."""
        c = self.config
        records: list[dict] = []
        skipped: list[SkippedRow] = []
        for batch in _chunks(loaded.items, c.batch_items):
            prepared = []
            for item in batch:
                try:
                    prepared.append(prepare_item(item, self.policy, self.encoder, self.prm))
                except SampleError as exc:
                    skipped.append(
                        SkippedRow(item.benchmark, loaded.spec.path, item.item_id, exc.reason, exc.detail)
                    )
            if not prepared:
                continue
            greedy = self._generate([p.prompt for p in prepared], sample=False)
            records += [self._evaluate_item(p, text) for p, text in zip(prepared, greedy, strict=True)]
        return records, skipped

    def _evaluate_item(self, p: PreparedItem, greedy_text: str) -> dict:
        c, item = self.config, p.item
        if self.judge is not None:  # replies cached per item: the same verdicts in any shard
            self.judge.clear_cache()
        texts = self._generate(
            [p.prompt] * c.n, sample=True, seed=item_seed(c.seed, item.benchmark, item.item_id)
        )
        scored = self.scorer.score_answers(
            item.prompt_text, texts, p.prm_tiles, p.prm_pixels, f"{item.benchmark}:{item.item_id}"
        )
        extracted = [item.extract(t, self.judge) for t in texts]
        correct = [item.is_correct(e) for e in extracted]
        greedy_extracted = item.extract(greedy_text, self.judge)
        outcome = ItemOutcome(
            benchmark=item.benchmark,
            item_id=item.item_id,
            greedy_correct=item.is_correct(greedy_extracted),
            sample_answers=tuple(extracted),
            sample_correct=tuple(correct),
            sample_scores=tuple(s.score for s in scored),
            group=item.group,
        )
        chosen = select_best(outcome.sample_scores)
        vote = majority_vote(outcome.sample_answers)
        record = {
            "benchmark": item.benchmark,
            "id": item.item_id,
            "group": item.group,
            "question": item.question,
            "reference": item.raw_answer,
            "reference_canonical": item.answer,
            "greedy": {
                "answer": greedy_text,
                "extracted": greedy_extracted,
                "correct": outcome.greedy_correct,
            },
            "samples": [
                {
                    "answer": text,
                    "steps": list(s.steps),
                    "step_scores": list(s.step_scores),
                    "score": _finite(s.score),
                    "extracted": e,
                    "correct": ok,
                }
                for text, s, e, ok in zip(texts, scored, extracted, correct, strict=True)
            ],
            "chosen": chosen,
            "chosen_correct": correct[chosen],
            "majority_answer": None if vote is None else extracted[vote],
            "majority_correct": vote is not None and correct[vote],
            "oracle": any(correct),
        }
        return record


def _table(records: list[dict]) -> dict[str, list]:
    """Per-item columns for `mlflow.log_table` (lists as JSON strings, so every cell is a scalar)."""
    return {
        "benchmark": [r["benchmark"] for r in records],
        "id": [r["id"] for r in records],
        "question": [r["question"] for r in records],
        "reference": [r["reference"] for r in records],
        "greedy_answer": [r["greedy"]["answer"] for r in records],
        "greedy_correct": [r["greedy"]["correct"] for r in records],
        "answers": [json.dumps([s["answer"] for s in r["samples"]]) for r in records],
        "step_scores": [json.dumps([s["step_scores"] for s in r["samples"]]) for r in records],
        "scores": [json.dumps([s["score"] for s in r["samples"]]) for r in records],
        "extracted": [json.dumps([s["extracted"] for s in r["samples"]]) for r in records],
        "chosen": [r["chosen"] for r in records],
        "chosen_answer": [r["samples"][r["chosen"]]["answer"] for r in records],
        "chosen_correct": [r["chosen_correct"] for r in records],
        "majority_correct": [r["majority_correct"] for r in records],
        "oracle": [r["oracle"] for r in records],
    }


def _mlflow_metrics(metrics: dict) -> list[tuple[str, float, int]]:
    out: list[tuple[str, float, int]] = []
    scopes = [(OVERALL, metrics[OVERALL]), *metrics["benchmarks"].items()]
    for scope, summary in scopes:
        for key in _SCALAR_METRICS:
            if summary.get(key) is not None:
                out.append((f"{scope}/{key}", float(summary[key]), 0))
        for key in _PER_K_METRICS:
            for k, value in summary[key].items():
                out.append((f"{scope}/{key}", float(value), int(k)))
        out.append((f"{scope}/skipped", float(summary["skipped"]), 0))
        out.append((f"{scope}/items_per_second", float(summary["items_per_second"]), 0))
    return out


def _params(config: EvalConfig) -> dict[str, str]:
    params = {
        key: str(value)
        for key, value in config.model_dump(exclude={"benchmarks", "mlflow"}).items()
        if value is not None
    }
    for b in config.benchmarks:
        for key, value in b.model_dump(exclude={"name"}).items():
            if value is not None:
                params[f"benchmark.{b.name}.{key}"] = str(value)[:6000]
    return params


def _report_skipped(console: Console, rows: Sequence[SkippedRow], show: int = 10) -> None:
    for i, row in enumerate(rows):
        logger.warning("skipped %s item %s: %s: %s", row.benchmark, row.item_id, row.reason, row.detail)
        if i < show:
            console.print(
                f"  skipped {row.benchmark} item {row.item_id}: {row.reason}: {row.detail}", soft_wrap=True
            )
    if len(rows) > show:
        console.print(f"  ... and {len(rows) - show} more skipped rows (all in skipped.json)")


def _progress(console: Console, name: str, done: int, total: int, started: float) -> None:
    rate = done / max(time.perf_counter() - started, 1e-9)
    console.print(f"  {name}: {done}/{total} items ({rate:.2f} items/s)")


PART_FILE = "part.json"
"""A part's manifest (beside its `items.jsonl`): the config it ran, its shards and their skipped rows."""


def config_digest(config: EvalConfig) -> str:
    """What a part's numbers depend on: the config without `output_dir` and `mlflow` (the merge checks that
    every part ran the same)."""
    settings = config.model_dump(mode="json", exclude={"output_dir", "mlflow"})
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def evaluate_shards(
    config: EvalConfig, shards: Sequence[EvalShard], part_dir: str | Path, console: Console | None = None
) -> dict:
    """Evaluate some shards of the benchmarks and write their per-item results (a part) to `part_dir`.

    A shard is a contiguous run of whole generation batches of one benchmark (`EvalShard.batch_range`), so
    every greedy batch has the items, and the left padding, it has in a one-pod run; every other random
    choice is per item (`item_seed`; the judge's reply cache is per item). `merge_evaluation` turns the
    parts into the numbers.

    Args:
        config: the validated settings.
        shards: what to evaluate (`config.shard_plan` for the pipeline's tasks; each benchmark's
            `EvalShard(name, 0, 1)` for all of it).
        part_dir: a local directory for `items.jsonl` and `part.json`.
        console: where progress goes; default a console on stderr.

    Returns:
        The manifest written to `part.json`: `config`, `config_digest`, `judge_calls` and `shards` (each
        with `benchmark`, `index`, `count`, `items` evaluated, `skipped` rows, `seconds`).

    Raises:
        FileNotFoundError: a benchmark file or checkpoint does not exist.
        BenchmarkError: a benchmark is empty or has no usable row, or has fewer batches than shards.
    """
    console = console or Console(stderr=True)
    config = EvalConfig.model_validate(config.model_dump())
    specs = {b.name: b for b in config.benchmarks}
    unknown = sorted({s.benchmark for s in shards} - set(specs))
    if unknown:
        raise BenchmarkError(f"shards name benchmarks the config does not have: {', '.join(unknown)}")

    # 1. Benchmarks first: bad input fails before any model is loaded. Rows skipped while loading are the
    # whole file's: shard 0 of the benchmark reports them.
    loaded = {name: load_benchmark(specs[name]) for name in dict.fromkeys(s.benchmark for s in shards)}
    slices = []
    for shard in shards:
        b = loaded[shard.benchmark]
        batches = math.ceil(len(b.items) / config.batch_items)
        try:
            picked = shard.batch_range(batches)
        except ValueError as exc:
            raise BenchmarkError(f"{exc} ({len(b.items)} items in {b.spec.path})") from None
        items = b.items[picked.start * config.batch_items : picked.stop * config.batch_items]
        slices.append((shard, b, items, list(b.skipped) if shard.index == 0 else []))
        reasons = Counter(row.reason for row in b.skipped)
        console.print(
            f"benchmark {b.spec.name} ({protocol_label(b.spec, config.judge)}) shard {shard.index + 1}/"
            f"{shard.count}: {len(items)} of {len(b.items)} items from {b.spec.path}, {len(b.skipped)} skipped"
            + (f" ({', '.join(f'{r}: {n}' for r, n in sorted(reasons.items()))})" if reasons else "")
        )
    _report_skipped(console, [row for *_, rows in slices for row in rows])

    # 2. Models.
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
    )
    dtype = _DTYPES[config.dtype]
    console.print(f"loading policy {config.policy} and PRM {config.prm} on {device}")
    policy = load_checkpoint(config.policy, dtype=dtype, device=device)
    prm = policy if config.prm == config.policy else load_checkpoint(config.prm, dtype=dtype, device=device)
    evaluator = _Evaluator(config, policy, prm)

    # 3. Evaluate, shard by shard, into the part.
    part_dir = Path(part_dir)
    part_dir.mkdir(parents=True, exist_ok=True)
    manifest_shards = []
    with (part_dir / "items.jsonl").open("w", encoding="utf-8") as f:
        for shard, b, items, skipped in slices:
            t0 = time.perf_counter()
            records, bad = evaluator.evaluate(LoadedBenchmark(b.spec, items))
            seconds = time.perf_counter() - t0
            _report_skipped(console, bad)
            _progress(
                console, f"{b.spec.name} shard {shard.index + 1}/{shard.count}", len(records), len(items), t0
            )
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            manifest_shards.append(
                {
                    **shard.model_dump(),
                    "items": len(records),
                    "skipped": [row.to_dict() for row in [*skipped, *bad]],
                    "seconds": seconds,
                }
            )
    manifest = {
        "config": config.model_dump(mode="json"),
        "config_digest": config_digest(config),
        "judge_calls": evaluator.judge.calls if evaluator.judge is not None else 0,
        "shards": manifest_shards,
    }
    (part_dir / PART_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def outcome_of(record: dict) -> ItemOutcome:
    """An item's outcome, read back from its `items.jsonl` record (a null score is a NaN one)."""
    samples = record["samples"]
    return ItemOutcome(
        benchmark=record["benchmark"],
        item_id=record["id"],
        greedy_correct=record["greedy"]["correct"],
        sample_answers=tuple(s["extracted"] for s in samples),
        sample_correct=tuple(s["correct"] for s in samples),
        sample_scores=tuple(math.nan if s["score"] is None else s["score"] for s in samples),
        group=record["group"],
    )


def read_parts(config: EvalConfig, parts: Sequence[str | Path]) -> list[tuple[dict, list[dict]]]:
    """Every shard's manifest entry and records, in the order of a one-pod run (benchmarks as configured, each
    one's shards by index).

    Raises:
        BenchmarkError: a part ran other settings, a shard is missing or appears twice, or the shards of a
            benchmark disagree on their count (each message names the part or shard).
    """
    found: dict[tuple[str, int], tuple[dict, list[dict]]] = {}
    counts: dict[str, set[int]] = {}
    digest = config_digest(config)
    for part in parts:
        manifest = json.loads((Path(part) / PART_FILE).read_text())
        if manifest["config_digest"] != digest:
            raise BenchmarkError(
                f"evaluation part {part} ran other settings than the merge's; merge the parts of one evaluation"
            )
        with (Path(part) / "items.jsonl").open(encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        start = 0
        for entry in manifest["shards"]:
            key = (entry["benchmark"], entry["index"])
            if key in found:
                raise BenchmarkError(
                    f"shard {entry['index']} of benchmark {entry['benchmark']!r} appears twice ({part})"
                )
            found[key] = (entry, records[start : start + entry["items"]])
            counts.setdefault(entry["benchmark"], set()).add(entry["count"])
            start += entry["items"]
    ordered = []
    for b in config.benchmarks:
        if len(counts.get(b.name, ())) != 1:
            raise BenchmarkError(
                f"benchmark {b.name!r}: the parts hold {'no shard' if b.name not in counts else 'shards of different counts'}"
                " of it; merge every shard of one evaluation"
            )
        (count,) = counts[b.name]
        missing = [i for i in range(count) if (b.name, i) not in found]
        if missing:
            raise BenchmarkError(
                f"benchmark {b.name!r}: shards {missing} of {count} are missing from the parts"
            )
        ordered += [found[(b.name, i)] for i in range(count)]
    return ordered


def run_evaluation(config: EvalConfig, console: Console | None = None) -> dict:
    """Run the Best-of-N evaluation described by `config` in this process: every benchmark as one shard, then
    the merge (the pipeline's `evaluate-shard` tasks and `merge-evaluation` do the same in pods).

    Args:
        config: the validated settings (validated again here: a config built elsewhere may be stale).
        console: where progress goes; default a console on stderr.

    Returns:
        `merge_evaluation`'s metrics.

    Raises:
        FileNotFoundError: a benchmark file or checkpoint does not exist.
        BenchmarkError: a benchmark is empty or has no usable row (the message names the file).
    """
    console = console or Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="vlpipe-eval-part-") as part:
        whole = [EvalShard(benchmark=b.name, index=0, count=1) for b in config.benchmarks]
        evaluate_shards(config, whole, part, console)
        return merge_evaluation(config, [part], console)


def merge_evaluation(config: EvalConfig, parts: Sequence[str | Path], console: Console | None = None) -> dict:
    """The metrics, per-item table, files, plots and MLflow run of an evaluation from its parts
    (`evaluate_shards` outputs): the same numbers whether the shards ran in one process or in K pods.

    Args:
        config: the settings every part ran (checked), with this step's `output_dir` and `mlflow`.
        parts: the part directories, in any order.
        console: where progress goes; default a console on stderr.

    Returns:
        The metrics (as also written to `<output_dir>/metrics.json`): `benchmarks` (per benchmark) and `overall`
        scopes (see `vlpipe.components.evaluate.metrics.summarize`, plus `skipped`, `skipped_reasons`,
        `items_per_second`), `n`, `ks`, `aggregation`, `evaluated_items`, `seconds` (evaluation time summed
        over the shards), `items_per_second`, `skipped` (every skipped row with its reason), `output_dir`
        and `mlflow` (tracking URI, experiment and run id).

    Raises:
        BenchmarkError: a benchmark has no evaluated item, or see `read_parts`.
    """
    console = console or Console(stderr=True)
    config = EvalConfig.model_validate(config.model_dump())
    shards = read_parts(config, parts)
    records = [record for _, recs in shards for record in recs]
    skipped = [row for entry, _ in shards for row in entry["skipped"]]
    per_benchmark_seconds: dict[str, float] = Counter()
    for entry, _ in shards:
        per_benchmark_seconds[entry["benchmark"]] += entry["seconds"]
    for b in config.benchmarks:
        if not any(r["benchmark"] == b.name for r in records):
            raise BenchmarkError(
                f"benchmark {b.name!r}: no item of {b.path} could be evaluated "
                f"({sum(row['benchmark'] == b.name for row in skipped)} skipped; see the skipped reasons)"
            )
    judge_calls = sum(json.loads((Path(p) / PART_FILE).read_text())["judge_calls"] for p in parts)

    # 1. Set up: output directory, MLflow run.
    staging = Path(tempfile.mkdtemp(prefix="vlpipe-eval-")) if is_remote(config.output_dir) else None
    out = staging or Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = config.mlflow
    protocols = {b.name: protocol_label(b, config.judge) for b in config.benchmarks}
    protocol_tags = {
        "protocol": protocol_record(config),
        **{f"protocol.{k}": v for k, v in protocols.items()},
    }
    run = Run()
    run.start(
        settings.run_name or f"eval-{Path(config.policy.rstrip('/')).name}",
        experiment=settings.experiment,
        recipe=settings.tags.get("recipe"),
        parent_run_id=settings.parent_run_id,
        stage="eval",
        tags={**settings.tags, **protocol_tags},
        params=_params(config),
    )
    try:
        config_json = config.model_dump_json(indent=2)
        (out / "config.json").write_text(config_json + "\n")
        run.log_artifact(out / "config.json", "eval")

        # 2. Metrics and files, from the union of the shards' items.
        seconds = sum(per_benchmark_seconds.values())
        ks = ks_for(config.n)
        metrics = compute_metrics([outcome_of(r) for r in records], ks)
        counts = Counter((row["benchmark"], row["reason"]) for row in skipped)
        for name, summary in metrics["benchmarks"].items():
            reasons = {reason: n for (bench, reason), n in sorted(counts.items()) if bench == name}
            summary["skipped"] = sum(reasons.values())
            summary["skipped_reasons"] = reasons
            summary["items_per_second"] = summary["items"] / max(per_benchmark_seconds[name], 1e-9)
            summary["protocol"] = protocols[name]
        metrics[OVERALL]["skipped"] = len(skipped)
        metrics[OVERALL]["skipped_reasons"] = dict(sorted(Counter(row["reason"] for row in skipped).items()))
        metrics[OVERALL]["items_per_second"] = len(records) / max(seconds, 1e-9)
        metrics.update(
            n=config.n,
            ks=ks,
            aggregation=config.aggregation,
            protocol=protocol_tags["protocol"],
            judge=(
                {"model": config.judge.model, "base_url": config.judge.base_url, "calls": judge_calls}
                if config.judge is not None
                and any(str(b.protocol).startswith("vlmevalkit") for b in config.benchmarks)
                else None
            ),
            shards={b.name: b.shards for b in config.benchmarks},
            evaluated_items=len(records),
            seconds=round(seconds, 3),
            items_per_second=len(records) / max(seconds, 1e-9),
            skipped=skipped,
            output_dir=config.output_dir,
            mlflow={
                "tracking_uri": tracking_uri(),
                "experiment_id": run.experiment_id,
                "run_id": run.run_id,
            },
        )
        metrics = json.loads(json.dumps(metrics))  # what metrics.json holds: string keys for k
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        with (out / "items.jsonl").open("w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        (out / "skipped.json").write_text(json.dumps(metrics["skipped"], indent=2) + "\n")
        plots = [plot_best_of_k(metrics[OVERALL], out / "best_of_k.png", "all benchmarks")]
        if len(metrics["benchmarks"]) > 1:
            plots += [
                plot_best_of_k(summary, out / f"best_of_k_{name}.png", name)
                for name, summary in metrics["benchmarks"].items()
            ]

        # 3. Log.
        run.log_metric_series(
            [*_mlflow_metrics(metrics), ("items_per_second", metrics["items_per_second"], 0)]
        )
        for name in ("metrics.json", "items.jsonl", "skipped.json"):
            run.log_artifact(out / name, "eval")
        for plot in plots:
            run.log_artifact(plot, "eval/plots")
        run.log_table(_table(records), "eval/items_table.json")
        if staging is not None:
            upload_dir(staging, config.output_dir)
    except BaseException:
        run.finish("FAILED")
        raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    run.finish("FINISHED")
    o = metrics[OVERALL]
    console.print(
        f"evaluated {len(records)} items ({metrics['items_per_second']:.2f} items/s): pass@1 {o['pass_at_1']:.3f}, "
        f"Best-of-{config.n} {o['best_of_n']:.3f}, majority {o['majority']:.3f}, oracle {o['oracle']:.3f}; "
        f"{len(skipped)} skipped; MLflow run {run.run_id}"
    )
    return metrics
