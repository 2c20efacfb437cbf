"""PRM data in VisualPRM400K's two published shapes and vlpipe's own, text-only and multi-image: the exact
conversations, labels, token sequences and tile counts, and one clear error per bad shape."""

from __future__ import annotations

import json
from itertools import islice

import pytest

from tests.components.training.formats import (
    PRM_BAD,
    PRM_CONVERSATION,
    PRM_RAW,
    PRM_RAW_MULTI,
    PRM_STEPS_MULTI_UNPLACED,
    PRM_STEPS_TEXT,
    SYSTEM,
    write_visualprm,
)
from vlpipe.components.prm.data import (
    StepRecordError,
    load_prepared,
    prepare_prm_data,
    prm_conversation,
)
from vlpipe.components.training.config import StepDataConfig
from vlpipe.model.conversation import IGNORE_INDEX
from vlpipe.model.data.loader import MixtureLoader

TOKENS_PER_TILE = 4


def _data(**kw) -> StepDataConfig:
    return StepDataConfig(path="unused.jsonl", **kw)


def _turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    out = []
    for human, reply in pairs:
        out += [{"from": "human", "value": human}, {"from": "gpt", "value": reply}]
    return out


def test_raw_records_are_labelled_by_the_monte_carlo_threshold():
    # Scores 0.5, 0.0625, 0.0: above 0 → +, +, -; above 0.25 → +, -, -.
    steps = [s["step"] for s in PRM_RAW["steps_with_score"]]
    out = prm_conversation(PRM_RAW, _data())
    assert out == {
        "image": PRM_RAW["image"],
        "conversations": _turns((f"<image>\nFind x.\n{steps[0]}", "+"), (steps[1], "+"), (steps[2], "-")),
    }
    labels = [t["value"] for t in prm_conversation(PRM_RAW, _data(mc_threshold=0.25))["conversations"][1::2]]
    assert labels == ["+", "-", "-"]
    early = prm_conversation(PRM_RAW, _data(mc_threshold=0.25, early_stop=True))["conversations"]
    assert [t["value"] for t in early[1::2]] == ["+", "-"]  # ends at the first "-"


def test_raw_record_converts_exactly_as_visualprms_converter():
    """VisualPRM's converter output (the conversation shape) is what the raw record becomes under its style."""
    converted = prm_conversation(PRM_RAW, _data(style="visualprm", system_prompt=SYSTEM))
    assert converted["conversations"] == PRM_CONVERSATION["conversations"]
    # ... and the conversation shape itself is kept unchanged under that style.
    assert prm_conversation(PRM_CONVERSATION, _data(style="visualprm")) == PRM_CONVERSATION


def test_conversation_shape_is_reframed_for_vlpipes_scorer():
    out = prm_conversation(PRM_CONVERSATION, _data())
    steps = [s["step"] for s in PRM_RAW["steps_with_score"]]
    assert out == {
        "id": -1,
        "image": PRM_CONVERSATION["image"],
        "conversations": _turns((f"<image>\nFind x.\n{steps[0]}", "+"), (steps[1], "+"), (steps[2], "-")),
    }
    assert out["conversations"] == prm_conversation(PRM_RAW, _data())["conversations"]


def test_text_only_and_multi_image_records():
    assert prm_conversation(PRM_STEPS_TEXT, _data()) == {
        "id": "text-1",
        "conversations": _turns(("What is 3 * 4?\n3 * 4 = 12.", "+"), ("So the answer is 12.", "+")),
    }
    placed = prm_conversation(PRM_RAW_MULTI, _data())["conversations"][0]["value"]
    assert placed == "Image-1: <image>\nImage-2: <image>\nWhich image is wider?\nBoth are 64 pixels wide."
    unplaced = prm_conversation(PRM_STEPS_MULTI_UNPLACED, _data())
    assert unplaced["image"] == ["multi/a.png", "multi/b.png"]
    assert (
        unplaced["conversations"][0]["value"]
        == "<image>\n<image>\nWhich image is greener?\nThe second is green."
    )


@pytest.mark.parametrize(("record", "message"), PRM_BAD, ids=[m[:30] for _, m in PRM_BAD])
def test_one_clear_error_per_bad_shape(record, message):
    with pytest.raises(StepRecordError) as err:
        prm_conversation(record, _data())
    assert str(err.value).startswith(message)


def test_prepared_meta_trains_through_the_mixture_loader(tmp_path, tiny_tokenizer, tiny_image_cfg):
    meta = write_visualprm(tmp_path / "data", bad=True)
    data = StepDataConfig(path=str(meta), max_bad_fraction=0.5, max_length=4096)
    out = tmp_path / "prepared"
    prepare_prm_data(data, out)
    config, report = load_prepared(data, out)
    assert report["prm_solutions"] == 5
    assert report["prm_skipped"] == {"vlpipe_steps/invalid_record": len(PRM_BAD)}
    assert (report["prm_steps_positive"], report["prm_steps_negative"]) == (2 + 2 + 2 + 2 + 1, 1 + 1 + 1)
    prepared = json.loads((out / "meta.json").read_text())
    assert list(prepared) == ["geometry3k_raw", "geometry3k_conv", "vlpipe_steps"]
    assert prepared["vlpipe_steps"]["root"] == str(tmp_path / "data/images")
    assert config.mixture.weights == {"geometry3k_raw": 2, "geometry3k_conv": 1, "vlpipe_steps": 2}

    loader = MixtureLoader(config, tiny_tokenizer, tiny_image_cfg, TOKENS_PER_TILE)
    samples = {}
    for sample in islice(loader, 50):
        samples.setdefault(sample.sample_id, sample)
        if len(samples) == 5:
            break
    # Every sample keeps its source dataset and line.
    assert sorted(samples) == [
        "geometry3k_conv:1",
        "geometry3k_raw:1",
        "geometry3k_raw:2",
        "vlpipe_steps:1",
        "vlpipe_steps:2",
    ]
    img = "<img>" + "<IMG_CONTEXT>" * (TOKENS_PER_TILE * 3) + "</img>"  # 64x32: a 2x1 grid + a thumbnail

    def chat(*pairs: tuple[str, str]) -> str:
        return "".join(
            f"<|im_start|>user\n{h}<|im_end|>\n<|im_start|>assistant\n{r}<|im_end|>\n" for h, r in pairs
        )

    raw = samples["geometry3k_raw:1"]
    steps = [s["step"] for s in PRM_RAW["steps_with_score"]]
    assert raw.num_tiles == [3]
    assert tiny_tokenizer.decode(raw.input_ids) == chat(
        (f"{img}\nFind x.\n{steps[0]}", "+"), (steps[1], "+"), (steps[2], "-")
    )
    # The loss is on the replies only: +, +, - and their end tokens.
    assert (
        tiny_tokenizer.decode(raw.input_ids[raw.labels != IGNORE_INDEX])
        == "+<|im_end|>+<|im_end|>-<|im_end|>"
    )
    assert samples["geometry3k_conv:1"].input_ids.tolist() == raw.input_ids.tolist()
    multi = samples["geometry3k_raw:2"]
    assert multi.num_tiles == [3, 3] and tuple(multi.pixel_values.shape) == (6, 3, 32, 32)
    assert tiny_tokenizer.decode(multi.input_ids) == chat(
        (f"Image-1: {img}\nImage-2: {img}\nWhich image is wider?\nBoth are 64 pixels wide.", "+"),
        ("Final answer: same", "+"),
    )
    text = samples["vlpipe_steps:1"]
    assert text.num_tiles == [] and text.pixel_values is None
    assert tiny_tokenizer.decode(text.input_ids) == chat(
        ("What is 3 * 4?\n3 * 4 = 12.", "+"), ("So the answer is 12.", "+")
    )
    unplaced = samples["vlpipe_steps:2"]
    assert tiny_tokenizer.decode(unplaced.input_ids).startswith(
        f"<|im_start|>user\n{img}\n{img}\nWhich image is greener?\nThe second is green.<|im_end|>"
    )


def test_a_record_that_fails_to_load_is_quarantined_on_its_source_line(
    tmp_path, tiny_tokenizer, tiny_image_cfg
):
    meta = write_visualprm(tmp_path / "data")
    (tmp_path / "data/images/multi/b.png").unlink()
    data = StepDataConfig(path=str(meta), max_bad_fraction=0.5)
    prepare_prm_data(data, tmp_path / "prepared")
    config, _ = load_prepared(data, tmp_path / "prepared")
    loader = MixtureLoader(config, tiny_tokenizer, tiny_image_cfg, TOKENS_PER_TILE)
    list(islice(loader, 12))
    assert {(e["dataset"], e["line"], e["reason"]) for e in loader.quarantine.entries} == {
        ("geometry3k_raw", 2, "missing_image"),
        ("vlpipe_steps", 2, "missing_image"),
    }


def test_on_policy_sampling_places_image_placeholders_as_the_prm_does():
    from vlpipe.components.prm_data.stage import normalise_source
    from vlpipe.objectives.prm import place_image_placeholders

    base = {"id": "s", "answer": "1", "solution": "So the answer is 1."}
    text = normalise_source({**base, "question": "What is 3 - 2?"})
    assert "image" not in text and place_image_placeholders(text["question"], 0) == "What is 3 - 2?"
    multi = normalise_source(
        {**base, "image": ["a.png", "b.png"], "question": "A: <image>\nB: <image>\nSame?"}
    )
    assert place_image_placeholders(multi["question"], 2) == "A: <image>\nB: <image>\nSame?"  # kept in place
    single = normalise_source({**base, "image": "a.png", "question": "How many?"})
    assert place_image_placeholders(single["question"], 1) == "<image>\nHow many?"  # once, in front
    placed = {**base, "image": "a.png", "question": "Count them: <image>"}
    assert place_image_placeholders(normalise_source(placed)["question"], 1) == "Count them: <image>"
    conversation = {
        "id": "c",
        "image": ["a.png", "b.png"],
        "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhich is bigger?"},
            {"from": "gpt", "value": "So the answer is 1."},
        ],
    }
    assert normalise_source(conversation)["question"] == "<image>\n<image>\nWhich is bigger?"
    assert normalise_source({**base, "image": ["a.png"], "question": "<image> vs <image>"}) == (
        "the question has 2 <image> placeholders for 1 images; put one <image> where each image goes, or none "
        "to place them all in front"
    )


@pytest.mark.slow
def test_the_prm_stage_trains_on_visualprm400k_shapes(workspace, tmp_path, tracking):
    from vlpipe.components.stages import parse_stage_config
    from vlpipe.components.training.entrypoint import run_stage
    from vlpipe.components.training.loop import read_metrics

    meta = write_visualprm(tmp_path / "data", bad=True)
    cfg = parse_stage_config(
        {
            "stage": "prm",
            "init": str(workspace["init"]),
            "output": str(tmp_path / "prm"),
            "data": {"path": str(meta), "max_bad_fraction": 0.6},
            "packing": {"max_tokens": 512, "max_tiles": 32, "buffer_size": 4},
            "trainer": {"global_batch_size": 2, "max_steps": 2, "distributed": {"zero_stage": 0}},
            "tracking": {"experiment": "test", "log_model": False, "system_metrics": False},
        }
    )
    summary = run_stage("prm", cfg)
    assert summary["prm_solutions"] == 5 and summary["prm_skipped_lines"] == len(PRM_BAD)
    assert all(0.0 <= m["step_accuracy"] <= 1.0 for m in read_metrics(tmp_path / "prm.work"))
