"""Video records as InternVL reads them: segment sampling, `Frame{i}: <image>` lines, one tile per frame."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
from PIL import Image

from vlpipe.model.data.loader import DataConfig, MixtureLoader
from vlpipe.model.data.mixing import MixtureConfig
from vlpipe.model.errors import SampleError
from vlpipe.model.video import expand_video_prompt, frame_indices, read_video_frames

FRAMES = 16


def write_clip(path, frames: int = FRAMES, size: int = 48) -> None:
    """An mp4 whose frame i is a flat grey of brightness 15·i (nearly lossless: libx264, crf 0)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv444p"
        stream.options = {"crf": "0"}
        for i in range(frames):
            array = np.full((size, size, 3), 15 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _brightness(image: Image.Image) -> int:
    return round(float(np.asarray(image).mean()) / 15)


def test_frame_indices_follow_internvl_segments():
    rng = random.Random(0)
    # 16 frames, 4 segments [0,4) [4,8) [8,12) [12,16): middles (start + end - 1) // 2.
    assert frame_indices(4, 16, "middle", rng) == [1, 5, 9, 13]
    # A 3-frame video asked for 5 frames: every frame once, then the last repeated.
    assert frame_indices(5, 3, "middle", rng) == [0, 1, 2, 2, 2]
    # rand: one frame inside each segment.
    for _ in range(20):
        picks = frame_indices(4, 16, "rand", rng)
        assert all(4 * s <= p < 4 * (s + 1) for s, p in enumerate(picks))
    # 10 frames in 4 segments: bounds floor(10·i/4) = 0, 2, 5, 7, 10; middles (0+1)//2, (2+4)//2, (5+6)//2,
    # (7+9)//2 — InternVL's ranges (start, next - 1) and their midpoint.
    assert frame_indices(4, 10, "middle", rng) == [0, 3, 5, 8]


def test_video_placeholder_becomes_frame_lines():
    turns = [{"from": "human", "value": "<video>\nWhich way?"}, {"from": "gpt", "value": "Left."}]
    assert expand_video_prompt(turns, 3, "s")[0]["value"] == (
        "Frame1: <image>\nFrame2: <image>\nFrame3: <image>\nWhich way?"
    )
    # Without a placeholder, one is put first (InternVL's convention).
    assert expand_video_prompt([{"from": "human", "value": "Q?"}], 2, "s")[0]["value"] == (
        "Frame1: <image>\nFrame2: <image>\nQ?"
    )
    with pytest.raises(SampleError, match="image_count_mismatch"):
        expand_video_prompt([{"from": "human", "value": "<video>\n<image>\nQ?"}], 2, "s")


def test_video_file_and_frame_folder_decode_the_sampled_frames(tmp_path):
    write_clip(tmp_path / "clip.mp4")
    frames = read_video_frames(
        str(tmp_path / "clip.mp4"), sample_id="s", num_frames=4, sampling="middle", rng=random.Random(0),
        max_pixels=10**6,
    )  # fmt: skip
    assert [_brightness(f) for f in frames] == [1, 5, 9, 13]
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(12):  # frame_10 sorts after frame_9 (by number, as InternVL's read_frames_folder)
        Image.new("RGB", (16, 16), (15 * i,) * 3).save(folder / f"frame_{i}.png")
    frames = read_video_frames(
        str(folder), sample_id="s", num_frames=3, sampling="middle", rng=random.Random(0), max_pixels=10**6
    )
    assert [_brightness(f) for f in frames] == [1, 5, 9]


def _video_dataset(tmp_path, records, **spec):
    (tmp_path / "v.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    meta = tmp_path / "meta.json"
    entry = {"root": str(tmp_path / "media"), "annotation": str(tmp_path / "v.jsonl"), **spec}
    meta.write_text(json.dumps({"video": entry}))
    return meta


def test_loader_trains_video_records(tmp_path, tiny_tokenizer, tiny_image_cfg, tiny_preset):
    media = tmp_path / "media"
    media.mkdir()
    write_clip(media / "clip.mp4")
    conv = [{"from": "human", "value": "<video>\nWhat changes?"}, {"from": "gpt", "value": "It brightens."}]
    meta = _video_dataset(
        tmp_path,
        [{"id": "v1", "video": "clip.mp4", "conversations": conv}],
        min_num_frame=4,
        max_num_frame=4,
        sampling_method="middle",
    )
    cfg = DataConfig(meta=str(meta), max_length=2048, augment=False, mixture=MixtureConfig(language_ratio=0))
    loader = MixtureLoader(cfg, tiny_tokenizer, tiny_image_cfg, tiny_preset.tokens_per_tile)
    sample = next(iter(loader))
    assert sample.num_tiles == [1, 1, 1, 1]  # one tile per frame
    assert sample.pixel_values.shape == (4, 3, tiny_image_cfg.tile_size, tiny_image_cfg.tile_size)
    context = tiny_tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert int((sample.input_ids == context).sum()) == 4 * tiny_preset.tokens_per_tile
    text = tiny_tokenizer.decode(sample.input_ids[sample.input_ids != context])
    assert (
        "Frame1: <img></img>\nFrame2: <img></img>\nFrame3: <img></img>\nFrame4: <img></img>\nWhat changes?"
        in text
    )
    # The frames are the segment middles 1, 5, 9, 13 (brightness 15·i, undone from the normalisation).
    mean, std = np.asarray(tiny_image_cfg.image_mean), np.asarray(tiny_image_cfg.image_std)
    pixels = sample.pixel_values.numpy().transpose(0, 2, 3, 1) * std + mean
    assert [round(float(p.mean()) * 255 / 15) for p in pixels] == [1, 5, 9, 13]
    # The V2PE positions step through every frame's tokens.
    assert sample.position_ids.shape == sample.input_ids.shape


def test_bad_videos_are_quarantined_with_their_reason(tmp_path, tiny_tokenizer, tiny_image_cfg, tiny_preset):
    media = tmp_path / "media"
    media.mkdir()
    write_clip(media / "ok.mp4")
    (media / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    (media / "empty").mkdir()
    (tmp_path / "outside.mp4").write_bytes((media / "ok.mp4").read_bytes())
    conv = [{"from": "human", "value": "<video>\nQ?"}, {"from": "gpt", "value": "A."}]
    records = [
        {"video": "ok.mp4", "conversations": conv},
        {"video": "corrupt.mp4", "conversations": conv},
        {"video": "empty", "conversations": conv},
        {"video": "missing.mp4", "conversations": conv},
        {"video": "../outside.mp4", "conversations": conv},
        {"video": "ok.mp4", "image": "x.png", "conversations": conv},
        {"video": 7, "conversations": conv},
    ]
    meta = _video_dataset(tmp_path, records, min_num_frame=2, max_num_frame=3)
    cfg = DataConfig(
        meta=str(meta), max_length=2048, mixture=MixtureConfig(language_ratio=0, max_bad_fraction=1.0)
    )
    loader = MixtureLoader(cfg, tiny_tokenizer, tiny_image_cfg, tiny_preset.tokens_per_tile)
    for _ in loader:
        if loader.processed >= 3 * len(records):
            break
    reasons = {e["line"]: e["reason"] for e in loader.quarantine.entries}
    assert reasons == {
        2: "corrupt_video",
        3: "empty_video",
        4: "missing_video",
        5: "outside_root",
        6: "malformed",
        7: "malformed",
    }


def test_benchmark_rows_with_video(tmp_path):
    from vlpipe.components.evaluate.benchmarks import load_benchmark
    from vlpipe.components.evaluate.config import BenchmarkSpec

    images = tmp_path / "images"
    images.mkdir()
    write_clip(images / "clip.mp4")
    rows = [
        {"id": "v1", "video": "clip.mp4", "question": "How bright is the last frame?", "answer": "13"},
        {"id": "v2", "video": "../escape.mp4", "question": "Q?", "answer": "1"},
    ]
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = BenchmarkSpec(
        name="video", path=str(tmp_path / "test.jsonl"), format="demo", image_root=str(images), video_frames=4
    )
    loaded = load_benchmark(spec)
    (item,) = loaded.items
    assert item.frames and len(item.images) == 4
    assert item.prompt_text == (
        "Frame1: <image>\nFrame2: <image>\nFrame3: <image>\nFrame4: <image>\nHow bright is the last frame?"
    )
    assert [_brightness(Image.open(io.BytesIO(b))) for b in item.images] == [1, 5, 9, 13]
    assert [(s.item_id, s.reason) for s in loaded.skipped] == [("v2", "outside_root")]


def test_prompt_frames_are_one_tile_and_images_share_the_budget(tiny_image_cfg):
    from vlpipe.model.prompt import image_pixels

    wide = Image.new("RGB", (128, 32), "red")  # 4x1 grid + thumbnail alone
    assert image_pixels([wide], tiny_image_cfg)[0] == [5]
    assert image_pixels([wide, wide], tiny_image_cfg)[0] == [3, 3]
    assert image_pixels([wide, wide], tiny_image_cfg, frames=True)[0] == [1, 1]
