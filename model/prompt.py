"""Images + a conversation → the inputs of generation, exactly as training encodes them: the one place where
evaluation, on-policy PRM data, the predictor and the MLflow pyfunc model build a generation prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from vlpipe.model.checkpoint import LoadedModel
from vlpipe.model.conversation import ConversationEncoder, EncodedSample
from vlpipe.model.image import ImageProcessingConfig, per_image_config, process_image
from vlpipe.model.video import frame_tile_config


def image_pixels(
    images: Sequence[Image.Image], cfg: ImageProcessingConfig, *, frames: bool = False
) -> tuple[list[int], torch.Tensor | None]:
    """Dynamic tiles of each image under `cfg`: the tile count of each and all tiles' pixel values in order.

    As in training: video frames (`frames=True`) are one tile each, and the k images of a multi-image prompt
    share the tile budget (`max(1, max_tiles // k)` each, InternVL's rule).
    """
    cfg = frame_tile_config(cfg) if frames else per_image_config(cfg, len(images))
    tiles = [process_image(image, cfg) for image in images]
    return [int(t.shape[0]) for t in tiles], (torch.cat(tiles) if tiles else None)


def generation_prompt(
    encoder: ConversationEncoder,
    model: LoadedModel,
    turns: Sequence[tuple[str, str]],
    images: Sequence[Image.Image],
    *,
    sample_id: str,
    frames: bool = False,
) -> EncodedSample:
    """The generation prompt of a conversation with its images: ids, V2PE positions, tiles and pixel values.

    Args:
        encoder: the model's conversation encoder (`max_length` caps the prompt).
        model: the checkpoint whose image settings and V2PE δ apply.
        turns: (role, text) pairs (`human`/`gpt`/`system`); `<image>` placeholders in the human turns, one per
            image (a single image without one goes before the first human turn's text).
        images: decoded images, in placeholder order.
        sample_id: names the prompt in errors.
        frames: the images are a video's frames (one tile each; the turn holds `Frame{i}: <image>` lines).

    Raises:
        SampleError: a placeholder/image mismatch, or a prompt longer than the encoder's `max_length`.
    """
    tiles, pixels = image_pixels(images, model.image_cfg, frames=frames)
    record: dict = {"id": sample_id, "conversations": [{"from": role, "value": text} for role, text in turns]}
    if images:
        record["image"] = [f"image-{i}" for i in range(len(images))]
    return encoder.encode(
        record,
        tiles,
        sample_id=sample_id,
        pixel_values=pixels,
        v2pe_deltas=model.v2pe_delta,
        add_generation_prompt=True,
    )
