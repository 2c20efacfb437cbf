"""The annotation index: exact offsets for every line shape, cached, and ranged reads from s3://."""

from __future__ import annotations

import hashlib
import json
import random

import pytest

import vlpipe.model.data.index as index_module
import vlpipe.model.files as files_module
from vlpipe.model.data.index import annotation_index, build_index
from vlpipe.model.data.meta import DatasetSpec, Quarantine, read_dataset
from vlpipe.model.files import JsonlReader, ReadLimits


def _reference(data: bytes, cap: int) -> tuple[list, list, int, bool]:
    """Offsets/lengths/numbers of the non-blank lines within the cap, the too-long lines, the non-empty line
    count and whether a kept line has an image key — computed the slow, obvious way."""
    parts = data.split(b"\n")
    if parts and parts[-1] == b"":
        parts = parts[:-1]
    kept, too_long, lines, offset = [], [], 0, 0
    for number, line in enumerate(parts, start=1):
        if len(line) > cap:
            too_long.append((number, len(line)))
            lines += 1
        elif line.strip():
            kept.append((offset, len(line), number))
            lines += 1
        offset += len(line) + 1
    multimodal = any(b'"image": "' in parts[n - 1] for _, _, n in kept)
    return kept, too_long, lines, multimodal


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 4096])
def test_index_matches_a_line_by_line_reading(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(index_module, "_CHUNK", chunk)  # lines straddle chunks in every possible way
    monkeypatch.setattr(files_module, "_CHUNK", chunk)  # the JSONL reader splits lines with the same code
    rng = random.Random(chunk)
    for trial in range(40):
        lines = []
        for _ in range(rng.randint(0, 25)):
            roll = rng.random()
            if roll < 0.1:
                lines.append(b"")
            elif roll < 0.15:
                lines.append(b"  \t ")
            elif roll < 0.3:
                lines.append(json.dumps({"image": "a.png", "x": "y" * rng.randint(0, 50)}).encode())
            elif roll < 0.35:
                lines.append(json.dumps({"image": None, "t": "n"}).encode())
            else:
                lines.append(json.dumps({"t": "z" * rng.randint(0, 80)}).encode())
        data = b"\n".join(lines) + (b"\n" if rng.random() < 0.5 else b"")
        path = tmp_path / f"f{trial}.jsonl"
        path.write_bytes(data)
        cap = rng.choice([10, 40, 1000])
        index = build_index(str(path), max_line_bytes=cap)
        kept, too_long, count, multimodal = _reference(data, cap)
        got = list(zip(index.offsets.tolist(), index.lengths.tolist(), index.numbers.tolist(), strict=True))
        assert got == kept
        assert index.too_long == too_long and index.lines == count and index.multimodal == multimodal
        assert index.sha256 == hashlib.sha256(data).hexdigest()
        # The JSONL reader yields the same lines: each kept one where it is, each too long one by its size
        # with its newline (none on an unterminated last line).
        reader = JsonlReader(str(path), "f", ReadLimits(max_line_bytes=cap))
        read = list(reader)
        assert [
            (r.offset, r.length, r.number)
            for r in read
            if r.error is None or r.error.reason != "line_too_long"
        ] == kept
        measured = [(r.number, r.error.detail) for r in read if r.error and r.error.reason == "line_too_long"]
        assert [n for n, _ in measured] == [n for n, _ in too_long]
        for (n, detail), (_, size) in zip(measured, too_long, strict=True):
            newline = n < len(lines) or data.endswith(b"\n")
            assert detail.startswith(f"line has {size + newline} bytes")
        assert reader.lines == count and reader.sha256 == index.sha256


def test_index_is_cached_and_rebuilt_when_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("VLPIPE_HOME", str(tmp_path / "home"))
    path = tmp_path / "a.jsonl"
    path.write_text('{"conversations": []}\n' * 3)
    first = annotation_index(str(path), max_line_bytes=100)
    calls = []
    monkeypatch.setattr(index_module, "build_index", lambda *a, **k: calls.append(1) or first)
    again = annotation_index(str(path), max_line_bytes=100)
    assert calls == [] and again.offsets.tolist() == first.offsets.tolist()  # loaded, not rebuilt
    assert len(list((tmp_path / "home" / "cache" / "index").glob("*.npz"))) == 1
    path.write_text('{"conversations": []}\n' * 4)  # new size and mtime: a new key
    monkeypatch.undo()
    monkeypatch.setenv("VLPIPE_HOME", str(tmp_path / "home"))
    assert len(annotation_index(str(path), max_line_bytes=100)) == 4


def test_records_are_read_on_demand_from_s3(s3_server, tmp_path, monkeypatch):
    import boto3

    monkeypatch.setenv("VLPIPE_HOME", str(tmp_path / "home"))
    boto3.client("s3").create_bucket(Bucket="data")
    conv = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]
    lines = [json.dumps({"id": f"r{i}", "conversations": conv}) for i in range(5)]
    lines.insert(2, "{broken")
    boto3.client("s3").put_object(Bucket="data", Key="ann/a.jsonl", Body=("\n".join(lines) + "\n").encode())
    quarantine = Quarantine()
    dataset = read_dataset("d", DatasetSpec(annotation="s3://data/ann/a.jsonl", root=None), quarantine)
    assert len(dataset) == 6 and dataset.roots.root == "s3://data/ann"
    assert dataset.record(5)["id"] == "r4" and dataset.record(0)["id"] == "r0"  # ranged reads, any order
    with pytest.raises(Exception, match="malformed_json"):
        dataset.record(2)
    assert [r["id"] for r in dataset.scan(quarantine)] == [f"r{i}" for i in range(5)]
    assert [(e["line"], e["reason"]) for e in quarantine.entries] == [(3, "malformed_json")]
