"""Benchmark loading: the demo JSONL and VLMEvalKit TSVs (options, image references, bad rows), answer checks."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from vlpipe.components.evaluate.benchmarks import (
    BenchmarkError,
    extract_choice,
    extract_free,
    load_benchmark,
)
from vlpipe.components.evaluate.config import BenchmarkSpec
from vlpipe.model.data.demo import DemoSizes, is_correct, write_demo_dataset


def _png(colour=(255, 0, 0), size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    sizes = DemoSizes(
        text_corpus=2,
        captions=2,
        reasoning_train=2,
        reasoning_test=6,
        mpo_pairs=1,
        prm_solutions=1,
        reasoning_prm=1,
    )
    write_demo_dataset(str(out), seed=0, sizes=sizes)
    return out


def test_demo_split_loads_with_default_image_root(demo_dir):
    spec = BenchmarkSpec(name="demo", path=str(demo_dir / "reasoning/test.jsonl"), format="demo", limit=4)
    loaded = load_benchmark(spec)
    assert len(loaded.items) == 4 and loaded.skipped == []
    rows = [json.loads(line) for line in (demo_dir / "reasoning/test.jsonl").read_text().splitlines()]
    for item, row in zip(loaded.items, rows, strict=False):
        assert (item.item_id, item.question, item.answer, item.kind) == (
            row["id"],
            row["question"],
            row["answer"],
            "demo",
        )
        assert item.images == ((demo_dir / "images" / row["image"]).read_bytes(),)
        assert item.prompt_text == "<image>\n" + row["question"]
        # The demo rule is vlpipe.model.data.demo's: the reference solution is right, a changed final line is wrong.
        wrong = row["solution"].rsplit("\n", 1)[0] + f"\nSo the answer is {int(row['answer']) + 1}."
        for text in (row["solution"], wrong, "no final line"):
            assert item.is_correct(item.extract(text)) == is_correct(text, row["answer"])
        assert item.extract(row["solution"]) == row["answer"]


def test_demo_bad_rows_are_skipped_with_reasons(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images/ok.png").write_bytes(_png())
    (tmp_path / "images/broken.png").write_bytes(b"not a png at all")
    lines = [
        {"id": "ok", "image": "ok.png", "question": "How many?", "answer": "1"},
        {"id": "gone", "image": "missing.png", "question": "How many?", "answer": "1"},
        {"id": "corrupt", "image": "broken.png", "question": "How many?", "answer": "1"},
        {"id": "no-answer", "image": "ok.png", "question": "How many?"},
        {"id": "blank-answer", "image": "ok.png", "question": "How many?", "answer": " "},
    ]
    text = "\n".join(json.dumps(x) for x in lines) + "\n{not json\n"
    (tmp_path / "b.jsonl").write_text(text)
    spec = BenchmarkSpec(
        name="d", path=str(tmp_path / "b.jsonl"), format="demo", image_root=str(tmp_path / "images")
    )
    loaded = load_benchmark(spec)
    assert [i.item_id for i in loaded.items] == ["ok"]
    assert [(s.item_id, s.reason) for s in loaded.skipped] == [
        ("gone", "missing_image"),
        ("corrupt", "corrupt_image"),
        ("no-answer", "missing_answer"),
        ("blank-answer", "missing_answer"),
        ("line 6", "malformed"),
    ]
    assert all(s.path == str(tmp_path / "b.jsonl") and s.benchmark == "d" for s in loaded.skipped)


def test_empty_or_all_bad_benchmark_is_an_error_naming_the_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(BenchmarkError, match=f"{empty} has no rows"):
        load_benchmark(BenchmarkSpec(name="e", path=str(empty), format="demo"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "question": "q"}) + "\n")
    with pytest.raises(BenchmarkError, match=f"every row of {bad} is bad.*missing_answer"):
        load_benchmark(BenchmarkSpec(name="b", path=str(bad), format="demo"))
    header_only = tmp_path / "h.tsv"
    header_only.write_text("index\timage\tquestion\tanswer\n")
    with pytest.raises(BenchmarkError, match=f"{header_only} has no rows"):
        load_benchmark(BenchmarkSpec(name="h", path=str(header_only), format="tsv"))
    with pytest.raises(FileNotFoundError, match="nothing.tsv"):
        load_benchmark(BenchmarkSpec(name="n", path=str(tmp_path / "nothing.tsv"), format="tsv"))


def _write_tsv(path, header, rows):
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")


def test_tsv_options_references_and_bad_rows(tmp_path):
    red, blue = _b64(_png((255, 0, 0))), _b64(_png((0, 0, 255), (40, 40)))
    header = ["index", "image", "question", "A", "B", "C", "D", "answer"]
    rows = [
        ["1", red, "What colour is it?", "red", "blue", "green", "", "A"],  # options A-C (D blank)
        ["2", blue, "How wide is it in cm?", "", "", "", "", "3.50"],  # free-form, numeric
        ["3", "!!!not base64!!!", "Q?", "x", "y", "", "", "A"],  # bad base64
        ["4", _b64(b"plain bytes, no image"), "Q?", "x", "y", "", "", "A"],  # base64 but no image
        ["5", red, "Q?", "x", "y", "", "", ""],  # missing answer
        [
            "6",
            "1",
            "Same picture: what colour?",
            "blue",
            "red",
            "",
            "",
            "red",
        ],  # image of row 1; answer as text
        ["7", red, "Q?", "x", "y", "", "", "E"],  # answer not among the options
        ["8", "", "Q?", "x", "y", "", "", "A"],  # no image
    ]
    path = tmp_path / "bench.tsv"
    _write_tsv(path, header, rows)
    loaded = load_benchmark(BenchmarkSpec(name="mmb", path=str(path), format="tsv"))
    assert [i.item_id for i in loaded.items] == ["1", "2", "6"]
    assert [(s.item_id, s.reason) for s in loaded.skipped] == [
        ("3", "corrupt_image"),
        ("4", "corrupt_image"),
        ("5", "missing_answer"),
        ("7", "bad_answer"),
        ("8", "missing_image"),
    ]
    assert "base64" in loaded.skipped[0].detail

    choice, free, reused = loaded.items
    assert choice.kind == "choice" and choice.answer == "A"
    assert choice.question == "What colour is it?\nA. red\nB. blue\nC. green"
    assert choice.options == (("A", "red"), ("B", "blue"), ("C", "green"))
    assert choice.images == (base64.b64decode(red),)
    assert choice.prompt_text == "<image>\nWhat colour is it?\nA. red\nB. blue\nC. green"
    assert reused.images == choice.images and reused.answer == "B"  # "red" is option B there

    for text, expected in [
        ("It is red.\nSo the answer is A.", "A"),
        ("The answer is (B).", "B"),
        ("Answer: C. green", "C"),
        ("the answer is green", "C"),  # option text
        ("B", "B"),
        ("I think D", None),  # D is no option
        ("", None),
    ]:
        assert choice.extract(text) == expected, text
    assert choice.is_correct(choice.extract("So the answer is A.")) and not choice.is_correct(None)

    assert free.kind == "free" and free.answer == "3.5"
    assert free.is_correct(free.extract("Measuring it.\nSo the answer is 3.5."))
    assert free.is_correct(free.extract("answer: 3.50"))
    assert not free.is_correct(free.extract("So the answer is 4."))


def test_extraction_helpers():
    options = (("A", "a cat"), ("B", "a dog"))
    assert extract_choice("A cat, I believe", options) is None  # "A" followed by text is not a letter pick
    assert extract_choice("The answer is: a dog.", options) == "B"
    assert extract_choice("answer is\nB", options) == "B"
    assert extract_free("So the answer is 1,000.") == extract_free("answer: 1000") == "1000.0"
    assert extract_free("The answer is Paris.") == "paris"


def test_tsv_limit_missing_columns_and_multi_image(tmp_path):
    img = _b64(_png())
    path = tmp_path / "multi.tsv"
    rows = [[str(i), str([img, img]) if i == 0 else img, f"Q{i}", str(i)] for i in range(5)]
    _write_tsv(path, ["index", "image", "question", "answer"], rows)
    loaded = load_benchmark(BenchmarkSpec(name="m", path=str(path), format="tsv", limit=3))
    assert [i.item_id for i in loaded.items] == ["0", "1", "2"]
    assert len(loaded.items[0].images) == 2 and loaded.items[0].prompt_text == "<image>\n<image>\nQ0"
    no_answer = tmp_path / "noanswer.tsv"
    _write_tsv(no_answer, ["index", "image", "question"], [["0", img, "Q"]])
    with pytest.raises(BenchmarkError, match="lacks the column.*answer"):
        load_benchmark(BenchmarkSpec(name="x", path=str(no_answer), format="tsv"))


def test_tsv_from_s3(s3_server, tmp_path):
    import boto3

    from vlpipe.model.storage import filesystem

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="bench")
    fs, _ = filesystem("s3://bench/x.tsv")
    content = "index\timage\tquestion\tanswer\n" + f"7\t{_b64(_png())}\tHow many?\t2\n"
    fs.pipe_file("bench/MathVista_MINI.tsv", content.encode())
    loaded = load_benchmark(BenchmarkSpec(name="mv", path="s3://bench/MathVista_MINI.tsv", format="tsv"))
    assert [(i.item_id, i.answer, i.kind) for i in loaded.items] == [("7", "2.0", "free")]
