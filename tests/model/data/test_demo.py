"""The demo dataset: determinism, split hygiene, label rules, meta files, and writing to S3 (moto)."""

from __future__ import annotations

import collections
import hashlib
import json
import random
from pathlib import Path

import pytest
from PIL import Image

from vlpipe.model.data.demo import (
    DemoSizes,
    Scene,
    extract_answer,
    is_correct,
    iter_demo_texts,
    label_steps,
    render_scene,
    write_demo_dataset,
)
from vlpipe.model.data.reasoning import Question, perturb, sample_item, solution_steps
from vlpipe.model.data.scenes import Shape, png_bytes


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "out"
    write_demo_dataset(str(out), seed=0, sizes=DemoSizes.tiny())
    return out


def test_same_seed_writes_identical_files_and_another_seed_does_not(tmp_path: Path, demo: Path) -> None:
    again = tmp_path / "again"
    write_demo_dataset(str(again), seed=0, sizes=DemoSizes.tiny())
    first, second = _hashes(demo), _hashes(again)
    assert (
        len(first) == 20 + 50 + 20 + 20 + 20 + 40 + 10
    )  # tiny: images (captions, train, test, prm source, mpo, prm) + 10 files
    # The meta files name the output location; with it replaced they must match too.
    for meta in ("meta_pretrain.json", "meta_sft.json"):
        assert (demo / meta).read_text().replace(str(demo), "OUT") == (again / meta).read_text().replace(
            str(again), "OUT"
        )
        del first[meta], second[meta]
    assert first == second

    other = tmp_path / "other"
    write_demo_dataset(str(other), seed=1, sizes=DemoSizes.tiny())
    third = _hashes(other)
    assert third["reasoning/train.jsonl"] != first["reasoning/train.jsonl"]
    assert third["images/reasoning/train/000000.png"] != first["images/reasoning/train/000000.png"]


def test_counts_and_meta_lengths_match_files(demo: Path) -> None:
    sizes = DemoSizes.tiny()
    expected = {
        "text/corpus.jsonl": sizes.text_corpus,
        "captions/captions.jsonl": sizes.captions,
        "reasoning/train.jsonl": sizes.reasoning_train,
        "reasoning/test.jsonl": sizes.reasoning_test,
        "reasoning/prm.jsonl": sizes.reasoning_prm,
        "mpo/pairs.jsonl": sizes.mpo_pairs,
        "prm/train.jsonl": sizes.prm_solutions,
    }
    for rel, n in expected.items():
        assert len(_read_jsonl(demo / rel)) == n, rel
    pretrain = json.loads((demo / "meta_pretrain.json").read_text())
    sft = json.loads((demo / "meta_sft.json").read_text())
    assert sorted(pretrain) == ["demo_captions", "demo_reasoning_train", "demo_text"]
    assert sorted(sft) == ["demo_captions", "demo_reasoning_train"]
    for entry in [*pretrain.values(), *sft.values()]:
        assert entry["root"] == str(demo / "images")
        assert entry["length"] == len(_read_jsonl(Path(entry["annotation"])))
        assert (entry["repeat_time"], entry["data_augment"], entry["max_dynamic_patch"]) == (1, False, 6)
    assert "reasoning/train.jsonl" in (demo / "README.md").read_text()


def test_every_image_exists_and_records_have_the_documented_keys(demo: Path) -> None:
    keys = {
        "text/corpus.jsonl": ["id", "conversations"],
        "captions/captions.jsonl": ["id", "image", "conversations"],
        "reasoning/train.jsonl": ["id", "image", "conversations"],
        "reasoning/test.jsonl": ["id", "image", "question", "answer", "solution"],
        "mpo/pairs.jsonl": ["id", "image", "question", "chosen", "rejected"],
        "prm/train.jsonl": ["id", "image", "question", "steps", "labels", "answer", "final_correct"],
        "reasoning/prm.jsonl": ["id", "image", "question", "answer", "solution"],
    }
    for rel, expected in keys.items():
        records = _read_jsonl(demo / rel)
        ids = [r["id"] for r in records]
        assert ids == sorted(ids) and len(set(ids)) == len(ids), rel
        for record in records:
            assert list(record) == expected, rel
            if "image" in record:
                assert (demo / "images" / record["image"]).is_file()
            if "conversations" in record:
                turns = record["conversations"]
                assert [t["from"] for t in turns] == ["human", "gpt"]
                assert turns[0]["value"].count("<image>") == (1 if "image" in record else 0)
            if "question" in record:
                assert "<image>" not in record["question"]
    sizes = {Image.open(p).size for p in (demo / "images" / "reasoning").rglob("*.png")}
    assert sizes == {(64, 64)}
    photos = list((demo / "images" / "photos").glob("*.jpg"))
    assert 1 <= len(photos) <= 0.1 * DemoSizes.tiny().captions


def test_test_split_is_disjoint_from_training_images(demo: Path) -> None:
    def image_hashes(rel: str) -> set[str]:
        return {
            hashlib.sha256((demo / "images" / r["image"]).read_bytes()).hexdigest()
            for r in _read_jsonl(demo / rel)
        }

    test = image_hashes("reasoning/test.jsonl")
    assert len(test) == DemoSizes.tiny().reasoning_test
    for rel in (
        "reasoning/train.jsonl",
        "reasoning/prm.jsonl",
        "mpo/pairs.jsonl",
        "prm/train.jsonl",
        "captions/captions.jsonl",
    ):
        assert not test & image_hashes(rel), rel
    # The PRM source split is held out from SFT too: the policy samples its PRM data on unseen items.
    prm_source = image_hashes("reasoning/prm.jsonl")
    assert len(prm_source) == DemoSizes.tiny().reasoning_prm
    assert not prm_source & image_hashes("reasoning/train.jsonl")


def test_reasoning_answers_are_balanced_and_solutions_extract_to_them(tmp_path: Path) -> None:
    sizes = DemoSizes.tiny().model_copy(update={"reasoning_train": 500})
    write_demo_dataset(str(tmp_path / "d"), seed=3, sizes=sizes)
    train = _read_jsonl(tmp_path / "d" / "reasoning/train.jsonl")
    answers = collections.Counter(extract_answer(r["conversations"][1]["value"]) for r in train)
    assert sorted(answers) == ["0", "1", "2", "3", "4"]
    for answer, n in answers.items():
        assert 0.10 <= n / len(train) <= 0.30, (answer, n)
    colour_questions = sum("shapes are there" in r["conversations"][0]["value"] for r in train)
    assert colour_questions == 250
    for record in _read_jsonl(tmp_path / "d" / "reasoning/test.jsonl"):
        assert extract_answer(record["solution"]) == record["answer"]
        assert len(record["solution"].split("\n")) == 3


def test_mpo_chosen_is_correct_and_rejected_is_not(demo: Path) -> None:
    test_answers = {}
    for record in _read_jsonl(demo / "mpo/pairs.jsonl"):
        answer = extract_answer(record["chosen"])
        assert answer is not None
        test_answers[record["id"]] = answer
        assert not is_correct(record["rejected"], answer)
        assert record["rejected"] != record["chosen"]
    assert len(test_answers) == DemoSizes.tiny().mpo_pairs


def test_prm_labels_are_true_until_the_first_error(tmp_path: Path) -> None:
    sizes = DemoSizes.tiny().model_copy(update={"prm_solutions": 400})
    write_demo_dataset(str(tmp_path / "d"), seed=0, sizes=sizes)
    records = _read_jsonl(tmp_path / "d" / "prm/train.jsonl")
    right_with_false_step = 0
    for r in records:
        labels = r["labels"]
        assert len(labels) == len(r["steps"]) == 3
        first_false = labels.index(False) if False in labels else len(labels)
        assert labels == [True] * first_false + [False] * (len(labels) - first_false)
        solution = "\n".join(r["steps"])
        assert r["final_correct"] == is_correct(solution, r["answer"])
        if all(labels):
            assert r["final_correct"]
        if not r["final_correct"]:
            assert labels[-1] is False
        right_with_false_step += r["final_correct"] and not all(labels)
    all_true = sum(all(r["labels"]) for r in records)
    assert all_true == 200  # exactly half are reference solutions
    assert right_with_false_step > 0


def test_extract_answer_and_is_correct() -> None:
    assert extract_answer("I see a red circle.\nThe red one is the circle.\nSo the answer is 1.") == "1"
    assert extract_answer("So the answer is 12.  \n") == "12"
    assert extract_answer("So the answer is 2.\nI changed my mind.") is None
    assert extract_answer("So the answer is two.") is None
    assert extract_answer("") is None
    assert is_correct("So the answer is 03.", "3")
    assert not is_correct("So the answer is 4.", "3")
    assert not is_correct("the answer is 3", "3")


def test_solution_steps_phrasing() -> None:
    objects = [("red", "circle"), ("blue", "square"), ("red", "triangle")]
    assert solution_steps(Question("colour", "red"), objects) == [
        "I see a red circle, a blue square and a red triangle.",
        "The red ones are the circle and the triangle.",
        "So the answer is 2.",
    ]
    assert solution_steps(Question("colour", "green"), objects)[1:] == [
        "There are no green ones.",
        "So the answer is 0.",
    ]
    assert solution_steps(Question("shape", "square"), objects)[1:] == [
        "The square is blue.",
        "So the answer is 1.",
    ]
    two_circles = [("red", "circle"), ("green", "circle")]
    assert solution_steps(Question("shape", "circle"), two_circles)[1] == "The circles are red and green."


def test_label_steps() -> None:
    ref = ["a", "b", "c"]
    assert label_steps(["a", "b", "c"], ref) == [True, True, True]
    assert label_steps(["a", "x", "c"], ref) == [
        True,
        False,
        False,
    ]  # a right step after an error is still false
    assert label_steps(["x", "b", "c"], ref) == [False, False, False]
    assert label_steps(["a", "b", "c", "d"], ref) == [True, True, True, False]


def test_misread_of_an_irrelevant_shape_keeps_the_answer_but_not_the_labels() -> None:
    rng = random.Random(0)
    seen = collections.Counter()
    for _ in range(300):
        item = sample_item(rng, rng.choice(["colour", "shape"]), rng.randint(0, 4))
        steps, kind = perturb(rng, item, error="misread")
        labels = label_steps(steps, list(item.steps))
        assert kind == "misread" and labels[0] is False and steps != list(item.steps)
        seen[is_correct("\n".join(steps), item.answer)] += 1
    assert seen[True] > 0 and seen[False] > 0


def test_render_scene_draws_the_shapes() -> None:
    scene = Scene(
        shapes=(
            Shape("square", "red", 10, 10, 5, (220, 40, 40)),
            Shape("circle", "blue", 40, 40, 8, (40, 80, 220)),
        ),
        background=(250, 250, 250),
    )
    image = render_scene(scene)
    assert image.size == (64, 64)
    assert image.getpixel((10, 10)) == (220, 40, 40)
    assert image.getpixel((40, 40)) == (40, 80, 220)
    assert image.getpixel((60, 5)) == (250, 250, 250)
    assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
    assert png_bytes(image) == png_bytes(render_scene(scene))


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    write_demo_dataset(str(out), sizes=DemoSizes.tiny())  # an existing empty directory is fine
    with pytest.raises(FileExistsError, match="not empty"):
        write_demo_dataset(str(out), sizes=DemoSizes.tiny())
    (out / "images" / "stale.png").write_bytes(b"old")
    (out / "keep.txt").write_text("not ours")
    write_demo_dataset(str(out), sizes=DemoSizes.tiny(), overwrite=True)
    assert not (out / "images" / "stale.png").exists()
    assert (out / "keep.txt").exists()
    with pytest.raises(FileExistsError, match="is a file"):
        write_demo_dataset(str(out / "keep.txt"), sizes=DemoSizes.tiny())


def test_sizes_reject_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValueError):
        DemoSizes(text=5)
    with pytest.raises(ValueError):
        DemoSizes(reasoning_test=0)


def test_iter_demo_texts_yields_every_turn_without_image_tokens(demo: Path) -> None:
    texts = list(iter_demo_texts(str(demo)))
    sizes = DemoSizes.tiny()
    assert len(texts) == 2 * (sizes.text_corpus + sizes.captions + sizes.reasoning_train)
    assert not any("<image>" in t for t in texts)
    assert any(t.startswith("So the answer is") or "\nSo the answer is" in t for t in texts)


@pytest.fixture
def moto_s3(s3_server: str, monkeypatch: pytest.MonkeyPatch):
    """The shared moto server (`tests/conftest.py`) with the demo's bucket."""
    import boto3

    monkeypatch.setenv("AWS_REGION", "us-east-1")
    boto3.client("s3").create_bucket(Bucket="vlpipe-demo")
    return s3_server


def test_writes_to_s3_through_fsspec(moto_s3: str) -> None:
    import s3fs

    summary = write_demo_dataset("s3://vlpipe-demo/data/demo", sizes=DemoSizes.tiny())
    assert summary.out == "s3://vlpipe-demo/data/demo"
    fs = s3fs.S3FileSystem()  # endpoint from AWS_ENDPOINT_URL: s3fs honours it
    meta = json.loads(fs.cat_file("vlpipe-demo/data/demo/meta_sft.json"))
    entry = meta["demo_reasoning_train"]
    assert entry["root"] == "s3://vlpipe-demo/data/demo/images"
    assert entry["annotation"] == "s3://vlpipe-demo/data/demo/reasoning/train.jsonl"
    lines = fs.cat_file(entry["annotation"]).decode().splitlines()
    assert len(lines) == entry["length"] == DemoSizes.tiny().reasoning_train
    first = json.loads(lines[0])
    image = fs.cat_file(f"{entry['root']}/{first['image']}")
    assert image.startswith(b"\x89PNG")
    assert len(fs.find("vlpipe-demo/data/demo/images")) == summary.counts["images"]
    assert len(list(iter_demo_texts("s3://vlpipe-demo/data/demo"))) > 0
    with pytest.raises(FileExistsError):
        write_demo_dataset("s3://vlpipe-demo/data/demo", sizes=DemoSizes.tiny())
