"""On-policy PRM data: step labels by hand, and a sampling run on the tiny demo."""

from __future__ import annotations

import json

import pytest

from components.prm.sample import PRMSampleConfig, label, sample_prm_data

REF = ["I see a red circle and a blue square.", "The red one is the circle.", "So the answer is 1."]


def test_labellers_by_hand():
    reordered = ["I see a blue square and a red circle.", "The red one is the circle.", "So the answer is 1."]
    assert label(reordered, REF, True, "reference_steps") == [False, False, False]  # exact text only
    assert label(reordered, REF, True, "demo_reference") == [True, True, True]  # item order ignored
    misread = [
        "I see a red circle and a red square.",
        "The red ones are the circle and the square.",
        "So the answer is 2.",
    ]
    assert label(misread, REF, False, "demo_reference") == [False, False, False]
    assert label(misread, REF, False, "final_answer") == [False] * 3
    # Right steps but a different final line: the last step is wrong.
    assert label([*REF[:2], "So the answer is 3."], REF, False, "demo_reference") == [True, True, False]


@pytest.mark.slow
def test_sampling_writes_labelled_solutions(workspace, tmp_path):
    from model.data.reasoning import extract_answer

    source = tmp_path / "reasoning" / "train.jsonl"
    source.parent.mkdir()
    with source.open("w") as f:
        for line in (workspace["data"] / "reasoning" / "train.jsonl").read_text().splitlines()[:3]:
            r = json.loads(line)
            solution = r["conversations"][1]["value"]
            question = r["conversations"][0]["value"].replace("<image>\n", "")
            f.write(json.dumps({"id": r["id"], "image": r["image"], "question": question,
                                "answer": extract_answer(solution), "solution": solution}) + "\n")  # fmt: skip
    out = tmp_path / "prm.jsonl"
    counts = sample_prm_data(
        PRMSampleConfig(
            policy=str(workspace["init"]),
            source=str(source),
            image_root=str(workspace["data"] / "images"),
            output=str(out),
            n=4,
            max_new_tokens=16,
            labeler="final_answer",
            include=(str(workspace["data"] / "prm" / "train.jsonl"),),
        )
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert counts["items"] == 3 and 1 <= counts["solutions"] <= 12
    assert len(rows) == counts["solutions"] + counts["included_lines"]
    for row in rows[: counts["solutions"]]:
        assert len(row["labels"]) == len(row["steps"]) and set(row["labels"]) == {row["final_correct"]}
