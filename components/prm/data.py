"""Step-labelled solutions → PRM conversations (the format of `vlpipe.objectives.prm`) in InternVL's meta layout.

The stage's `path` is one JSONL file or an InternVL meta file over many (`read_record_set`); each record may be
in any of three shapes, told apart by its keys:

* vlpipe's steps: `{"id", "image", "question", "steps": [...], "labels": [true, false, ...]}`;
* VisualPRM400K's raw records: `{"image", "question", "answer", "response", "steps_with_score": [{"step",
  "score", "num_mc_correct", "num_mc_total"}]}`: a step is `+` when its Monte Carlo score is above
  `mc_threshold`, else `-` (VisualPRM's converter, `internvl_chat/tools/reasoning_data_pipeline/
  visualprm_data_pipeline_postprocess.py` in OpenGVLab/InternVL), optionally ending at the first `-`
  (`early_stop`);
* VisualPRM400K's conversations: `{"image", "conversations": [{"from": "system", ...}, {"from": "human",
  "value": "### Question:\\n...\\n\\n### Solution Process:\\n<step 1>"}, {"from": "gpt", "value": "+"},
  {"from": "human", "value": "<step 2>"}, {"from": "gpt", "value": "-"}, ...]}`.

Each becomes one conversation: the question and step 1 in the first user turn, every later step in its own user
turn, and after each step an assistant reply `+` or `-` (`style` picks the first turn's framing). `image` is a
path, a list of paths or absent (text-only); the question's `<image>` placeholders stay where they are, and a
question without any gets one per image in front. The converted JSONL files (one per dataset, every source
line on the same line number, so quarantine entries name the source's line) and a meta file with each dataset's
root, `repeat_time`, `max_dynamic_patch` and `data_augment` go to the work directory, so the PRM trains
through the same mixture loader, packing and LM loss as SFT.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

from vlpipe.components.training.config import StepDataConfig
from vlpipe.components.training.records import read_record_set
from vlpipe.model.data.config import DataConfig
from vlpipe.model.data.mixing import MixtureConfig
from vlpipe.objectives.prm import (
    IMAGE_PLACEHOLDER,
    MINUS,
    PLUS,
    format_prm_conversation,
    split_visualprm_question,
)

DATASET = "prm_steps"
_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt", "system": "system"}


class StepRecordError(ValueError):
    """A record that is not a usable PRM record (the message names the key and what it must be)."""


def record_images(record: dict) -> list[str]:
    """The image paths of a record: [] for text-only (`image` absent, null, "" or [], as InternVL reads it).

    Raises:
        StepRecordError: when `image` is neither a path nor a list of paths.
    """
    image = record.get("image")
    if image is None or image == "" or image == []:
        return []
    if isinstance(image, str):
        return [image]
    if isinstance(image, list) and all(isinstance(i, str) and i.strip() for i in image):
        return list(image)
    raise StepRecordError(f"key 'image' must be a path or a list of paths, got {type(image).__name__}")


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise StepRecordError(f"key {key!r} must be a non-empty string, got {type(value).__name__}")
    return value


def _labels_from_scores(steps_with_score: object, threshold: float, early_stop: bool) -> tuple[list, list]:
    if not isinstance(steps_with_score, list) or not steps_with_score:
        raise StepRecordError("key 'steps_with_score' must be a non-empty list of {step, score} objects")
    steps, labels = [], []
    for i, item in enumerate(steps_with_score):
        if not isinstance(item, dict):
            raise StepRecordError(f"steps_with_score[{i}] must be an object with 'step' and 'score'")
        score = item.get("score")
        if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
            raise StepRecordError(f"steps_with_score[{i}].score must be a number, got {type(score).__name__}")
        if not 0 <= score <= 1:
            raise StepRecordError(
                f"steps_with_score[{i}].score must lie in [0, 1] (a Monte Carlo share), got {score}"
            )
        steps.append(item.get("step"))
        labels.append(score > threshold)
        if early_stop and not labels[-1]:
            break
    return steps, labels


def _conversation_steps(turns: object, images: int) -> tuple[str | None, str, list, list, bool]:
    """(system prompt, first human turn, later steps, labels, framed) of a `+`/`-` conversation."""
    if not isinstance(turns, list) or not turns:
        raise StepRecordError("key 'conversations' must be a non-empty list of turns")
    roles = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise StepRecordError(f"conversations[{i}] must be an object with 'from' and a string 'value'")
        role = _ROLES.get(turn.get("from")) if isinstance(turn.get("from"), str) else None
        if role is None:
            raise StepRecordError(
                f"conversations[{i}].from must be one of {sorted(_ROLES)}, got {turn.get('from')!r}"
            )
        roles.append(role)
    system = turns[0]["value"] if roles[0] == "system" else None
    body, body_roles = (turns[1:], roles[1:]) if system is not None else (turns, roles)
    if not body or len(body) % 2 or body_roles != ["human", "gpt"] * (len(body) // 2):
        raise StepRecordError(
            "a PRM conversation is an optional system turn, then human (step) / gpt (+ or -) turns in pairs"
        )
    labels = []
    for i, turn in enumerate(body[1::2]):
        if turn["value"] not in (PLUS, MINUS):
            raise StepRecordError(f"reply {i} must be '+' or '-', got {turn['value'][:40]!r}")
        labels.append(turn["value"] == PLUS)
    humans = [t["value"] for t in body[0::2]]
    found = sum(h.count(IMAGE_PLACEHOLDER) for h in humans)
    if any(IMAGE_PLACEHOLDER in h for h in humans[1:]) or (
        found != images and not (images == 1 and found == 0)
    ):
        raise StepRecordError(
            f"the conversation has {found} {IMAGE_PLACEHOLDER} placeholders for {images} images; put one "
            f"{IMAGE_PLACEHOLDER} per image in the first human turn"
        )
    return system, humans[0], humans[1:], labels, split_visualprm_question(humans[0]) is not None


def prm_conversation(record: dict, data: StepDataConfig) -> dict:
    """The PRM training record `{"id"?, "image"?, "conversations"}` of a step record in any accepted shape.

    Args:
        record: a JSONL record (vlpipe's steps, VisualPRM400K raw, or VisualPRM400K conversations).
        data: the stage's data settings (`mc_threshold`, `early_stop`, `style`, `system_prompt`).

    Returns:
        The conversation record; its `image` is the record's paths (absent for text-only).

    Raises:
        StepRecordError: naming the key that is wrong (or the shape that was expected).
    """
    images = record_images(record)
    if "conversations" in record:
        system, first, later, labels, framed = _conversation_steps(record["conversations"], len(images))
        if data.style == "visualprm" or not framed:
            turns = record["conversations"]  # VisualPRM's own framing (or none to undo): kept as it is
        else:
            question, step = split_visualprm_question(first)  # type: ignore[misc]
            turns = _format(question, [step, *later], labels, len(images), data, image_placeholder=False)
    elif "steps_with_score" in record:
        steps, labels = _labels_from_scores(record["steps_with_score"], data.mc_threshold, data.early_stop)
        turns = _format(_text(record, "question"), steps, labels, len(images), data)
    elif "steps" in record:
        steps, labels = record["steps"], record.get("labels")
        if not isinstance(steps, list) or not steps:
            raise StepRecordError("key 'steps' must be a non-empty list of strings")
        if not isinstance(labels, list) or len(labels) != len(steps):
            raise StepRecordError(f"key 'labels' must be a list of {len(steps)} booleans, one per step")
        turns = _format(_text(record, "question"), steps, labels, len(images), data)
    else:
        raise StepRecordError(
            "not a PRM record: expected 'steps' + 'labels' (vlpipe), 'steps_with_score' (VisualPRM400K raw) "
            "or 'conversations' (VisualPRM400K)"
        )
    out: dict = {"conversations": turns}
    if isinstance(record.get("id"), str | int) and not isinstance(record.get("id"), bool):
        out["id"] = record["id"]
    if images:
        out["image"] = record["image"]
    return out


def _format(
    question: str,
    steps: list,
    labels: list,
    images: int,
    data: StepDataConfig,
    *,
    image_placeholder: bool = True,
) -> list[dict[str, str]]:
    try:
        return format_prm_conversation(
            question,
            steps,
            labels,
            image_placeholder,
            num_images=images,
            style=data.style,
            system_prompt=data.system_prompt,
        )
    except ValueError as exc:
        raise StepRecordError(str(exc)) from exc


def step_record_validator(data: StepDataConfig) -> Callable[[dict], str | None]:
    """The `read_record_set` validator of step records under `data`'s settings."""

    def validate(record: dict) -> str | None:
        try:
            prm_conversation(record, data)
        except StepRecordError as exc:
            return str(exc)
        return None

    return validate


def _file_name(dataset: str, used: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", dataset)[:80] or "dataset"
    name, n = stem, 1
    while name in used:
        n += 1
        name = f"{stem}-{n}"
    used.add(name)
    return f"{name}.jsonl"


def prepare_prm_data(data: StepDataConfig, out_dir: Path) -> None:
    """Write the PRM conversations, their meta file and a conversion report into `out_dir`.

    Call it on one rank, then every rank reads the result with `load_prepared`.

    Raises:
        FileNotFoundError: when the input file (or an annotation its meta file names) does not exist.
        MetaError: a wrong meta file.
        ValueError: when there is no usable record, or more than `max_bad_fraction` bad lines (the message names
            the top reasons with an example each).
    """
    source = read_record_set(
        data.path,
        DATASET,
        step_record_validator(data),
        data.max_bad_fraction,
        image_root=data.image_root,
        limits=data.limits,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    positives = negatives = 0
    meta: dict[str, dict] = {}
    used: set[str] = set()
    for src in source.sources:
        if not len(src.file):
            continue
        annotation = out_dir / _file_name(src.name, used)
        with annotation.open("w") as f:
            written = 0
            for i, record in enumerate(src.file):
                line = src.file.line(i)
                converted = prm_conversation(record, data)
                replies = [
                    t["value"] for t in converted["conversations"] if t["from"] in ("gpt", "assistant")
                ]
                positives += replies.count(PLUS)
                negatives += replies.count(MINUS)
                # Blank lines keep every record on its source line: the loader's quarantine names that line.
                f.write("\n" * (line - 1 - written) + json.dumps(converted) + "\n")
                written = line
        meta[src.name] = {
            "root": src.roots.root,
            "allowed_roots": list(src.roots.allowed),
            "annotation": str(annotation),
            "repeat_time": src.repeat_time,
            "length": len(src.file),
            "data_augment": src.data_augment,
            **({"max_dynamic_patch": src.max_dynamic_patch} if src.max_dynamic_patch else {}),
        }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    report = {
        "prm_solutions": source.records,
        "prm_steps_positive": positives,
        "prm_steps_negative": negatives,
        "prm_skipped_lines": len(source.quarantine),
        "prm_skipped": source.quarantine.counts,
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))


def load_prepared(data: StepDataConfig, out_dir: Path) -> tuple[DataConfig, dict]:
    """The stage's `DataConfig` over the converted conversations, and the conversion report.

    Datasets are drawn in proportion to their records × `repeat_time` (as InternVL concatenates them), text-only
    ones included: per-dataset `weights`, not the language/multimodal ratio of pre-training.
    """
    meta = json.loads((out_dir / "meta.json").read_text())
    weights = {name: spec["length"] * spec["repeat_time"] for name, spec in meta.items()}
    config = DataConfig(
        meta=str(out_dir / "meta.json"),
        mixture=MixtureConfig(weights=weights, seed=data.seed, max_bad_fraction=data.max_bad_fraction),
        mode="sft",
        max_length=data.max_length,
        augment=data.augment,
        limits=data.limits,
    )
    return config, json.loads((out_dir / "report.json").read_text())
