"""Preference pairs `{"id", "image", "question", "chosen", "rejected"}` (InternVL MMPR-like JSONL).

A pair becomes two conversations that share the prompt (the image and the question) and differ in the
assistant reply; the loss sees log-probs of the reply tokens only. Images are not augmented, so the
reference model's log-probs computed once at the start stay valid for every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlpipe.components.training.config import PairDataConfig
from vlpipe.components.training.records import RecordFile, default_image_root, read_records
from vlpipe.model.conversation import ConversationEncoder, EncodedSample
from vlpipe.model.files import DatasetRoots
from vlpipe.model.image import ImageProcessingConfig, load_image, process_image

DATASET = "mpo_pairs"


def validate_pair(record: dict) -> str | None:
    """None for a usable pair, else why not."""
    for key in ("question", "chosen", "rejected"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            return f"key {key!r} must be a non-empty string"
    if record["chosen"] == record["rejected"]:
        return "chosen and rejected are identical; a pair needs two different answers"
    if "image" in record and not isinstance(record["image"], str):
        return "key 'image' must be a path string"
    return None


@dataclass
class PairEncoder:
    """Encodes pair i of a record file into (chosen, rejected) samples."""

    records: RecordFile
    image_root: str
    encoder: ConversationEncoder
    image_cfg: ImageProcessingConfig
    v2pe_delta: float

    @classmethod
    def create(
        cls,
        data: PairDataConfig,
        encoder: ConversationEncoder,
        image_cfg: ImageProcessingConfig,
        v2pe_delta: float,
    ) -> PairEncoder:
        records = read_records(data.path, DATASET, validate_pair, data.max_bad_fraction)
        return cls(records, data.image_root or default_image_root(data.path), encoder, image_cfg, v2pe_delta)

    @property
    def pad_token_id(self) -> int:
        return int(self.encoder.tokenizer.pad_token_id)

    def __len__(self) -> int:
        return len(self.records.records)

    def encode(self, index: int) -> tuple[EncodedSample, EncodedSample]:
        """The chosen and rejected samples of pair `index`.

        Raises:
            SampleError: for a pair that cannot be encoded (missing image, too long).
        """
        record = self.records.records[index]
        sample_id = f"{DATASET}:{self.records.lines[index]}"
        pixels, tiles, prompt = None, [], record["question"]
        if record.get("image"):
            location = DatasetRoots(self.image_root).resolve(record["image"], sample_id)
            image = load_image(location, max_pixels=self.image_cfg.max_pixels)
            pixels = process_image(image, self.image_cfg)
            tiles = [pixels.shape[0]]
            if "<image>" not in prompt:
                prompt = "<image>\n" + prompt
        out = []
        for key in ("chosen", "rejected"):
            conversation = {
                "id": record.get("id", sample_id),
                "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": record[key]}],
            }
            if record.get("image"):
                conversation["image"] = record["image"]
            out.append(
                self.encoder.encode(
                    conversation, tiles, sample_id=sample_id, pixel_values=pixels, v2pe_deltas=self.v2pe_delta
                )
            )
        return out[0], out[1]
