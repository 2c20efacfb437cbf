"""Preference pairs in MMPR's format: `{"image", "question", "chosen", "rejected"}` (`id` optional), one JSONL
file or MMPR's InternVL meta file over many (`vlpipe.components.training.records.read_record_set`).

A pair becomes two conversations that share the prompt (the images and the question) and differ in the
assistant reply; the loss sees log-probs of the reply tokens only. As in InternVL's MPO reader
(`internvl_chat/internvl/train/internvl_chat_mpo.py`):

* `image` a path: one image; a question without `<image>` gets `<image>\\n` in front;
* `image` a list of paths: one `<image>` per image, where the question has them (none are added), and each
  image gets `max(1, max_tiles // number of images)` tiles (`max_tiles`: the dataset's `max_dynamic_patch`,
  else the checkpoint's);
* no `image` (absent, null, "" or []): a text-only pair.

Images are not augmented, so the reference model's log-probs computed once at the start stay valid for every
epoch. Every path goes through the dataset's `DatasetRoots` before it is opened.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from vlpipe.components.training.config import PairDataConfig
from vlpipe.components.training.records import RecordSet, RecordSource, read_record_set
from vlpipe.model.conversation import ConversationEncoder, EncodedSample
from vlpipe.model.data.meta import Quarantine
from vlpipe.model.data.mixing import epoch_order
from vlpipe.model.image import ImageProcessingConfig, load_image, process_image

DATASET = "mpo_pairs"
IMAGE_PLACEHOLDER = "<image>"


def pair_images(record: dict) -> list[str]:
    """The image paths of a pair (a validated record): [] for text-only."""
    image = record.get("image")
    if not image:
        return []
    return [image] if isinstance(image, str) else list(image)


def validate_pair(record: dict) -> str | None:
    """None for a usable pair, else why not (the key and what it must be)."""
    for key in ("question", "chosen", "rejected"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            return f"key {key!r} must be a non-empty string, got {type(record.get(key)).__name__}"
    if record["chosen"] == record["rejected"]:
        return "chosen and rejected are identical; a pair needs two different answers"
    if "id" in record and not isinstance(record["id"], str | int):
        return f"key 'id' must be a string or integer, got {type(record['id']).__name__}"
    image = record.get("image")
    paths_ok = isinstance(image, list) and all(isinstance(i, str) and i.strip() for i in image)
    if image is not None and not isinstance(image, str) and not paths_ok:
        return f"key 'image' must be a path or a list of paths, got {type(image).__name__}"
    for key in ("chosen", "rejected"):
        if IMAGE_PLACEHOLDER in record[key]:
            return f"key {key!r} contains {IMAGE_PLACEHOLDER}; only the question may hold images"
    images, found = len(pair_images(record)), record["question"].count(IMAGE_PLACEHOLDER)
    if found != images and not (images == 1 and found == 0):
        return (
            f"the question has {found} {IMAGE_PLACEHOLDER} placeholders for {images} images; put one "
            f"{IMAGE_PLACEHOLDER} where each image goes"
        )
    return None


@dataclass
class PairEncoder:
    """Encodes pair i of a record set (all its datasets, in order) into (chosen, rejected) samples."""

    pairs: RecordSet
    encoder: ConversationEncoder
    image_cfg: ImageProcessingConfig
    v2pe_delta: float
    data: PairDataConfig

    @classmethod
    def create(
        cls,
        data: PairDataConfig,
        encoder: ConversationEncoder,
        image_cfg: ImageProcessingConfig,
        v2pe_delta: float,
    ) -> PairEncoder:
        """Read and check every pair (bad lines quarantined under their dataset and line).

        Raises:
            FileNotFoundError, MetaError, ValueError: see `read_record_set`.
        """
        pairs = read_record_set(
            data.path,
            DATASET,
            validate_pair,
            data.max_bad_fraction,
            image_root=data.image_root,
            limits=data.limits,
        )
        return cls(pairs, encoder, image_cfg, v2pe_delta, data)

    def __post_init__(self) -> None:
        # Where each source's pairs start in the pair numbering (and the total): a pair is found by bisection,
        # so nothing here grows with the number of pairs.
        self._starts = [0]
        for src in self.pairs.sources:
            self._starts.append(self._starts[-1] + len(src.file))

    def _locate(self, index: int) -> tuple[RecordSource, int]:
        """(source, record index in its file) of pair `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"pair {index} out of range ({len(self)} pairs)")
        k = bisect.bisect_right(self._starts, index) - 1
        return self.pairs.sources[k], index - self._starts[k]

    @property
    def pad_token_id(self) -> int:
        return int(self.encoder.tokenizer.pad_token_id)

    @property
    def path(self) -> str:
        return self.pairs.path

    @property
    def quarantine(self) -> Quarantine:
        """The lines skipped when reading (encoding failures are counted by the stage)."""
        return self.pairs.quarantine

    def __len__(self) -> int:
        return self._starts[-1]

    def source(self, index: int) -> tuple[str, int]:
        """(dataset name, line number) of pair `index`."""
        src, i = self._locate(index)
        return src.name, src.file.line(i)

    def epoch_indices(self) -> list[int]:
        """The pair indices of one epoch: each dataset's pairs `repeat_time` times (a fractional part takes
        a seeded subset, as in the SFT mixture), in dataset order (the stage's sampler shuffles)."""
        out, offset = [], 0
        for src in self.pairs.sources:
            n = len(src.file)
            order = epoch_order(n, src.repeat_time, self.data.seed, src.name, 0)
            out += sorted(offset + i for i in order)
            offset += n
        return out

    def _tile_config(self, src: RecordSource, num_images: int) -> ImageProcessingConfig:
        budget = src.max_dynamic_patch or self.image_cfg.max_tiles
        max_tiles = max(1, budget // max(num_images, 1))
        min_tiles = min(self.image_cfg.min_tiles, max_tiles)
        return self.image_cfg.model_copy(update={"max_tiles": max_tiles, "min_tiles": min_tiles})

    def encode(self, index: int) -> tuple[EncodedSample, EncodedSample]:
        """The chosen and rejected samples of pair `index`.

        Raises:
            SampleError: for a pair that cannot be encoded (a path outside the dataset's roots, a missing,
                oversized or corrupt image, placeholders that do not match, too long).
        """
        src, i = self._locate(index)
        record = src.file.record(i)
        sample_id = f"{src.name}:{src.file.line(i)}"
        paths = pair_images(record)
        cfg = self._tile_config(src, len(paths))
        tiles = []
        for path in paths:
            image = load_image(
                src.roots.resolve(path, sample_id),
                max_pixels=cfg.max_pixels,
                max_bytes=self.data.limits.max_file_bytes,
            )
            tiles.append(process_image(image, cfg))
        pixels = torch.cat(tiles) if tiles else None
        num_tiles = [int(t.shape[0]) for t in tiles]
        prompt = record["question"]
        if len(paths) == 1 and IMAGE_PLACEHOLDER not in prompt:
            prompt = f"{IMAGE_PLACEHOLDER}\n{prompt}"
        out = []
        for key in ("chosen", "rejected"):
            conversation: dict = {
                "id": sample_id,
                "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": record[key]}],
            }
            if paths:
                conversation["image"] = paths
            out.append(
                self.encoder.encode(
                    conversation,
                    num_tiles,
                    sample_id=sample_id,
                    pixel_values=pixels,
                    v2pe_deltas=self.v2pe_delta,
                )
            )
        return out[0], out[1]
