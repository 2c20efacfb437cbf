"""Test data in the published MPO and PRM formats, written exactly as they are shaped (our own records).

* MMPR (OpenGVLab/MMPR, read by OpenGVLab/InternVL `internvl_chat/internvl/train/internvl_chat_mpo.py`): a meta
  JSON `{name: {root, annotation, data_augment, repeat_time, length}}` over one JSONL per dataset, records
  `{"image", "question", "chosen", "rejected"}`; `image` a path, a list of paths, or absent (text-only).
* VisualPRM400K raw (OpenGVLab/VisualPRM400K-Raw, written by `tools/reasoning_data_pipeline/
  visualprm_data_pieline.py`): `{"image", "question" (with its <image>), "question_orig", "answer", "response",
  "steps_with_score": [{"step", "score", "num_mc_correct", "num_mc_total"}], "num_mc_sequences"}`.
* VisualPRM400K conversations (OpenGVLab/VisualPRM400K, written by `visualprm_data_pipeline_postprocess.py`):
  `{"id": -1, "image", "conversations": [system, human "### Question:\\n{question}\\n\\n### Solution
  Process:\\n{step 1}", gpt "+"/"-", human "{step 2}", gpt ...]}`.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

# A stand-in for VisualPRM's PRM system prompt (the real one is a paragraph of instructions).
SYSTEM = "You are a process supervision model. Reply + or - after each step."


def _png(path: Path, size: tuple[int, int], colour: str = "red") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _jsonl(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


# -- MMPR ---------------------------------------------------------------------------------------------------
MMPR_SINGLE = {
    "image": "train/1/image.png",
    "question": "Which shape is wider?\nA. the first\nB. the second\nAnswer with the option's letter from the "
    "given choices directly.",
    "chosen": "A",
    "rejected": "B",
}
MMPR_SINGLE_PLACED = {
    "image": "train/2/image.png",
    "question": "Look at this figure: <image>\nWhat colour is it?",
    "chosen": "It is red.",
    "rejected": "It is blue.",
}
MMPR_MULTI = {
    "image": ["multi/a.png", "multi/b.png"],
    "question": "Image-1: <image>\nImage-2: <image>\nWhich image is wider?",
    "chosen": "Both are equally wide.",
    "rejected": "The first one.",
}
MMPR_TEXT = {
    "question": "What is 3 * 4?",
    "chosen": "3 * 4 = 12.\nSo the answer is 12.",
    "rejected": "3 * 4 = 7.\nSo the answer is 7.",
}
# One clear error per bad shape (reason in the quarantine's detail).
MMPR_BAD = [
    ({**MMPR_MULTI, "question": "<image>\nWhich image is wider?"}, "1 <image> placeholders for 2 images"),
    ({**MMPR_SINGLE, "image": 7}, "key 'image' must be a path or a list of paths, got int"),
    ({**MMPR_TEXT, "rejected": None}, "key 'rejected' must be a non-empty string, got NoneType"),
    ({**MMPR_TEXT, "rejected": MMPR_TEXT["chosen"]}, "chosen and rejected are identical"),
    ({**MMPR_TEXT, "question": "<image>\nWhat is 3 * 4?"}, "1 <image> placeholders for 0 images"),
]


def write_mmpr(root: Path, *, bad: bool = False) -> Path:
    """MMPR's layout: `MMPR/images/<subset>/...`, `MMPR/annotations/<subset>.jsonl`, `meta.json`.

    Returns:
        The meta file. Datasets: `scienceqa` (two single-image pairs, repeat_time 2), `multi_image` (one pair of
        two 128x32 images) and `text_only` (one pair without image, repeat_time 0.5 of 2 lines); with `bad`, the
        bad pairs are appended to `text_only` (lines 3...).
    """
    mmpr = root / "MMPR"
    _png(mmpr / "images/ScienceQA/train/1/image.png", (128, 32))
    _png(mmpr / "images/ScienceQA/train/2/image.png", (32, 32))
    _png(mmpr / "images/multi/multi/a.png", (128, 32), "blue")
    _png(mmpr / "images/multi/multi/b.png", (128, 32), "green")
    text = [MMPR_TEXT, {**MMPR_TEXT, "question": "What is 2 * 4?"}]
    if bad:
        text += [record for record, _ in MMPR_BAD]
    _jsonl(mmpr / "annotations/scienceqa.jsonl", [MMPR_SINGLE, MMPR_SINGLE_PLACED])
    _jsonl(mmpr / "annotations/multi_image.jsonl", [MMPR_MULTI])
    _jsonl(mmpr / "annotations/text_only.jsonl", text)
    meta = {
        "scienceqa": {
            "root": str(mmpr / "images/ScienceQA"),
            "annotation": str(mmpr / "annotations/scienceqa.jsonl"),
            "data_augment": False,
            "repeat_time": 2,
            "length": 2,
        },
        "multi_image": {
            "root": str(mmpr / "images/multi"),
            "annotation": str(mmpr / "annotations/multi_image.jsonl"),
            "data_augment": False,
            "repeat_time": 1,
            "length": 1,
        },
        "text_only": {
            "root": str(mmpr / "images"),
            "annotation": str(mmpr / "annotations/text_only.jsonl"),
            "data_augment": False,
            "repeat_time": 0.5,
            "length": len(text),
        },
    }
    path = root / "meta.json"
    path.write_text(json.dumps(meta, indent=2))
    return path


# -- VisualPRM400K ------------------------------------------------------------------------------------------
RAW_STEPS = [
    {
        "step": "The triangle's angles add up to 180 degrees.",
        "score": 0.5,
        "num_mc_correct": 8,
        "num_mc_total": 16,
    },
    {"step": "So x = 180 - 90 - 48 = 52.", "score": 0.0625, "num_mc_correct": 1, "num_mc_total": 16},
    {"step": "Final answer: 40", "score": 0.0, "num_mc_correct": 0, "num_mc_total": 16},
]
PRM_RAW = {
    "image": "Geometry3K/train/1471/img_diagram.png",
    "question": "<image>\nFind x.",
    "question_orig": "Find x.",
    "answer": "52",
    "response": "\n\n".join(s["step"] for s in RAW_STEPS),
    "steps_with_score": RAW_STEPS,
    "num_mc_sequences": 16,
}
# The converter's output for PRM_RAW at --mc-threshold 0 (scores 0.5, 0.0625, 0.0 → +, +, -).
PRM_CONVERSATION = {
    "id": -1,
    "image": "Geometry3K/train/1471/img_diagram.png",
    "conversations": [
        {"from": "system", "value": SYSTEM},
        {
            "from": "human",
            "value": "### Question:\n<image>\nFind x.\n\n### Solution Process:\nThe triangle's angles add up to "
            "180 degrees.",
        },
        {"from": "gpt", "value": "+"},
        {"from": "human", "value": "So x = 180 - 90 - 48 = 52."},
        {"from": "gpt", "value": "+"},
        {"from": "human", "value": "Final answer: 40"},
        {"from": "gpt", "value": "-"},
    ],
}
PRM_RAW_MULTI = {
    "image": ["multi/a.png", "multi/b.png"],
    "question": "Image-1: <image>\nImage-2: <image>\nWhich image is wider?",
    "question_orig": "Which image is wider?",
    "answer": "same",
    "response": "Both are 64 pixels wide.\n\nFinal answer: same",
    "steps_with_score": [
        {"step": "Both are 64 pixels wide.", "score": 1.0, "num_mc_correct": 16, "num_mc_total": 16},
        {"step": "Final answer: same", "score": 1.0, "num_mc_correct": 16, "num_mc_total": 16},
    ],
    "num_mc_sequences": 16,
}
PRM_STEPS_TEXT = {
    "id": "text-1",
    "question": "What is 3 * 4?",
    "steps": ["3 * 4 = 12.", "So the answer is 12."],
    "labels": [True, True],
}
PRM_STEPS_MULTI_UNPLACED = {
    "id": "multi-2",
    "image": ["multi/a.png", "multi/b.png"],
    "question": "Which image is greener?",
    "steps": ["The second is green.", "So the answer is the second."],
    "labels": [True, False],
}
PRM_BAD = [
    (
        {**PRM_RAW, "steps_with_score": [{**RAW_STEPS[0], "score": "high"}]},
        "steps_with_score[0].score must be a number, got str",
    ),
    ({**PRM_STEPS_TEXT, "labels": [True]}, "key 'labels' must be a list of 2 booleans, one per step"),
    (
        {
            **PRM_CONVERSATION,
            "conversations": [*PRM_CONVERSATION["conversations"][:2], {"from": "gpt", "value": "yes"}],
        },
        "reply 0 must be '+' or '-', got 'yes'",
    ),
    (
        {**PRM_RAW_MULTI, "question": "<image>\nWhich image is wider?"},
        "the question has 1 <image> placeholders for 2",
    ),
    ({"id": "x", "question": "Q?", "answer": "1"}, "not a PRM record: expected 'steps' + 'labels'"),
]


def write_visualprm(root: Path, *, bad: bool = False) -> Path:
    """VisualPRM400K's layout: `images/...` and JSONL annotations, listed by an InternVL meta file.

    Returns:
        The meta file. Datasets: `geometry3k_raw` (PRM_RAW, PRM_RAW_MULTI; lines 1-2), `geometry3k_conv`
        (PRM_CONVERSATION; line 1) and `vlpipe_steps` (PRM_STEPS_TEXT, PRM_STEPS_MULTI_UNPLACED; with `bad`, the
        bad records follow on lines 3...). Images are 64x32 (3 tiles each under the tiny preset, with or without
        a per-image tile budget).
    """
    images = root / "images"
    _png(images / "Geometry3K/train/1471/img_diagram.png", (64, 32))
    _png(images / "multi/a.png", (64, 32), "blue")
    _png(images / "multi/b.png", (64, 32), "green")
    steps = [PRM_STEPS_TEXT, PRM_STEPS_MULTI_UNPLACED] + ([r for r, _ in PRM_BAD] if bad else [])
    _jsonl(root / "annotations/geometry3k_raw.jsonl", [PRM_RAW, PRM_RAW_MULTI])
    _jsonl(root / "annotations/geometry3k_conv.jsonl", [PRM_CONVERSATION])
    _jsonl(root / "annotations/vlpipe_steps.jsonl", steps)
    meta = {
        name: {
            "root": str(images),
            "annotation": str(root / f"annotations/{name}.jsonl"),
            "data_augment": False,
            "repeat_time": 1,
            "length": n,
        }
        for name, n in (("geometry3k_raw", 2), ("geometry3k_conv", 1), ("vlpipe_steps", len(steps)))
    }
    path = root / "meta.json"
    path.write_text(json.dumps(meta, indent=2))
    return path
