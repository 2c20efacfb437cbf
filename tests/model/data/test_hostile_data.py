"""Hostile datasets: every record is quarantined with its reason, nothing outside the root is opened, reads stay
bounded (no hang on a FIFO, no endless read of /dev/zero, no gigabytes for a 50 MB line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.model.data.hostile import SECRETS, build_hostile_dataset
from vlpipe.model.errors import SampleError
from vlpipe.model.files import DatasetRoots, JsonlReader, ReadLimits, read_bounded
from vlpipe.model.record import check_record, image_list

# Runs in a fresh interpreter so that an audit hook sees every file the loader opens.
_PROBE = textwrap.dedent(
    """
    import json, os, resource, sys, time
    from transformers import AutoTokenizer
    from vlpipe.model.data.loader import DataConfig, MixtureLoader
    from vlpipe.model.data.mixing import MixtureConfig
    from vlpipe.model.image import ImageProcessingConfig

    args = json.loads(sys.argv[1])
    tokenizer = AutoTokenizer.from_pretrained(args["tokenizer"])
    image_cfg = ImageProcessingConfig.model_validate_json(args["image_cfg"])
    opened = []

    def hook(event, hook_args):
        if event == "open" and hook_args and isinstance(hook_args[0], (str, bytes, os.PathLike)):
            opened.append(os.path.realpath(os.fsdecode(hook_args[0])))

    sys.addaudithook(hook)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    config = DataConfig(meta=args["meta"], mode="sft", max_length=512, mixture=MixtureConfig(max_bad_fraction=1.0, language_ratio=0))
    loader = MixtureLoader(config, tokenizer, image_cfg, args["tokens_per_tile"])
    for _ in loader:
        if loader.processed >= 3 * args["records"]:  # every record drawn about three times
            break
    print(json.dumps({
        "entries": loader.quarantine.entries,
        "opened": opened,
        "seconds": time.perf_counter() - start,
        "extra_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before,
    }))
    """
)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    return build_hostile_dataset(tmp_path_factory.mktemp("hostile"))


def test_hostile_dataset_is_quarantined_confined_and_bounded(
    hostile, tiny_tokenizer, tiny_preset, tiny_image_cfg
):
    meta, expected, outside = hostile
    tmp = meta.parent.parent
    tokenizer_dir = tmp / "tokenizer"
    tiny_tokenizer.save_pretrained(tokenizer_dir)
    records = (meta.parent / "data.jsonl").read_bytes().count(b"\n")
    args = {
        "meta": str(meta),
        "tokenizer": str(tokenizer_dir),
        "image_cfg": tiny_image_cfg.model_dump_json(),
        "tokens_per_tile": tiny_preset.tokens_per_tile,
        "records": records,
    }
    # The whole fixture (including a 50 MB line, a FIFO and /dev/zero) is checked within 120 s or this fails
    # (a few seconds here; a loader that blocks on the FIFO or reads /dev/zero to its end never finishes, and the
    # margin is for the interpreter's imports on a loaded machine).
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])

    got = {}
    for entry in result["entries"]:
        assert entry["line"] not in got, f"line {entry['line']} quarantined twice: {entry}"
        got[entry["line"]] = entry["reason"]
    assert got == expected
    assert result["extra_rss_kb"] < 1024 * 1024, result["extra_rss_kb"]

    # The hook does see the loader's opens (else the check below would pass vacuously).
    assert os.path.realpath(meta.parent / "images" / "ok.png") in result["opened"]
    forbidden = [os.path.realpath(p) for p in SECRETS] + [str(outside)]
    for path in result["opened"]:
        assert not any(path == f or path.startswith(f + os.sep) for f in forbidden), path
        if path.startswith(str(tmp) + os.sep):
            assert path.startswith(str(meta.parent) + os.sep), path


def test_messages_name_the_key_and_the_fix(hostile):
    meta, _, outside = hostile
    roots = DatasetRoots(str(meta.parent / "images"))
    with pytest.raises(SampleError, match=r"outside_root: path '\.\./outside/canary\.png' resolves outside"):
        roots.resolve("../outside/canary.png", "r1")
    with pytest.raises(SampleError, match="allowed_roots"):
        roots.resolve(str(outside / "canary.png"), "r1")
    # An explicitly allowed root admits the absolute path (and the symlink into it).
    allowed = DatasetRoots(str(meta.parent / "images"), (str(outside),))
    assert allowed.resolve("link_out.png", "r1") == str(outside / "canary.png")
    with pytest.raises(SampleError, match=r"conversations\[0\]\.from must be one of .* got list \['human'\]"):
        check_record({"conversations": [{"from": ["human"], "value": "x"}]}, "r2")
    with pytest.raises(SampleError, match=r'key "image" must be a path or a list of paths, got int 5'):
        image_list({"image": 5})
    with pytest.raises(SampleError, match="file_too_large: .* raise max_file_bytes"):
        read_bounded(str(meta.parent / "images" / "huge.png"), max_bytes=1024, source="r3")


def test_reader_streams_long_lines_and_hashes_every_byte(tmp_path):
    import hashlib

    data = b'{"a": 1}\n' + b'"' + b"y" * 5000 + b'"\n' + b"\n" + b'{"b": 2}'  # no final newline
    path = tmp_path / "f.jsonl"
    path.write_bytes(data)
    reader = JsonlReader(str(path), "f", ReadLimits(max_line_bytes=100))
    lines = list(reader)
    assert [(line.number, line.value, line.error and line.error.reason) for line in lines] == [
        (1, {"a": 1}, None),
        (2, None, "line_too_long"),
        (4, {"b": 2}, None),
    ]
    assert "5003 bytes" in lines[1].error.detail  # 5002 characters and the newline
    assert reader.lines == 3 and reader.sha256 == hashlib.sha256(data).hexdigest()
    # A line of exactly max_line_bytes is kept (its newline does not count).
    exact = tmp_path / "exact.jsonl"
    exact.write_bytes(b'"' + b"z" * 98 + b'"\n')
    assert [line.value for line in JsonlReader(str(exact), "e", ReadLimits(max_line_bytes=100))] == ["z" * 98]


def test_annotation_that_is_not_a_regular_file_is_a_clear_error(tmp_path):
    from vlpipe.model.data.meta import DatasetSpec, MetaError, Quarantine, read_dataset

    os.mkfifo(tmp_path / "pipe.jsonl")
    with pytest.raises(MetaError, match="not a regular file.*point at a JSONL file"):
        read_dataset("d", DatasetSpec(annotation=str(tmp_path / "pipe.jsonl")), Quarantine())


def test_remote_roots_are_confined_by_prefix():
    roots = DatasetRoots("s3://bucket/data/images")
    assert roots.resolve("a/b.png", "r") == "s3://bucket/data/images/a/b.png"
    for bad in ("../secret.png", "s3://bucket/data/images-other/x.png", "s3://other/x.png", "/etc/passwd"):
        with pytest.raises(SampleError, match="outside_root"):
            roots.resolve(bad, "r")


def test_null_root_means_the_annotation_directory(tmp_path):
    from vlpipe.model.data.meta import Dataset, DatasetSpec

    spec = DatasetSpec(root=None, annotation=str(tmp_path / "sub" / "a.jsonl"))
    dataset = Dataset("d", spec, [])  # no index: only the roots are used
    assert dataset.image_uri("x.png") == str(Path(os.path.realpath(tmp_path)) / "sub" / "x.png")
    with pytest.raises(SampleError, match="outside_root"):
        dataset.image_uri("../x.png")
