"""On-policy PRM data: step labels by hand, and a sampling run on the tiny demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlpipe.components.prm_data.stage import label, normalise_source

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


def test_demo_local_labeller_needs_the_question():
    assert label(REF, REF, True, "demo_local", "How many red shapes are there?") == [True, True, True]
    with pytest.raises(ValueError, match="demo counting question"):
        label(REF, REF, True, "demo_local", "What is in the picture?")


def test_source_records_in_either_format():
    conv = {
        "id": "r1",
        "image": "reasoning/train/1.png",
        "conversations": [
            {"from": "human", "value": "<image>\nHow many red shapes are there?"},
            {"from": "gpt", "value": "\n".join(REF)},
        ],
    }
    assert normalise_source(conv) == {
        **conv,
        "question": "How many red shapes are there?",
        "solution": "\n".join(REF),
        "answer": "1",
    }
    flat = {"id": "r2", "image": "a.png", "question": "Q?", "answer": 3, "solution": "S"}
    assert normalise_source(flat)["answer"] == "3"
    no_answer = {**conv, "conversations": [conv["conversations"][0], {"from": "gpt", "value": "I see it."}]}
    assert "add an 'answer' key" in normalise_source(no_answer)
    assert "human then gpt" in normalise_source({**conv, "conversations": conv["conversations"][::-1]})
    assert "'image'" in normalise_source({**flat, "image": ""})


class _Artifact:
    """A stand-in for a kfp artifact: a path, metadata and logged metrics."""

    def __init__(self, path: Path) -> None:
        self.path, self.metadata, self.logged = str(path), {}, {}

    def log_metric(self, key: str, value: float) -> None:
        self.logged[key] = value


@pytest.mark.slow
def test_sampling_step_labels_the_policy_solutions_and_logs_them(workspace, tracking, tmp_path):
    import mlflow

    from vlpipe.components.prm_data.task import IMAGE_ROOT_KEY, run_prm_data_task
    from vlpipe.model.data.reasoning import local_step_labels, parse_question

    # The SFT-format reasoning split as the source, with one record the labeller cannot use.
    source = tmp_path / "data" / "reasoning" / "train.jsonl"
    source.parent.mkdir(parents=True)
    lines = (workspace["data"] / "reasoning" / "train.jsonl").read_text().splitlines()[:3]
    bad = json.loads(lines[0])
    bad["conversations"][0]["value"] = "<image>\nWhat is this?"
    source.write_text("\n".join([*lines, json.dumps(bad)]) + "\n")
    (tmp_path / "data" / "dataset.json").write_text(
        json.dumps({"source": "meta", "root": str(tmp_path / "data")})
    )
    settings = {
        "source": "reasoning/train.jsonl",
        "image_root": str(workspace["data"] / "images"),
        "n": 4,
        "max_new_tokens": 16,
        "labeler": "demo_local",
        "include": [str(workspace["data"] / "prm" / "train.jsonl")],
        "max_bad_fraction": 0.5,
    }
    step = {"recipe": "tiny", "tracking": {"experiment": "prm-data-test"}}
    steps, metrics = _Artifact(tmp_path / "out" / "steps.jsonl"), _Artifact(tmp_path / "metrics")
    counts = run_prm_data_task(
        json.dumps(settings), json.dumps(step), preset="tiny", parent_run_id="",
        policy=_Artifact(workspace["init"]), data=_Artifact(tmp_path / "data"), steps=steps, metrics=metrics,
    )  # fmt: skip
    rows = [json.loads(line) for line in Path(steps.path).read_text().splitlines()]
    assert counts["items"] == 3 and counts["skipped_source_lines"] == 1
    assert counts["source_quarantine"]["examples"][0]["reason"] == "invalid_record"
    assert counts["solutions"] + counts["duplicate_solutions"] + counts["empty_solutions"] == 3 * 4
    assert len(rows) == counts["solutions"] + counts["included_lines"]
    references = {json.loads(line)["id"]: json.loads(line) for line in lines}
    for row in rows[: counts["solutions"]]:
        ref = references[row["id"].rsplit("-s", 1)[0]]
        question = parse_question(ref["conversations"][0]["value"])
        reference = ref["conversations"][1]["value"].split("\n")
        assert row["labels"] == local_step_labels(question, row["steps"], reference)
    assert counts["positive_steps"] + counts["negative_steps"] == sum(
        len(r["labels"]) for r in rows[: counts["solutions"]]
    )
    # The PRM stage reads the images from where the source's are; everything is in the MLflow run.
    assert steps.metadata[IMAGE_ROOT_KEY] == str(workspace["data"] / "images")
    assert steps.metadata["solutions"] == counts["solutions"] and metrics.logged["items"] == 3
    run = mlflow.get_run(counts["mlflow_run_id"])
    assert run.data.params["labeler"] == "demo_local" and run.data.params["n"] == "4"
    assert run.data.metrics["solutions"] == counts["solutions"]
    assert run.data.metrics["skipped_source_lines"] == 1
    assert run.data.tags["stage"] == "prm-data"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "prm_data")}
    assert artifacts == {"prm_data/summary.json", "prm_data/preview.jsonl"}
