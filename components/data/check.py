"""`vlpipe data check`: read every record of a dataset the way training will, before any GPU hour is spent.

For a meta file (or a single JSONL) and a mode, every record (or the first `limit` of each dataset) is parsed,
schema-checked, its image paths confined and their headers read (no pixel is decoded), its tiles counted with
the tokenizer's and preset's settings, and it is encoded to tokens exactly as the trainer would. The report
gives, per dataset: records, usable records, quarantined counts by reason with the first examples (file:line),
token / image / tile distributions (p50, p95, max), and for the mixture its estimated tokens and
language:multimodal ratio. MPO pairs and PRM step files (`mpo`, `prm` modes) are read by their stages' own
readers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from vlpipe.model.data.meta import DatasetSpec, MetaFile, Quarantine, load_meta, read_dataset
from vlpipe.model.errors import SampleError
from vlpipe.model.files import DEFAULT_LIMITS, ReadLimits
from vlpipe.model.storage import filesystem

CheckMode = Literal["pretrain", "sft", "mpo", "prm"]
EXAMPLES_PER_REASON = 3


@dataclass
class Vocabulary:
    """What token counts depend on: the tokenizer, the image settings and the visual tokens per tile."""

    tokenizer: Any
    image_cfg: Any
    tokens_per_tile: int
    source: str


def vocabulary_from(checkpoint: str | None, preset: str | None) -> Vocabulary:
    """The tokenizer and image settings of a checkpoint directory (no weights are loaded), or of a preset
    with a locally trained stand-in tokenizer (token counts are then approximate).

    Raises:
        ValueError: neither or both given, or the checkpoint lacks its files.
    """
    if (checkpoint is None) == (preset is None):
        raise ValueError("give exactly one of --checkpoint DIR or --preset NAME")
    from vlpipe.model.tokenizer import add_internvl_tokens

    if checkpoint is not None:
        from transformers import AutoTokenizer

        from vlpipe.model.image import ImageProcessingConfig
        from vlpipe.model.storage import localize

        path = Path(localize(checkpoint))
        config_path = path / "config.json"
        if not config_path.exists():
            raise ValueError(f"{checkpoint} has no config.json; point --checkpoint at a checkpoint directory")
        config = json.loads(config_path.read_text())
        return Vocabulary(
            add_internvl_tokens(AutoTokenizer.from_pretrained(path)),
            ImageProcessingConfig.from_pretrained(path),
            int(config.get("image_seq_length", 256)),
            f"checkpoint {checkpoint}",
        )
    from vlpipe.model.init import image_config_for
    from vlpipe.model.presets import get_preset
    from vlpipe.model.tokenizer import default_corpus, train_bpe_tokenizer

    spec = get_preset(preset)
    return Vocabulary(
        train_bpe_tokenizer(default_corpus(), vocab_size=512),
        image_config_for(spec),
        spec.tokens_per_tile,
        f"preset {preset} (stand-in tokenizer: token counts are approximate)",
    )


@dataclass
class _Tally:
    """Per-dataset counters and distributions."""

    records: int = 0
    usable: int = 0
    tokens: list[int] = field(default_factory=list)
    images: list[int] = field(default_factory=list)
    tiles: list[int] = field(default_factory=list)
    video_frames: list[int] = field(default_factory=list)

    def summary(self, quarantine: Quarantine, name: str, repeat_time: float) -> dict:
        by_reason = _reasons(quarantine, name)
        mean_tokens = float(np.mean(self.tokens)) if self.tokens else 0.0
        return {
            "records": self.records,
            "usable": self.usable,
            "quarantined": sum(slot["count"] for slot in by_reason.values()),
            "reasons": by_reason,
            "tokens": _distribution(self.tokens),
            "images_per_record": _distribution(self.images),
            "tiles_per_image": _distribution(self.tiles),
            "frames_per_video": _distribution(self.video_frames),
            "multimodal": any(n > 0 for n in self.images) or bool(self.video_frames),
            "estimated_epoch_tokens": round(mean_tokens * self.usable * repeat_time),
        }


def _reasons(quarantine: Quarantine, dataset: str) -> dict[str, dict]:
    """A dataset's quarantine entries by reason: the count and the first examples (line, detail)."""
    by_reason: dict[str, dict] = {}
    for e in quarantine.entries:
        if e["dataset"] != dataset:
            continue
        slot = by_reason.setdefault(e["reason"], {"count": 0, "examples": []})
        slot["count"] += 1
        if len(slot["examples"]) < EXAMPLES_PER_REASON:
            slot["examples"].append({"line": e["line"], "detail": e["detail"]})
    return by_reason


def _distribution(values: list[int]) -> dict:
    if not values:
        return {"count": 0}
    array = np.asarray(values)
    return {
        "count": int(array.size),
        "p50": round(float(np.percentile(array, 50)), 1),
        "p95": round(float(np.percentile(array, 95)), 1),
        "max": int(array.max()),
        "mean": round(float(array.mean()), 2),
    }


def _meta_for(source: str, image_root: str | None) -> MetaFile:
    """A meta file as is; a single JSONL as a one-dataset meta (images relative to `image_root`, default the
    JSONL's directory)."""
    if source.endswith(".jsonl"):
        fs, path = filesystem(source)
        if not fs.exists(path):
            raise FileNotFoundError(f"{source} does not exist")
        spec = DatasetSpec(annotation=source, root=image_root)
        return MetaFile(path=source, sha256="", datasets={Path(path).stem: spec})
    if image_root is not None:
        raise ValueError("--image-root applies to a single JSONL; a meta file names each dataset's root")
    return load_meta(source)


def check_conversations(
    source: str,
    mode: Literal["pretrain", "sft"],
    vocab: Vocabulary,
    *,
    limit: int | None = None,
    samples: bool = False,
    image_root: str | None = None,
    limits: ReadLimits = DEFAULT_LIMITS,
    max_length: int = 1_000_000,
    progress: bool = False,
) -> dict:
    """Check a meta file's datasets (or one JSONL) record by record; returns the report (see the module)."""
    from tqdm import tqdm

    from vlpipe.model.conversation import ConversationEncoder
    from vlpipe.model.image import image_size, num_tiles, per_image_config
    from vlpipe.model.record import image_list, video_of

    meta = _meta_for(source, image_root)
    encoder = ConversationEncoder(vocab.tokenizer, vocab.tokens_per_tile, max_length, mode)
    quarantine = Quarantine()
    datasets: dict[str, dict] = {}
    all_rows: list[dict] = []
    for name, spec in meta.datasets.items():
        dataset = read_dataset(name, spec, quarantine, limits=limits)
        cfg = vocab.image_cfg
        if spec.max_dynamic_patch is not None:
            cfg = cfg.model_copy(update={"max_tiles": max(cfg.min_tiles, spec.max_dynamic_patch)})
        tally = _Tally(records=len(dataset.index.too_long))
        n = len(dataset) if limit is None else min(limit, len(dataset))
        for i in tqdm(range(n), desc=f"check {name}", unit="rec", disable=not progress, leave=False):
            tally.records += 1
            sid = dataset.sample_id(i)
            try:
                record = dataset.record(i)
                if video_of(record):
                    frames, encoded = _check_video(dataset, record, sid, encoder, limits, cfg.max_pixels)
                    tally.video_frames.append(frames)
                    tally.usable += 1
                    tally.tokens.append(len(encoded))
                    tally.images.append(0)
                    continue
                paths = image_list(record)
                image_cfg = per_image_config(cfg, len(paths))
                tiles = []
                for rel in paths:
                    location = dataset.image_uri(rel, sid)
                    width, height = image_size(location, source=sid, max_bytes=limits.max_file_bytes)
                    tiles.append(num_tiles(width, height, image_cfg))
                encoded = encoder.encode(record, tiles, sample_id=sid)
            except SampleError as exc:
                quarantine.add(name, int(dataset.lines[i]), exc.reason, exc.detail)
                continue
            tally.usable += 1
            tally.tokens.append(len(encoded))
            tally.images.append(len(paths))
            tally.tiles += tiles
            if samples:
                all_rows.append(
                    {
                        "dataset": name,
                        "line": int(dataset.lines[i]),
                        "id": str(record.get("id")),
                        "tokens": len(encoded),
                        "tiles": tiles,
                    }
                )
        dataset.close()
        datasets[name] = tally.summary(quarantine, name, spec.repeat_time)
    language = sum(d["estimated_epoch_tokens"] for d in datasets.values() if not d["multimodal"])
    total = sum(d["estimated_epoch_tokens"] for d in datasets.values())
    records = sum(d["records"] for d in datasets.values())
    bad = sum(d["quarantined"] for d in datasets.values())
    report = {
        "source": source,
        "mode": mode,
        "vocabulary": vocab.source,
        "limit": limit,
        "datasets": datasets,
        "mixture": {
            "estimated_epoch_tokens": total,
            "language_share": round(language / total, 4) if total else None,
            "language_to_multimodal": f"1:{(total - language) / language:.2f}" if language else None,
        },
        "records": records,
        "quarantined": bad,
        "bad_fraction": round(bad / records, 6) if records else 0.0,
    }
    if samples:
        report["samples"] = all_rows
    return report


def _check_video(
    dataset, record: dict, sid: str, encoder, limits: ReadLimits, max_pixels: int
) -> tuple[int, object]:
    """(frames in the video, the record encoded with the expected training frame count). Nothing is decoded
    for a file: the frames are counted from the container."""
    from vlpipe.model.files import read_bounded
    from vlpipe.model.video import count_video_frames, is_frame_folder, mean_frames, video_record

    location = dataset.image_uri(record["video"], sid)
    if is_frame_folder(location):
        frames = len([n for n in os.listdir(location) if not n.startswith(".")])
        if not frames:
            raise SampleError(sid, "empty_video", f"frame folder {location} holds no files")
    else:
        data = read_bounded(
            location, max_bytes=limits.max_video_bytes, source=sid, missing_reason="missing_video"
        )
        frames = count_video_frames(data, sid, max_pixels)
        if frames == 0:
            raise SampleError(sid, "empty_video", "the video has no frame")
    spec = dataset.spec
    n = mean_frames(spec.min_num_frame, spec.max_num_frame, spec.sampling_method)
    return frames, encoder.encode(video_record(record, n, sid), [1] * n, sample_id=sid)


def check_records(source: str, mode: Literal["mpo", "prm"], *, image_root: str | None = None) -> dict:
    """Check MPO pairs or PRM step records (one JSONL or a meta file over many) with the stage's own reader
    and record check: per dataset, lines, usable records and the quarantined ones by reason."""
    from vlpipe.components.training.records import read_record_set

    if mode == "mpo":
        from vlpipe.components.mpo.data import DATASET
        from vlpipe.components.mpo.data import validate_pair as validate
    else:
        from vlpipe.components.prm.data import DATASET, step_record_validator
        from vlpipe.components.training.config import StepDataConfig

        validate = step_record_validator(StepDataConfig(path=source))
    try:
        records = read_record_set(source, DATASET, validate, max_bad_fraction=1.0, image_root=image_root)
    except ValueError as exc:
        if "no usable record" not in str(exc):
            raise
        return {"source": source, "mode": mode, "records": None, "error": str(exc), "bad_fraction": 1.0}
    quarantine = records.quarantine
    datasets = {}
    for s in records.sources:
        reasons = _reasons(quarantine, s.name)
        bad = sum(slot["count"] for slot in reasons.values())
        datasets[s.name] = {
            "records": s.file.total_lines,
            "usable": len(s.file),
            "quarantined": bad,
            "reasons": reasons,
        }
    total, bad = records.total_lines, len(quarantine)
    return {
        "source": source,
        "mode": mode,
        "datasets": datasets,
        "records": total,
        "quarantined": bad,
        "bad_fraction": round(bad / total, 6) if total else 0.0,
    }
