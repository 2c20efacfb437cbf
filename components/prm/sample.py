"""On-policy PRM data: sample solutions from the policy and label every step (VisualPRM's data recipe).

A PRM judges the policy's own answers at Best-of-N time, so it learns best from the policy's own mistakes:
for each source item this samples N solutions from the policy (temperature T, seeded per item), splits them
into steps, and labels each step. Labellers:

* `reference_steps`: a step is correct while it matches the item's reference solution step for step (exact
  text), wrong from the first mismatch on. Right for templated synthetic tasks.
* `demo_reference`: the same, but a step's listed items may come in any order
  (`model.data.reasoning.canonical_step`): the demo task's labeller.
* `final_answer`: every step takes the label of the final answer (weak supervision for any task with a
  checkable answer).

VisualPRM400K labels steps by Monte Carlo rollouts (the share of continuations from a step prefix that reach
the right answer); that needs many more generations and is not implemented here.

Output: JSONL `{id, image, question, steps, labels, answer, final_correct}` (the PRM stage's input), with
duplicate solutions of an item written once; `include` files (e.g. curated step-labelled data) are appended.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)


class PRMSampleConfig(BaseModel):
    """Settings of on-policy PRM data generation.

    Attributes:
        policy: the policy checkpoint whose answers the PRM will judge.
        source: JSONL `{id, image, question, answer, solution}` (the demo's reasoning split format).
        image_root: root of the relative `image` paths; default `images/` beside the JSONL's directory.
        output: the step-labelled JSONL to write (local path).
        n: solutions sampled per item.
        temperature, top_p: sampling settings (use the evaluation's).
        max_new_tokens: length cap of a solution.
        seed: sampling seed (per item: hash of seed and item id).
        limit: use the first `limit` items.
        batch_items: items whose N samples are generated in one batch.
        labeler: `reference_steps`, `demo_reference` or `final_answer` (see the module docstring).
        include: step-labelled JSONL files appended to the output unchanged.
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
    labeler: Literal["reference_steps", "demo_reference", "final_answer"] = "demo_reference"
    include: tuple[str, ...] = ()


def _validate_source(record: dict) -> str | None:
    for key in ("image", "question", "answer", "solution"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            return f"key {key!r} must be a non-empty string"
    return None


def label(steps: list[str], reference: list[str], final_correct: bool, labeler: str) -> list[bool]:
    """Per-step labels of a sampled solution (see the module docstring)."""
    if labeler == "final_answer":
        return [final_correct] * len(steps)
    if labeler == "demo_reference":
        from model.data.reasoning import canonical_step as canonical
    else:
        canonical = str.strip
    labels, ok = [], True
    for i, step in enumerate(steps):
        ok = ok and i < len(reference) and canonical(step) == canonical(reference[i])
        labels.append(ok)
    if labels and labels[-1] and not final_correct:  # matched every reference step but answered wrong
        labels[-1] = False
    return labels


def sample_prm_data(config: PRMSampleConfig) -> dict:
    """Write on-policy step-labelled solutions; returns counts (items, solutions, positive/negative steps).

    Raises:
        FileNotFoundError: when the source or an include file does not exist.
        ValueError: when the source has no usable item.
    """
    import torch

    from components.training.records import default_image_root, read_records
    from model.checkpoint import load_checkpoint
    from model.conversation import ConversationEncoder
    from model.data.reasoning import extract_answer
    from model.errors import SampleError
    from model.generate import generate
    from model.image import load_image, process_image
    from model.storage import join
    from model.tokenizer import IM_END
    from objectives.prm import split_steps

    source = read_records(config.source, "prm_source", _validate_source, max_bad_fraction=0.05)
    records = source.records[: config.limit] if config.limit else source.records
    root = config.image_root or default_image_root(config.source)
    policy = load_checkpoint(config.policy)
    tok = policy.tokenizer
    encoder = ConversationEncoder(tok, policy.tokens_per_tile, max_length=8192, mode="sft")
    eos = tok.convert_tokens_to_ids(IM_END)
    out_path = Path(config.output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    counts = {"items": 0, "solutions": 0, "positive_steps": 0, "negative_steps": 0, "skipped_items": 0}
    with out_path.open("w") as out, torch.no_grad():
        for start in range(0, len(records), config.batch_items):
            batch, prompts = [], []
            for record in records[start : start + config.batch_items]:
                try:
                    pixels = process_image(
                        load_image(join(root, record["image"]), max_pixels=policy.image_cfg.max_pixels),
                        policy.image_cfg,
                    )
                    conv = {
                        "id": record.get("id"),
                        "image": record["image"],
                        "conversations": [{"from": "human", "value": "<image>\n" + record["question"]}],
                    }
                    prompt = encoder.encode(
                        conv,
                        [pixels.shape[0]],
                        pixel_values=pixels,
                        v2pe_deltas=policy.v2pe_delta,
                        add_generation_prompt=True,
                    )
                except SampleError as err:
                    counts["skipped_items"] += 1
                    log.warning("skipping %s: %s (%s)", record.get("id"), err.reason, err.detail)
                    continue
                batch.append(record)
                prompts += [prompt] * config.n
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
                seen = set()
                for ids in answers[i * config.n : (i + 1) * config.n]:
                    text = tok.decode(ids, skip_special_tokens=True)
                    steps = split_steps(text)
                    if not steps or text in seen:
                        continue
                    seen.add(text)
                    final_correct = extract_answer(text) == str(record["answer"]).strip()
                    labels = label(steps, reference, final_correct, config.labeler)
                    out.write(
                        json.dumps(
                            {
                                "id": f"{record.get('id')}-s{len(seen)}",
                                "image": record["image"],
                                "question": record["question"],
                                "steps": steps,
                                "labels": labels,
                                "answer": record["answer"],
                                "final_correct": final_correct,
                            }
                        )
                        + "\n"
                    )
                    counts["solutions"] += 1
                    counts["positive_steps"] += sum(labels)
                    counts["negative_steps"] += len(labels) - sum(labels)
                counts["items"] += 1
        for extra in config.include:
            text = Path(extra).read_text()
            out.write(text if text.endswith("\n") else text + "\n")
            counts["included_lines"] = counts.get("included_lines", 0) + sum(
                1 for line in text.splitlines() if line.strip()
            )
    counts["skipped_source_lines"] = len(source.quarantine)
    return counts
