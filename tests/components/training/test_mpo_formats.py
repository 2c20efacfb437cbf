"""MPO data in MMPR's published layout: a meta file over many JSONL files, single- and multi-image and text-only
pairs, exact token sequences and tile counts, and one clear error per bad shape."""

from __future__ import annotations

import json

import pytest

from tests.components.training.formats import MMPR_BAD, write_mmpr
from vlpipe.components.mpo.data import PairEncoder
from vlpipe.components.training.config import PairDataConfig
from vlpipe.model.conversation import IGNORE_INDEX, ConversationEncoder
from vlpipe.model.data.meta import MetaError

TOKENS_PER_TILE = 4  # the tiny preset: 32-pixel tiles, 4 visual tokens each, at most 4 tiles per sample


def _image(tiles: int) -> str:
    return "<img>" + "<IMG_CONTEXT>" * (TOKENS_PER_TILE * tiles) + "</img>"


def _chat(user: str, reply: str) -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{reply}<|im_end|>\n"


@pytest.fixture()
def pairs(tmp_path, tiny_tokenizer, tiny_image_cfg):
    meta = write_mmpr(tmp_path)
    encoder = ConversationEncoder(tiny_tokenizer, TOKENS_PER_TILE, 4096)
    return PairEncoder.create(PairDataConfig(path=str(meta)), encoder, tiny_image_cfg, 1.0)


def _decoded(tokenizer, sample) -> tuple[str, str]:
    return tokenizer.decode(sample.input_ids), tokenizer.decode(
        sample.input_ids[sample.labels != IGNORE_INDEX]
    )


def test_meta_file_pairs_keep_their_dataset_and_line(pairs):
    assert [s.name for s in pairs.pairs.sources] == ["scienceqa", "multi_image", "text_only"]
    assert [pairs.source(i) for i in range(len(pairs))] == [
        ("scienceqa", 1),
        ("scienceqa", 2),
        ("multi_image", 1),
        ("text_only", 1),
        ("text_only", 2),
    ]
    # repeat_time 2 → both scienceqa pairs twice; 1 → once; 0.5 of 2 pairs → one (a seeded pick).
    epoch = pairs.epoch_indices()
    assert epoch[:5] == [0, 0, 1, 1, 2] and len(epoch) == 6 and epoch[5] in (3, 4)


def test_single_image_pair_gets_its_placeholder_in_front(pairs, tiny_tokenizer):
    chosen, rejected = pairs.encode(0)
    # 128x32 under at most 4 tiles of 32 px: a 4x1 grid + a thumbnail = 5 tiles.
    assert chosen.num_tiles == [5] and tuple(chosen.pixel_values.shape) == (5, 3, 32, 32)
    question = (
        "Which shape is wider?\nA. the first\nB. the second\nAnswer with the option's letter from the given "
        "choices directly."
    )
    assert _decoded(tiny_tokenizer, chosen) == (_chat(f"{_image(5)}\n{question}", "A"), "A<|im_end|>")
    assert _decoded(tiny_tokenizer, rejected) == (_chat(f"{_image(5)}\n{question}", "B"), "B<|im_end|>")
    assert chosen.sample_id == "scienceqa:1"


def test_a_placeholder_stays_where_the_question_has_it(pairs, tiny_tokenizer):
    chosen, _ = pairs.encode(1)
    assert chosen.num_tiles == [1]  # 32x32: one tile, no thumbnail
    text, _ = _decoded(tiny_tokenizer, chosen)
    assert text == _chat(f"Look at this figure: {_image(1)}\nWhat colour is it?", "It is red.")


def test_multi_image_pair_splits_the_tile_budget(pairs, tiny_tokenizer):
    chosen, rejected = pairs.encode(2)
    # Two images share max_dynamic_patch (4): max(1, 4 // 2) = 2 tiles each → a 2x1 grid + a thumbnail = 3.
    assert chosen.num_tiles == [3, 3] and tuple(chosen.pixel_values.shape) == (6, 3, 32, 32)
    user = f"Image-1: {_image(3)}\nImage-2: {_image(3)}\nWhich image is wider?"
    assert _decoded(tiny_tokenizer, chosen)[0] == _chat(user, "Both are equally wide.")
    assert _decoded(tiny_tokenizer, rejected)[0] == _chat(user, "The first one.")
    assert int((chosen.input_ids == tiny_tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")).sum()) == 24


def test_text_only_pair_has_no_image(pairs, tiny_tokenizer):
    chosen, rejected = pairs.encode(3)
    assert chosen.num_tiles == [] and chosen.pixel_values is None
    assert _decoded(tiny_tokenizer, chosen) == (
        _chat("What is 3 * 4?", "3 * 4 = 12.\nSo the answer is 12."),
        "3 * 4 = 12.\nSo the answer is 12.<|im_end|>",
    )
    assert "<img>" not in _decoded(tiny_tokenizer, rejected)[0]


def test_bad_pairs_are_quarantined_with_one_clear_reason_each(tmp_path, tiny_tokenizer, tiny_image_cfg):
    meta = write_mmpr(tmp_path, bad=True)
    encoder = ConversationEncoder(tiny_tokenizer, TOKENS_PER_TILE, 4096)
    pairs = PairEncoder.create(
        PairDataConfig(path=str(meta), max_bad_fraction=0.5), encoder, tiny_image_cfg, 1.0
    )
    entries = pairs.quarantine.entries
    assert [(e["dataset"], e["line"], e["reason"]) for e in entries] == [
        ("text_only", line, "invalid_record") for line in range(3, 3 + len(MMPR_BAD))
    ]
    for entry, (_, detail) in zip(entries, MMPR_BAD, strict=True):
        assert detail in entry["detail"]
    # Over max_bad_fraction: the abort names the top reason with an example (dataset, line, detail).
    with pytest.raises(ValueError, match=r"text_only/invalid_record x5 \(e\.g\. line 3: the question has 1"):
        PairEncoder.create(PairDataConfig(path=str(meta)), encoder, tiny_image_cfg, 1.0)


def test_meta_file_errors_name_the_dataset_and_key(tmp_path, tiny_tokenizer, tiny_image_cfg):
    meta = write_mmpr(tmp_path)
    encoder = ConversationEncoder(tiny_tokenizer, TOKENS_PER_TILE, 4096)
    spec = json.loads(meta.read_text())
    spec["scienceqa"]["length"] = 3
    meta.write_text(json.dumps(spec))
    with pytest.raises(MetaError, match="dataset 'scienceqa': meta says length 3 but .* has 2 lines"):
        PairEncoder.create(PairDataConfig(path=str(meta)), encoder, tiny_image_cfg, 1.0)
    spec["scienceqa"] = {**spec["scienceqa"], "length": 2, "repeat": 2}
    meta.write_text(json.dumps(spec))
    with pytest.raises(MetaError, match="dataset 'scienceqa': key 'repeat'"):
        PairEncoder.create(PairDataConfig(path=str(meta)), encoder, tiny_image_cfg, 1.0)
    with pytest.raises(ValueError, match="image_root applies to a JSONL path"):
        PairDataConfig(path=str(meta), image_root="/data/images")


def test_a_path_outside_the_dataset_root_is_refused_before_opening(tmp_path, tiny_tokenizer, tiny_image_cfg):
    meta = write_mmpr(tmp_path)
    annotation = tmp_path / "MMPR/annotations/multi_image.jsonl"
    record = json.loads(annotation.read_text())
    record["image"] = ["multi/a.png", "../ScienceQA/train/1/image.png"]
    annotation.write_text(json.dumps(record) + "\n")
    encoder = ConversationEncoder(tiny_tokenizer, TOKENS_PER_TILE, 4096)
    pairs = PairEncoder.create(PairDataConfig(path=str(meta)), encoder, tiny_image_cfg, 1.0)
    from vlpipe.model.errors import SampleError

    with pytest.raises(SampleError) as err:
        pairs.encode(2)
    assert err.value.reason == "outside_root" and "multi_image:1" in str(err.value)


def test_the_data_step_counts_a_meta_file_of_pairs(tmp_path):
    from vlpipe.components.data.prepare import record_file_facts

    facts = record_file_facts(str(write_mmpr(tmp_path)), "mpo_pairs")
    assert facts["lines"] == 5
    assert {name: d["lines"] for name, d in facts["datasets"].items()} == {
        "scienceqa": 2,
        "multi_image": 1,
        "text_only": 2,
    }
    single = record_file_facts(str(tmp_path / "MMPR/annotations/scienceqa.jsonl"), "mpo_pairs")
    assert single["lines"] == 2 and len(single["sha256"]) == 64


@pytest.mark.slow
def test_the_mpo_stage_trains_on_mmprs_meta_file(workspace, tmp_path, tracking):
    from vlpipe.components.stages import parse_stage_config
    from vlpipe.components.training.entrypoint import run_stage

    meta = write_mmpr(tmp_path / "data", bad=True)
    cfg = parse_stage_config(
        {
            "stage": "mpo",
            "init": str(workspace["init"]),
            "output": str(tmp_path / "mpo"),
            "data": {"path": str(meta), "max_length": 512, "max_bad_fraction": 0.6},
            "trainer": {
                "global_batch_size": 2,
                "micro_batch_size": 2,
                "max_steps": 2,
                "distributed": {"zero_stage": 0},
            },
            "tracking": {"experiment": "test", "log_model": False, "system_metrics": False},
        }
    )
    summary = run_stage("mpo", cfg)
    # 10 lines: 5 good pairs, 5 bad ones; an epoch is 2 x 2 scienceqa + 1 multi-image + 1 of 2 text-only.
    assert (summary["pairs"], summary["pairs_used"], summary["pairs_per_epoch"]) == (10, 5, 6)
    assert summary["skipped_lines"] == {"text_only/invalid_record": 5}


def test_a_record_file_keeps_offsets_and_parses_each_record_when_asked(tmp_path):
    """Valid, malformed, over-long, invalid and blank lines: the records, lines and quarantine of reading every
    line, but per record only its offset, length and line (16 bytes), and the JSON parsed on each access."""
    from tests.components.training.formats import MMPR_SINGLE, MMPR_TEXT
    from vlpipe.components.mpo.data import validate_pair
    from vlpipe.components.training.records import read_record_set
    from vlpipe.model.errors import SampleError
    from vlpipe.model.files import ReadLimits

    good = [MMPR_TEXT, MMPR_SINGLE, {**MMPR_TEXT, "question": "What is 2 * 4?"}]
    long_line = json.dumps({**MMPR_TEXT, "question": "x" * 600})
    lines = [
        json.dumps(good[0]),  # 1
        "{broken",  # 2: malformed_json
        "",  # 3: blank (not counted)
        long_line,  # 4: line_too_long (the line's bytes and its newline)
        json.dumps(good[1]),  # 5
        json.dumps({**MMPR_TEXT, "chosen": ""}),  # 6: invalid_record
        "[1, 2]",  # 7: not an object
        json.dumps(good[2]),  # 8, no final newline
    ]
    data = "\n".join(lines).encode()
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(data)
    records = read_record_set(str(path), "pairs", validate_pair, 0.9, limits=ReadLimits(max_line_bytes=500))
    file = records.sources[0].file
    assert [(e["dataset"], e["line"], e["reason"]) for e in records.quarantine.entries] == [
        ("pairs", 2, "malformed_json"),
        ("pairs", 4, "line_too_long"),
        ("pairs", 6, "invalid_record"),
        ("pairs", 7, "invalid_record"),
    ]
    assert f"line has {len(long_line) + 1} bytes" in records.quarantine.entries[1]["detail"]
    assert "each line must be a JSON object" in records.quarantine.entries[3]["detail"]
    assert (records.total_lines, records.records, len(file)) == (7, 3, 3)
    assert records.report()["datasets"] == {"pairs": {"lines": 7, "used": 3}}
    assert list(file) == good and [file[i] for i in (2, 0)] == [good[2], good[0]]
    assert [file.line(i) for i in range(3)] == [1, 5, 8]
    # Each valid record is its offset (int64), length (int32) and line (int32), nothing parsed is held.
    starts = [sum(len(line) + 1 for line in lines[: n - 1]) for n in (1, 5, 8)]
    assert file.offsets.tolist() == starts and file.lengths.tolist() == [len(lines[n - 1]) for n in (1, 5, 8)]
    assert (file.offsets.dtype, file.lengths.dtype, file.lines.dtype) == ("int64", "int32", "int32")
    assert file.offsets.nbytes + file.lengths.nbytes + file.lines.nbytes == 16 * len(file)
    assert not [name for name, value in vars(file).items() if isinstance(value, list | tuple | dict)]
    # Parsed on access: a same-length rewrite of line 1 is what record(0) returns now ...
    changed = json.dumps({**good[0], "question": good[0]["question"].swapcase()}).encode()
    assert len(changed) == file.lengths[0]
    file.close()  # the open handle buffers what it read; the next read opens the file again
    path.write_bytes(changed + data[len(changed) :])
    assert file.record(0)["question"] == good[0]["question"].swapcase()
    # ... and bytes that are no longer a record are an error naming the line, not a crash.
    file.close()
    path.write_bytes(b"[" + data[1:])
    with pytest.raises(SampleError, match=r"pairs:1: changed_file: .*pairs\.jsonl changed after it was read"):
        file.record(0)
    file.close()


def test_pairs_are_numbered_across_datasets_without_a_per_pair_table(tmp_path):
    """A dataset with no usable pair in the middle of a meta file: the pair numbering skips it."""
    from vlpipe.components.mpo.data import validate_pair
    from vlpipe.components.training.records import read_record_set

    meta = write_mmpr(tmp_path)
    spec = json.loads(meta.read_text())
    bad = tmp_path / "MMPR/annotations/bad.jsonl"
    bad.write_text("{broken\n")
    spec = {"scienceqa": spec["scienceqa"], "bad": {**spec["multi_image"], "annotation": str(bad)}}
    spec["text_only"] = json.loads(meta.read_text())["text_only"]
    meta.write_text(json.dumps(spec))
    records = read_record_set(str(meta), "mpo_pairs", validate_pair, 0.5)
    encoder = PairEncoder(records, None, None, 1.0, PairDataConfig(path=str(meta)))  # type: ignore[arg-type]
    assert len(encoder) == 4
    assert [encoder.source(i) for i in range(4)] == [
        ("scienceqa", 1),
        ("scienceqa", 2),
        ("text_only", 1),
        ("text_only", 2),
    ]
    with pytest.raises(IndexError):
        encoder.source(4)
