import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vlpipe.model.data.demo import DemoSizes, iter_demo_texts, write_demo_dataset
from vlpipe.model.data.loader import DataConfig, MixtureLoader
from vlpipe.model.data.meta import MetaError, Quarantine, load_meta, read_dataset
from vlpipe.model.data.mixing import MixedStream, MixtureConfig, epoch_order


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from vlpipe.model.checkpoint import load_checkpoint
    from vlpipe.model.init import init_random

    root = tmp_path_factory.mktemp("demo")
    write_demo_dataset(str(root / "data"), seed=0, sizes=DemoSizes.tiny())
    init_random("tiny", str(root / "model"), corpus=list(iter_demo_texts(str(root / "data"))), vocab_size=400)
    return root / "data", load_checkpoint(root / "model")


def _loader(meta, lm, **kwargs):
    mixture = kwargs.pop("mixture", MixtureConfig())
    cfg = DataConfig(meta=str(meta), mode="pretrain", max_length=512, mixture=mixture, **kwargs)
    return MixtureLoader(cfg, lm.tokenizer, lm.image_cfg, lm.tokens_per_tile)


def _write_meta(path: Path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def test_meta_validation_names_dataset_and_key(tmp_path):
    good = {"root": "", "annotation": "a.jsonl", "repeat_time": 0.5}
    with pytest.raises(MetaError, match=r"dataset 'b'.*key 'repeat_time'.*greater than 0"):
        load_meta(_write_meta(tmp_path / "m.json", {"a": good, "b": {**good, "repeat_time": -1}}))
    with pytest.raises(MetaError, match=r"dataset 'a'.*key 'colour'.*Extra inputs"):
        load_meta(_write_meta(tmp_path / "m.json", {"a": {**good, "colour": "red"}}))
    with pytest.raises(MetaError, match=r"dataset 'a'.*key 'annotation'.*Field required"):
        load_meta(_write_meta(tmp_path / "m.json", {"a": {"root": ""}}))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MetaError, match="not valid JSON"):
        load_meta(str(tmp_path / "bad.json"))
    with pytest.raises(FileNotFoundError):
        load_meta(str(tmp_path / "missing.json"))
    meta = load_meta(_write_meta(tmp_path / "m.json", {"a": {**good, "length": 3}}))
    assert meta.datasets["a"].repeat_time == 0.5
    (tmp_path / "a.jsonl").write_text('{"conversations": []}\n')
    spec = meta.datasets["a"].model_copy(update={"annotation": str(tmp_path / "a.jsonl")})
    with pytest.raises(MetaError, match="length 3 but .* has 1 lines"):
        read_dataset("a", spec, Quarantine())


def test_fractional_and_repeated_epochs():
    assert sorted(epoch_order(10, 1.0, 0, "d", 0)) == list(range(10))
    half = epoch_order(10, 0.5, 0, "d", 0)
    assert len(half) == 5 and len(set(half)) == 5
    twice = epoch_order(10, 2.5, 0, "d", 0)
    assert len(twice) == 25 and all(list(twice).count(i) >= 2 for i in range(10))
    assert list(epoch_order(10, 1.0, 0, "d", 0)) != list(
        epoch_order(10, 1.0, 0, "d", 1)
    )  # reshuffled per epoch
    assert epoch_order(10, 1.0, 0, "d", 0).dtype == np.int32  # 4 bytes per entry


def test_achieved_ratio_within_two_percent_of_target(demo):
    data, lm = demo
    loader = _loader(data / "meta_pretrain.json", lm)
    it = iter(loader)
    for _ in range(600):
        next(it)
    # 1:3 language:multimodal → 25% language tokens, measured on real encoded token counts.
    assert abs(loader.achieved_language_share - 0.25) < 0.02
    other = _loader(
        data / "meta_pretrain.json", lm, mixture=MixtureConfig(language_ratio=1, multimodal_ratio=1)
    )
    it = iter(other)
    for _ in range(600):
        next(it)
    assert abs(other.achieved_language_share - 0.5) < 0.02


def test_weights_override_the_ratio(demo):
    data, lm = demo
    weights = {"demo_text": 0.0, "demo_captions": 1.0, "demo_reasoning_train": 1.0}
    loader = _loader(data / "meta_pretrain.json", lm, mixture=MixtureConfig(weights=weights))
    items = loader.stream.take(300)
    assert {i.dataset for i in items} == {"demo_captions", "demo_reasoning_train"}
    with pytest.raises(ValueError, match="unknown datasets"):
        _loader(data / "meta_pretrain.json", lm, mixture=MixtureConfig(weights={"nope": 1.0}))


def test_ratio_needs_a_language_dataset(demo):
    data, lm = demo
    with pytest.raises(ValueError, match="no language dataset"):
        _loader(data / "meta_sft.json", lm)  # SFT meta is all multimodal


def test_rank_sharding_has_no_overlap_and_no_gap(demo):
    data, lm = demo
    meta = load_meta(str(data / "meta_pretrain.json"))
    q = Quarantine()
    datasets = [read_dataset(n, s, q) for n, s in meta.datasets.items()]
    cfg = MixtureConfig(estimate_samples=8)
    one = MixedStream(datasets, cfg, lambda d, i: 10 if "image" in d.record(i) else 30).take(90)
    ranks = [
        MixedStream(
            datasets, cfg, lambda d, i: 10 if "image" in d.record(i) else 30, rank=r, world_size=3
        ).take(30)
        for r in range(3)
    ]
    merged = sorted((i for rank in ranks for i in rank), key=lambda i: i.index)
    assert merged == one
    assert [i.index for i in ranks[1]] == list(range(1, 90, 3))


def test_resume_yields_exactly_the_uninterrupted_samples(demo):
    data, lm = demo
    straight = _loader(data / "meta_pretrain.json", lm)
    it = iter(straight)
    expected = [next(it) for _ in range(40)]
    first = _loader(data / "meta_pretrain.json", lm)
    it = iter(first)
    for _ in range(25):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
    resumed = _loader(data / "meta_pretrain.json", lm)
    resumed.load_state_dict(state)
    it = iter(resumed)
    for want in expected[25:]:
        got = next(it)
        assert got.sample_id == want.sample_id
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.position_ids, want.position_ids)
        assert (got.pixel_values is None and want.pixel_values is None) or torch.equal(
            got.pixel_values, want.pixel_values
        )
    assert resumed.stats.tokens == straight.stats.tokens


def test_quarantine_counts_each_kind_of_bad_input(tmp_path, demo):
    data, lm = demo
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(images / "ok.png")
    (images / "corrupt.png").write_bytes(b"\x89PNG garbage")
    conv = [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]
    lines = [json.dumps({"id": f"good{i}", "image": "ok.png", "conversations": conv}) for i in range(12)] + [
        "{this is not json",
        json.dumps({"id": "missing", "image": "nope.png", "conversations": conv}),
        json.dumps({"id": "corrupt", "image": "corrupt.png", "conversations": conv}),
        json.dumps({"id": "mismatch", "image": ["ok.png", "ok.png"], "conversations": conv}),
        json.dumps(
            {
                "id": "long",
                "image": "ok.png",
                "conversations": [{"from": "human", "value": "x " * 300 + "<image>"}, conv[1]],
            }
        ),
    ]
    (tmp_path / "mm.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "text.jsonl").write_text(
        json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
        + "\n"
    )
    meta = _write_meta(tmp_path / "meta.json", {
        "mm": {"root": str(images), "annotation": str(tmp_path / "mm.jsonl")},
        "text": {"root": "", "annotation": str(tmp_path / "text.jsonl")},
    })  # fmt: skip
    cfg = DataConfig(meta=meta, mode="sft", max_length=200, mixture=MixtureConfig(max_bad_fraction=0.5))
    loader = MixtureLoader(cfg, lm.tokenizer, lm.image_cfg, lm.tokens_per_tile)
    it = iter(loader)
    got = [next(it) for _ in range(60)]
    assert all(s.sample_id.split(":")[0] in ("mm", "text") for s in got)
    counts = loader.quarantine.counts
    assert counts["mm/malformed_json"] == 1  # read once
    # each bad record is drawn once per epoch of the multimodal dataset (16 records) but counted once
    assert loader.bad_items > 4
    for reason in ("missing_image", "corrupt_image", "image_count_mismatch", "too_long"):
        assert counts[f"mm/{reason}"] == 1, counts
    example = next(e for e in loader.quarantine.entries if e["reason"] == "missing_image")
    assert example["line"] == 14 and "nope.png" not in example["dataset"]
    strict = DataConfig(meta=meta, mode="sft", max_length=200, mixture=MixtureConfig(max_bad_fraction=0.05))
    strict_loader = MixtureLoader(strict, lm.tokenizer, lm.image_cfg, lm.tokens_per_tile)
    # Records are parsed when drawn: the bad share is judged on the draws so far, from the 50th draw on.
    with pytest.raises(
        ValueError, match=r"samples were bad .*max_bad_fraction 5.0%\): mm/\w+ x1 \(e\.g\. line"
    ):
        for _ in strict_loader:
            pass
    assert strict_loader.processed == 50


def test_manifest_hashes_and_mlflow_inputs(tmp_path, demo, monkeypatch):
    import mlflow

    from vlpipe.model.data.provenance import log_manifest_to_mlflow

    data, lm = demo
    loader = _loader(data / "meta_pretrain.json", lm)
    it = iter(loader)
    for _ in range(50):
        next(it)
    manifest = loader.manifest(packing={"max_tokens": 512, "max_tiles": 8})
    assert (
        manifest["meta"]["sha256"] == hashlib.sha256((data / "meta_pretrain.json").read_bytes()).hexdigest()
    )
    ann = manifest["datasets"]["demo_text"]
    assert ann["annotation_sha256"] == hashlib.sha256((data / "text/corpus.jsonl").read_bytes()).hexdigest()
    assert sum(d["samples_used"] for d in manifest["datasets"].values()) == 50
    assert manifest["seed"] == 0 and manifest["packing"]["max_tokens"] == 512
    again = _loader(data / "meta_pretrain.json", lm).manifest(packing={"max_tokens": 512, "max_tiles": 8})
    assert again["manifest_sha256"] == manifest["manifest_sha256"]  # identity does not depend on progress

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run() as run:
        log_manifest_to_mlflow(manifest, loader.quarantine.report())
    stored = mlflow.get_run(run.info.run_id)
    names = sorted(d.dataset.name for d in stored.inputs.dataset_inputs)
    assert names == ["demo_captions", "demo_reasoning_train", "demo_text"]
    assert stored.data.tags["data_manifest_sha256"] == manifest["manifest_sha256"]
    art = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/data/manifest.json")
    assert art["datasets"]["demo_text"]["annotation_sha256"] == ann["annotation_sha256"]


def test_dataset_read_through_s3(tmp_path, demo, s3_server, monkeypatch):
    import boto3

    _, lm = demo
    monkeypatch.setenv("VLPIPE_HOME", str(tmp_path / "home"))
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="data")
    write_demo_dataset("s3://data/demo", seed=0, sizes=DemoSizes.tiny())
    meta = load_meta("s3://data/demo/meta_pretrain.json")
    assert meta.datasets["demo_captions"].root.startswith("s3://data/demo")
    loader = _loader("s3://data/demo/meta_pretrain.json", lm)
    it = iter(loader)
    samples = [next(it) for _ in range(20)]
    assert any(s.pixel_values is not None for s in samples) and len(loader.quarantine) == 0
