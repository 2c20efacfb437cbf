"""On-policy PRM data: sample solutions from the policy and label every step (VisualPRM's data recipe).

A PRM judges the policy's own answers at Best-of-N time, so it learns best from the policy's own mistakes:
for each source item this samples N solutions from the policy (temperature T, seeded per item), splits them
into steps, and labels each step. Labellers:

* `reference_steps`: a step is correct while it matches the item's reference solution step for step (exact
  text), wrong from the first mismatch on. Right for templated synthetic tasks.
* `demo_reference`: the same, but a step's listed items may come in any order
  (`vlpipe.model.data.reasoning.canonical_step`): the demo task's labeller.
* `demo_local`: the demo task's step-local labeller (`vlpipe.model.data.reasoning.local_step_labels`): step 1 is
  right when it lists as many shapes of the asked colour or kind as the image has, steps 2 and 3 when they
  follow from the step before. It is what Monte Carlo labels approach on this task and separates perception
  from following the steps (score answers with `min`); measured, it picks no better than `final_answer`
  (docs/results.md).
* `final_answer`: every step takes the label of the final answer (weak supervision; the answer is read with
  the demo's rule, `vlpipe.model.data.reasoning.extract_answer`: a last line "So the answer is N.").

VisualPRM400K labels steps by Monte Carlo rollouts (the share of continuations from a step prefix that reach
the right answer); that needs many more generations and is not implemented here.

Output: JSONL `{id, image, question, steps, labels, answer, final_correct}` (the PRM stage's input), with
duplicate solutions of an item written once; `include` files (e.g. curated step-labelled data) are appended.

Sharding: `sample_prm_shard` samples one of `shards` contiguous runs of whole generation batches into a part;
`merge_prm_data` concatenates the parts in order, appends the includes and adds up the counts. A batch's seed is
a function of the global seed and its first item, and every batch has the same items in any shard, so K shards
merged write the same file as one (`sample_prm_data`, which is shard 0 of 1 and the merge).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger(__name__)


class PRMSampleConfig(BaseModel):
    """Settings of on-policy PRM data generation.

    Attributes:
        policy: the policy checkpoint whose answers the PRM will judge.
        source: JSONL `{id, image, question, answer, solution}` (the demo's reasoning split format) or SFT
            conversations; `image` a path, a list of paths, or absent (text-only).
        image_root: root of the relative `image` paths; default `images/` beside the JSONL's directory.
        output: the step-labelled JSONL to write (local path).
        n: solutions sampled per item.
        temperature, top_p: sampling settings (use the evaluation's).
        max_new_tokens: length cap of a solution.
        seed: sampling seed (per item: hash of seed and item id).
        limit: use the first `limit` items.
        batch_items: items whose N samples are generated in one batch.
        labeler: `reference_steps`, `demo_reference`, `demo_local` or `final_answer` (see the module docstring).
        include: step-labelled JSONL files appended to the output unchanged.
        max_bad_fraction: fail when more than this share of the source's records is unusable.
        shards: K, the pods the items are spread over in a pipeline (`sample-prm-data-shard` tasks, then
            `merge-prm-data`), each a contiguous run of whole batches of `batch_items`; 1: no fan-out.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: str = Field(min_length=1)
    source: str = Field(min_length=1)
    image_root: str | None = None
    output: str = Field(min_length=1)
    n: int = Field(8, ge=1, le=256)
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(256, ge=1)
    seed: int = 0
    limit: int | None = Field(None, ge=1)
    batch_items: int = Field(8, ge=1)
    labeler: Literal["reference_steps", "demo_reference", "demo_local", "final_answer"] = "final_answer"
    max_bad_fraction: float = Field(0.05, ge=0, le=1)
    include: tuple[str, ...] = ()
    shards: int = Field(1, ge=1, le=256)

    @model_validator(mode="after")
    def _shards_fit(self) -> PRMSampleConfig:
        if self.limit is not None and self.shards > math.ceil(self.limit / self.batch_items):
            raise ValueError(
                f"shards ({self.shards}) exceeds the generation batches (limit {self.limit} / batch_items "
                f"{self.batch_items}, rounded up); every shard needs a whole batch: lower shards or batch_items"
            )
        return self


def shard_batches(index: int, count: int, batches: int) -> range:
    """The batches shard `index` of `count` samples: balanced contiguous runs, in order.

    Raises:
        ValueError: more shards than batches, or an index out of range.
    """
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} must be in [0, {count})")
    if count > batches:
        raise ValueError(
            f"shards ({count}) exceeds the {batches} generation batches; lower shards or batch_items"
        )
    return range(index * batches // count, (index + 1) * batches // count)


def source_images(record: dict) -> list[str] | str:
    """The image paths of a source record ([] for text-only: no `image` key), or the reason they are wrong."""
    if "image" not in record:
        return []
    image = record["image"]
    if isinstance(image, str) and image.strip():
        return [image]
    if isinstance(image, list) and image and all(isinstance(i, str) and i.strip() for i in image):
        return list(image)
    return "key 'image' must be a non-empty path or list of paths (leave it out for a text-only item)"


def normalise_source(record: dict) -> dict | str:
    """A source record as `{id, image?, question, answer, solution}`, or the reason it cannot be used.

    Two formats are read: the demo's evaluation format (`question`, `answer`, `solution`) and the
    conversation format of SFT data (`conversations`: a human turn with the question, then a gpt turn with the
    reference solution; `answer` optional, else the solution's final line "So the answer is N."). The
    question keeps its `<image>` placeholders where the record has them, except a single image's leading
    `<image>\n` (InternVL's default place, where `place_image_placeholders` puts it back); a question without
    placeholders gets one per image in front when it is prompted.
    """
    if isinstance(record.get("conversations"), list) and "question" not in record:
        turns = record["conversations"]
        if len(turns) < 2 or not all(isinstance(t, dict) for t in turns[:2]):
            return "conversations need a human turn and a gpt turn"
        human, gpt = turns[0], turns[1]
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            return "the first two turns must be human then gpt"
        from vlpipe.model.data.reasoning import extract_answer

        solution = str(gpt.get("value") or "")
        question = str(human.get("value") or "")
        if question.startswith("<image>\n") and question.count("<image>") == 1:
            question = question.removeprefix("<image>\n")
        record = {
            **record,
            "question": question.strip(),
            "solution": solution,
            "answer": record.get("answer") or extract_answer(solution) or "",
        }
    if not isinstance(record.get("answer"), str | int):
        return "key 'answer' must be a string"
    record = {**record, "answer": str(record["answer"])}
    images = source_images(record)
    if isinstance(images, str):
        return images
    for key in ("question", "answer", "solution"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            hint = (
                " (add an 'answer' key or end the solution with 'So the answer is N.')"
                if key == "answer"
                else ""
            )
            return f"key {key!r} must be a non-empty string{hint}"
    # Imported here: the recipe schema imports this module, and objectives imports torch.
    from vlpipe.objectives.prm import place_image_placeholders

    try:
        place_image_placeholders(record["question"], len(images))
    except ValueError as exc:
        return str(exc)
    return record


def _labeller_check(labeler: str) -> Callable[[dict], str | None]:
    """What a source record needs for `labeler` (demo labellers: a demo question and scene description)."""

    def check(record: dict) -> str | None:
        if labeler not in ("demo_local", "demo_reference"):
            return None
        from vlpipe.model.data.reasoning import parse_describe_step, parse_question
        from vlpipe.objectives.prm import split_steps

        if labeler == "demo_local" and parse_question(record["question"]) is None:
            return f"the {labeler} labeller needs a demo counting question, got {record['question'][:80]!r}"
        steps = split_steps(record["solution"])
        if not steps or parse_describe_step(steps[0]) is None:
            return f"the {labeler} labeller needs a demo solution whose step 1 lists the shapes"
        return None

    return check


def label(
    steps: list[str], reference: list[str], final_correct: bool, labeler: str, question: str | None = None
) -> list[bool]:
    """Per-step labels of a sampled solution (see the module docstring); `demo_local` needs the question.

    Raises:
        ValueError: for `demo_local` when the question or the reference is not the demo task's.
    """
    if labeler == "final_answer":
        return [final_correct] * len(steps)
    if labeler == "demo_local":
        from vlpipe.model.data.reasoning import local_step_labels, parse_question

        parsed = parse_question(question or "")
        if parsed is None:
            raise ValueError(f"the demo_local labeller needs a demo counting question, got {question!r}")
        return local_step_labels(parsed, steps, reference)
    if labeler == "demo_reference":
        from vlpipe.model.data.reasoning import canonical_step as canonical
    else:
        canonical = str.strip
    labels, ok = [], True
    for i, step in enumerate(steps):
        ok = ok and i < len(reference) and canonical(step) == canonical(reference[i])
        labels.append(ok)
    if labels and labels[-1] and not final_correct:  # matched every reference step but answered wrong
        labels[-1] = False
    return labels


PART_FILE = "part.json"
_COUNTS = ("items", "solutions", "duplicate_solutions", "empty_solutions", "positive_steps", "negative_steps",
           "final_correct", "skipped_items")  # fmt: skip


def _digest(config: PRMSampleConfig) -> str:
    settings = config.model_dump(mode="json", exclude={"output"})
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def sample_prm_data(config: PRMSampleConfig, progress: bool = True) -> dict:
    """Write on-policy step-labelled solutions in this process (shard 0 of 1, then the merge); returns counts.

    Counts: `items`, `solutions` (written), `duplicate_solutions` and `empty_solutions` (not written),
    `positive_steps`/`negative_steps`, `final_correct` (written solutions with the right final answer),
    `skipped_items` (image errors, by reason in `skipped`), `skipped_source_lines` (bad source records, by
    reason in `source_quarantine`), `included_lines`, `seconds`, `items_per_second`.

    Raises:
        FileNotFoundError: when the source or an include file does not exist.
        ValueError: when the source has no usable item, or more than `max_bad_fraction` of its records are bad.
    """
    with tempfile.TemporaryDirectory(prefix="vlpipe-prm-part-") as part:
        sample_prm_shard(config, 0, 1, part, progress)
        return merge_prm_data(config, [part])


def sample_prm_shard(
    config: PRMSampleConfig, index: int, count: int, part_dir: str | Path, progress: bool = True
) -> dict:
    """Sample and label shard `index` of `count` (contiguous runs of whole batches) into `part_dir`:
    `steps.jsonl` (its solutions) and `part.json` (its counts; the source's bad lines in shard 0's only).

    Raises:
        FileNotFoundError: when the source does not exist.
        ValueError: as `sample_prm_data`, or more shards than batches.
    """
    import torch
    from tqdm import tqdm

    from vlpipe.components.training.records import default_image_root, read_records
    from vlpipe.model.checkpoint import load_checkpoint
    from vlpipe.model.conversation import ConversationEncoder
    from vlpipe.model.data.reasoning import extract_answer
    from vlpipe.model.errors import SampleError
    from vlpipe.model.files import DatasetRoots
    from vlpipe.model.generate import generate
    from vlpipe.model.image import load_image
    from vlpipe.model.prompt import generation_prompt
    from vlpipe.model.tokenizer import IM_END
    from vlpipe.objectives.prm import place_image_placeholders, split_steps

    check = _labeller_check(config.labeler)

    def validate(record: dict) -> str | None:
        result = normalise_source(record)
        return result if isinstance(result, str) else check(result)

    source = read_records(config.source, "prm_source", validate, max_bad_fraction=config.max_bad_fraction)
    usable = min(len(source), config.limit) if config.limit else len(source)
    picked = shard_batches(index, count, math.ceil(usable / config.batch_items))
    # Only this shard's records are parsed (again) and held.
    mine = range(picked.start * config.batch_items, min(picked.stop * config.batch_items, usable))
    records = [normalise_source(source.record(i)) for i in mine]
    root = config.image_root or default_image_root(config.source)
    policy = load_checkpoint(config.policy)
    tok = policy.tokenizer
    encoder = ConversationEncoder(tok, policy.tokens_per_tile, max_length=8192, mode="sft")
    eos = tok.convert_tokens_to_ids(IM_END)
    part_dir = Path(part_dir)
    part_dir.mkdir(parents=True, exist_ok=True)
    out_path = part_dir / "steps.jsonl"
    counts: dict = dict.fromkeys(_COUNTS, 0)
    skipped: dict[str, int] = {}
    started = time.perf_counter()
    bar = tqdm(total=len(records), desc="prm-data", unit="item", disable=not progress)
    with out_path.open("w") as out, torch.no_grad():
        for start in range(0, len(records), config.batch_items):
            batch, prompts = [], []
            for record in records[start : start + config.batch_items]:
                try:
                    sample_id = str(record.get("id"))
                    paths = source_images(record)
                    images = [
                        load_image(
                            DatasetRoots(root).resolve(p, sample_id), max_pixels=policy.image_cfg.max_pixels
                        )
                        for p in paths
                    ]
                    # The same placement the PRM stage gives this question (`format_prm_conversation`).
                    turns = [("human", place_image_placeholders(record["question"], len(paths)))]
                    prompt = generation_prompt(encoder, policy, turns, images, sample_id=sample_id)
                except SampleError as err:
                    counts["skipped_items"] += 1
                    skipped[err.reason] = skipped.get(err.reason, 0) + 1
                    log.warning("skipping %s: %s (%s)", record.get("id"), err.reason, err.detail)
                    continue
                batch.append(record)
                prompts += [prompt] * config.n
            bar.update(min(config.batch_items, len(records) - start))
            if not batch:
                continue
            seed = int.from_bytes(
                hashlib.sha256(f"{config.seed}:{batch[0].get('id')}".encode()).digest()[:4], "big"
            )
            answers = generate(
                policy.model,
                prompts,
                eos_token_id=eos,
                pad_token_id=tok.pad_token_id,
                max_new_tokens=config.max_new_tokens,
                do_sample=True,
                temperature=config.temperature,
                top_p=config.top_p,
                seed=seed,
            )
            for i, record in enumerate(batch):
                reference = split_steps(record["solution"])
                seen: set[str] = set()
                for ids in answers[i * config.n : (i + 1) * config.n]:
                    text = tok.decode(ids, skip_special_tokens=True)
                    steps = split_steps(text)
                    if not steps:
                        counts["empty_solutions"] += 1
                        continue
                    if text in seen:
                        counts["duplicate_solutions"] += 1
                        continue
                    seen.add(text)
                    final_correct = extract_answer(text) == record["answer"].strip()
                    labels = label(steps, reference, final_correct, config.labeler, record["question"])
                    row = {
                        "id": f"{record.get('id')}-s{len(seen)}",
                        **({"image": record["image"]} if "image" in record else {}),
                        "question": record["question"],
                        "steps": steps,
                        "labels": labels,
                        "answer": record["answer"],
                        "final_correct": final_correct,
                    }
                    out.write(json.dumps(row) + "\n")
                    counts["solutions"] += 1
                    counts["final_correct"] += final_correct
                    counts["positive_steps"] += sum(labels)
                    counts["negative_steps"] += len(labels) - sum(labels)
                counts["items"] += 1
        bar.close()
    counts.update(
        skipped=skipped,
        skipped_source_lines=len(source.quarantine) if index == 0 else 0,
        source_quarantine=source.quarantine.report() if index == 0 else None,
        seconds=time.perf_counter() - started,
    )
    manifest = {
        "index": index,
        "count": count,
        "config": config.model_dump(mode="json"),
        "config_digest": _digest(config),
        "counts": counts,
    }
    (part_dir / PART_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return counts


def merge_prm_data(config: PRMSampleConfig, parts: Sequence[str | Path]) -> dict:
    """Write `config.output`: the parts' solutions in shard order, then the `include` files; returns the counts
    (as `sample_prm_data`) added up over the parts.

    Raises:
        FileNotFoundError: when an include file does not exist.
        ValueError: a part ran other settings, or a shard is missing or appears twice.
    """
    from vlpipe.model.files import JsonlReader

    manifests = {}
    for part in parts:
        manifest = json.loads((Path(part) / PART_FILE).read_text())
        if manifest["config_digest"] != _digest(config):
            raise ValueError(
                f"prm_data part {part} ran other settings than the merge's; merge one run's parts"
            )
        if manifest["index"] in manifests:
            raise ValueError(f"prm_data shard {manifest['index']} appears twice ({part})")
        manifests[manifest["index"]] = (Path(part), manifest)
    count = {m["count"] for _, m in manifests.values()}
    missing = [i for i in range(max(count, default=1)) if i not in manifests]
    if len(count) != 1 or missing:
        raise ValueError(
            f"prm_data parts: shards {missing} are missing (or the parts' counts {sorted(count)} differ)"
        )
    ordered = [manifests[i] for i in sorted(manifests)]
    counts: dict = {key: sum(m["counts"][key] for _, m in ordered) for key in _COUNTS}
    skipped: dict[str, int] = {}
    for _, m in ordered:
        for reason, n in m["counts"]["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    counts["included_lines"] = 0
    out_path = Path(config.output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w") as out:
        for part, _ in ordered:
            with (part / "steps.jsonl").open() as f:
                for line in f:
                    out.write(line)
        for extra in config.include:
            # Streamed line by line (bounded per line, a regular file only): an included file is not held whole.
            reader = JsonlReader(extra, "prm_data include")
            try:
                for line in reader:
                    if line.error is not None:
                        raise ValueError(
                            f"prm_data include {extra} line {line.number}: {line.error.reason}: {line.error.detail}"
                        )
                    out.write(json.dumps(line.value) + "\n")
                    counts["included_lines"] += 1
            except FileNotFoundError as exc:
                raise FileNotFoundError(f"prm_data include: {extra} does not exist") from exc
    first = ordered[0][1]["counts"]
    seconds = sum(m["counts"]["seconds"] for _, m in ordered)
    counts.update(
        skipped=skipped,
        skipped_source_lines=first["skipped_source_lines"],
        source_quarantine=first["source_quarantine"],
        seconds=round(seconds, 2),
        items_per_second=round(counts["items"] / seconds, 3) if seconds > 0 else None,
    )
    return counts
