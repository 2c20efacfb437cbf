"""From a meta file to encoded training samples: read → mix → decode → tile → augment → tokenize.

Bad samples (malformed lines, missing or corrupt images, placeholder/image mismatches, over-long samples) are
skipped into the `Quarantine` with dataset, line and reason; the run fails when their share passes
`max_bad_fraction`. Everything random (JPEG quality, V2PE δ) is drawn from a generator seeded with the item's
global stream index, so a resumed run encodes every sample exactly as an uninterrupted one.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator

import torch
from transformers import PreTrainedTokenizerBase

from vlpipe.model.conversation import ConversationEncoder, EncodedSample, image_list
from vlpipe.model.data.config import DataConfig
from vlpipe.model.data.meta import Dataset, MetaFile, Quarantine, load_meta, read_dataset
from vlpipe.model.data.mixing import MixedStream, MixItem, MixtureStats
from vlpipe.model.errors import SampleError
from vlpipe.model.image import (
    ImageProcessingConfig,
    image_size,
    load_image,
    num_tiles,
    per_image_config,
    process_image,
)
from vlpipe.model.record import video_of
from vlpipe.model.video import frame_count, frame_tile_config, mean_frames, read_video_frames, video_record

log = logging.getLogger(__name__)
# Skips are only judged against max_bad_fraction once this many samples were seen (one bad sample out of
# three says little about a dataset).
MIN_SEEN_FOR_BAD_FRACTION = 50


class MixtureLoader:
    """Encoded samples of a mixture for one data-parallel rank, with quarantine and provenance counters.

    Args:
        config: data settings.
        tokenizer: tokenizer with InternVL's tokens.
        image_cfg: the checkpoint's image processing settings.
        tokens_per_tile: visual tokens per tile.
        rank, world_size: data-parallel position.
        storage_options: fsspec options (credentials come from the environment).
    """

    def __init__(
        self,
        config: DataConfig,
        tokenizer: PreTrainedTokenizerBase,
        image_cfg: ImageProcessingConfig,
        tokens_per_tile: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        storage_options: dict | None = None,
    ) -> None:
        self.config = config
        self.image_cfg = image_cfg
        self.storage_options = storage_options
        self.encoder = ConversationEncoder(
            tokenizer, tokens_per_tile, config.max_length, config.mode, system_prompt=config.system_prompt
        )
        self.meta: MetaFile = load_meta(config.meta, storage_options=storage_options)
        self.quarantine = Quarantine()
        self.datasets: list[Dataset] = [
            read_dataset(name, spec, self.quarantine, storage_options=storage_options, limits=config.limits)
            for name, spec in self.meta.datasets.items()
        ]
        self.by_name = {d.name: d for d in self.datasets}
        # A dataset with its own system message gets its own encoder (the rest share the stage's).
        self._encoders = {
            d.name: ConversationEncoder(
                tokenizer, tokens_per_tile, config.max_length, config.mode, system_prompt=d.spec.system_prompt
            )
            for d in self.datasets
            if d.spec.system_prompt is not None
        }
        self.stream = MixedStream(
            self.datasets, config.mixture, self._estimate_tokens, rank=rank, world_size=world_size
        )
        self.stats = MixtureStats.empty(self.stream.names)
        self._read_skips = len(self.quarantine)
        lines = sum(len(d) for d in self.datasets) + self._read_skips
        self.quarantine.check(lines, config.mixture.max_bad_fraction)
        self.processed = 0  # stream items tried, good or bad
        self.bad_items = 0  # stream items that were bad (a record drawn twice counts twice)
        self._bad_records: set[tuple[str, int]] = set()

    # -- per-sample work ------------------------------------------------------------------------------------
    def _image_cfg(self, dataset: Dataset) -> ImageProcessingConfig:
        """The checkpoint's tiling with the meta file's per-dataset `min/max_dynamic_patch`."""
        spec, cfg = dataset.spec, self.image_cfg
        max_tiles = cfg.max_tiles if spec.max_dynamic_patch is None else spec.max_dynamic_patch
        min_tiles = cfg.min_tiles if spec.min_dynamic_patch is None else spec.min_dynamic_patch
        if (max_tiles, min_tiles) == (cfg.max_tiles, cfg.min_tiles):
            return cfg
        return cfg.model_copy(update={"max_tiles": max(min_tiles, max_tiles), "min_tiles": min_tiles})

    def _estimate_tokens(self, dataset: Dataset, i: int) -> int:
        """Token count of a record from image headers only (no decoding); bad records count as 0.

        Paths are checked against the dataset's roots first: a path outside them is never opened here, and
        the record is quarantined with its reason when the mixer draws it.
        """
        cfg = self._image_cfg(dataset)
        tiles = []
        source = dataset.sample_id(i)
        try:
            record = dataset.record(i)
            if video_of(record):
                spec = dataset.spec
                frames = mean_frames(spec.min_num_frame, spec.max_num_frame, spec.sampling_method)
                encoder = self._encoders.get(dataset.name, self.encoder)
                return len(encoder.encode(video_record(record, frames, source), [1] * frames))
            paths = image_list(record)
            cfg = per_image_config(cfg, len(paths), self.config.multi_image_tiles)
            for rel in paths:
                uri = dataset.image_uri(rel, source)
                width, height = image_size(
                    uri,
                    source=source,
                    max_bytes=self.config.limits.max_file_bytes,
                    storage_options=self.storage_options,
                )
                tiles.append(num_tiles(width, height, cfg))
            return len(self._encoders.get(dataset.name, self.encoder).encode(record, tiles))
        except SampleError:
            return 0

    def encode(self, item: MixItem) -> EncodedSample:
        """Load, tile, augment and tokenize one stream item.

        Raises:
            SampleError: for a bad sample (the caller quarantines it).
        """
        dataset = self.by_name[item.dataset]
        record = dataset.record(item.record_index)
        rng = random.Random(f"vlpipe-sample:{self.config.mixture.seed}:{item.index}")
        cfg = self._image_cfg(dataset)
        augment = self.config.augment and dataset.spec.data_augment
        sample_id = dataset.sample_id(item.record_index)
        if video_of(record):
            record, tiles = self._video(dataset, record, sample_id, cfg, augment, rng)
            paths = []
        else:
            paths = image_list(record)
            cfg = per_image_config(cfg, len(paths), self.config.multi_image_tiles)
            tiles = []
        for rel in paths:
            image = load_image(
                dataset.image_uri(rel, sample_id),
                max_pixels=cfg.max_pixels,
                max_bytes=self.config.limits.max_file_bytes,
                storage_options=self.storage_options,
            )
            tiles.append(process_image(image, cfg, augment=augment, rng=rng))
        deltas = self.encoder.training_deltas(len(tiles), rng) if self.config.v2pe_training else 1.0
        pixels = None
        if tiles:
            pixels = torch.cat(tiles)
        return self._encoders.get(dataset.name, self.encoder).encode(
            record, [t.shape[0] for t in tiles], sample_id=sample_id, pixel_values=pixels, v2pe_deltas=deltas
        )

    def _video(
        self,
        dataset: Dataset,
        record: dict,
        sample_id: str,
        cfg: ImageProcessingConfig,
        augment: bool,
        rng: random.Random,
    ) -> tuple[dict, list[torch.Tensor]]:
        """A video record's sampled frames (one tile each) and the record with its `Frame{i}: <image>` lines."""
        spec = dataset.spec
        frames = read_video_frames(
            dataset.image_uri(record["video"], sample_id),
            sample_id=sample_id,
            num_frames=frame_count(spec.min_num_frame, spec.max_num_frame, "rand", rng),
            sampling=spec.sampling_method,
            rng=rng,
            root_check=lambda location: dataset.image_uri(location, sample_id),
            max_bytes=self.config.limits.max_video_bytes,
            max_pixels=cfg.max_pixels,
            storage_options=self.storage_options,
        )
        frame_cfg = frame_tile_config(cfg)
        tiles = [process_image(frame, frame_cfg, augment=augment, rng=rng) for frame in frames]
        return video_record(record, len(frames), sample_id), tiles

    def __iter__(self) -> Iterator[EncodedSample]:
        """Endless stream of good samples; bad ones go to the quarantine."""
        for item in self.stream:
            self.processed += 1
            try:
                sample = self.encode(item)
            except SampleError as exc:
                line = int(self.by_name[item.dataset].lines[item.record_index])
                # A bad record drawn again (next epoch, repeat_time > 1) is one quarantine entry, not one per
                # visit; the bad fraction below still weighs every visit.
                if (item.dataset, line) not in self._bad_records:
                    self._bad_records.add((item.dataset, line))
                    self.quarantine.add(item.dataset, line, exc.reason, exc.detail)
                self.bad_items += 1
                if self.processed >= MIN_SEEN_FOR_BAD_FRACTION:
                    self.quarantine.check(
                        self.processed, self.config.mixture.max_bad_fraction, bad=self.bad_items
                    )
                continue
            self.stats.add(item.dataset, len(sample))
            yield sample

    # -- provenance and state -------------------------------------------------------------------------------
    @property
    def achieved_language_share(self) -> float:
        return self.stats.language_share({d.name: d.is_multimodal for d in self.datasets})

    def manifest(self, packing: dict | None = None) -> dict:
        """Provenance: content hashes, counts per dataset, target and achieved ratio, seed and packing."""
        from vlpipe.model.data.provenance import build_manifest

        return build_manifest(self, packing=packing)

    def state_dict(self) -> dict:
        return {
            "stream": self.stream.state_dict(),
            "samples": dict(self.stats.samples),
            "tokens": dict(self.stats.tokens),
            "processed": self.processed,
            "bad_items": self.bad_items,
            "quarantine": list(self.quarantine.entries[self._read_skips :]),
        }

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        self.stats = MixtureStats(dict(state["samples"]), dict(state["tokens"]))
        self.processed, self.bad_items = int(state["processed"]), int(state["bad_items"])
        self.quarantine.entries = self.quarantine.entries[: self._read_skips] + list(state["quarantine"])
        self._bad_records = {(e["dataset"], e["line"]) for e in state["quarantine"]}
