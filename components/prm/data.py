"""Step-labelled solutions → PRM conversations (the format of `vlpipe.objectives.prm`) in InternVL's meta layout.

Each input line `{"id", "image", "question", "steps": [...], "labels": [true, false, ...]}` becomes one
conversation: the question and step 1 in the first user turn, every later step in its own user turn, and
after each step an assistant reply `+` or `-`. The converted JSONL and a meta file go to the work directory,
so the PRM trains through the same mixture loader, packing and LM loss as SFT.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlpipe.components.training.config import StepDataConfig
from vlpipe.components.training.records import default_image_root, read_records
from vlpipe.model.data.config import DataConfig
from vlpipe.model.data.mixing import MixtureConfig
from vlpipe.objectives.prm import format_prm_conversation

DATASET = "prm_steps"


def validate_step_record(record: dict) -> str | None:
    """None for a usable record, else why not."""
    for key in ("image", "question", "steps", "labels"):
        if key not in record:
            return f"missing key {key!r}"
    steps, labels = record["steps"], record["labels"]
    if not isinstance(steps, list) or not steps:
        return "'steps' must be a non-empty list of strings"
    if not isinstance(labels, list) or len(labels) != len(steps):
        return f"'labels' must be a list of {len(steps)} booleans, one per step"
    try:
        format_prm_conversation(str(record["question"]), steps, labels)
    except ValueError as exc:
        return str(exc)
    return None


def prepare_prm_data(data: StepDataConfig, out_dir: Path) -> None:
    """Write the PRM conversations, their meta file and a conversion report into `out_dir`.

    Call it on one rank, then every rank reads the result with `load_prepared`.

    Raises:
        FileNotFoundError: when the input file does not exist.
        ValueError: when the file has no usable line or more than `max_bad_fraction` bad ones.
    """
    source = read_records(data.path, DATASET, validate_step_record, data.max_bad_fraction)
    out_dir.mkdir(parents=True, exist_ok=True)
    annotation = out_dir / "conversations.jsonl"
    positives = negatives = 0
    with annotation.open("w") as f:
        for record in source.records:
            turns = format_prm_conversation(str(record["question"]), record["steps"], record["labels"])
            positives += sum(record["labels"])
            negatives += len(record["labels"]) - sum(record["labels"])
            f.write(
                json.dumps({"id": record.get("id"), "image": record["image"], "conversations": turns}) + "\n"
            )
    meta = {
        DATASET: {
            "root": data.image_root or default_image_root(data.path),
            "annotation": str(annotation),
            "length": len(source.records),
            "data_augment": data.augment,
        }
    }
    meta_path = out_dir / "meta.json"
    meta_path.write_text(json.dumps(meta, indent=2))
    report = {
        "prm_solutions": len(source.records),
        "prm_steps_positive": positives,
        "prm_steps_negative": negatives,
        "prm_skipped_lines": len(source.quarantine),
        "prm_skipped": source.quarantine.counts,
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))


def load_prepared(data: StepDataConfig, out_dir: Path) -> tuple[DataConfig, dict]:
    """The stage's `DataConfig` over the converted conversations, and the conversion report."""
    config = DataConfig(
        meta=str(out_dir / "meta.json"),
        mixture=MixtureConfig(
            language_ratio=0, multimodal_ratio=1, seed=data.seed, max_bad_fraction=data.max_bad_fraction
        ),
        mode="sft",
        max_length=data.max_length,
        augment=data.augment,
    )
    return config, json.loads((out_dir / "report.json").read_text())
