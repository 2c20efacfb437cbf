"""Image processing shared by training, evaluation and serving: InternVL's dynamic-resolution tiling.

An image is resized to the grid of `tile_size` tiles (between `min_tiles` and `max_tiles` of them) whose aspect
ratio is closest to the image's, cut into row-major crops, and followed by a thumbnail of the whole image when
there is more than one tile. Ties between grids of the same aspect ratio go to the larger grid while the image
covers more than half of it. The grid is the one transformers' InternVL (GotOcr2) image processor picks.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, model_validator

from vlpipe.model.errors import SampleError
from vlpipe.model.files import DEFAULT_LIMITS, NotRegularFileError, check_size, open_regular, read_bounded

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Pixels above this are refused before decoding (decompression bombs); 40 MP covers real photos.
DEFAULT_MAX_PIXELS = 40_000_000


class ImageProcessingConfig(BaseModel):
    """Settings of the tiling and normalisation; stored with every checkpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tile_size: int = Field(default=448, gt=0)
    min_tiles: int = Field(default=1, ge=1)
    max_tiles: int = Field(default=12, ge=1)
    use_thumbnail: bool = True
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    jpeg_quality_min: int = Field(default=75, ge=1, le=100)
    jpeg_quality_max: int = Field(default=100, ge=1, le=100)
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, gt=0)

    @model_validator(mode="after")
    def _check(self) -> ImageProcessingConfig:
        if self.min_tiles > self.max_tiles:
            raise ValueError(f"min_tiles ({self.min_tiles}) must not exceed max_tiles ({self.max_tiles})")
        if self.jpeg_quality_min > self.jpeg_quality_max:
            raise ValueError("jpeg_quality_min must not exceed jpeg_quality_max")
        return self

    def to_hf_image_processor(self):
        """The equivalent transformers image processor (written into checkpoints for HF/vLLM users)."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        return GotOcr2ImageProcessorPil(
            crop_to_patches=True,
            min_patches=self.min_tiles,
            max_patches=self.max_tiles,
            size={"height": self.tile_size, "width": self.tile_size},
            image_mean=list(self.image_mean),
            image_std=list(self.image_std),
        )

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ImageProcessingConfig:
        """Read the settings back from a checkpoint's `preprocessor_config.json`/`processor_config.json`."""
        directory = Path(directory)
        for name in ("preprocessor_config.json", "processor_config.json"):
            path = directory / name
            if path.exists():
                data = json.loads(path.read_text())
                data = data.get("image_processor", data)
                return cls(
                    tile_size=data["size"]["height"],
                    min_tiles=data.get("min_patches", 1),
                    max_tiles=data.get("max_patches", 12),
                    image_mean=tuple(data["image_mean"]),
                    image_std=tuple(data["image_std"]),
                )
        raise FileNotFoundError(f"{directory} has no preprocessor_config.json; is it a vlpipe/HF checkpoint?")


def tile_grid(width: int, height: int, tile_size: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """The (columns, rows) grid for an image of `width`×`height` pixels.

    Candidates are all grids with min_tiles ≤ columns·rows ≤ max_tiles, visited by increasing tile count;
    the closest aspect ratio wins, and an exact tie goes to the larger grid when the image area exceeds half
    of that grid's area.
    """
    grids = sorted(
        {
            (c, r)
            for c in range(1, max_tiles + 1)
            for r in range(1, max_tiles + 1)
            if min_tiles <= c * r <= max_tiles
        },
        key=lambda g: g[0] * g[1],
    )
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def dynamic_tiles(image: Image.Image, cfg: ImageProcessingConfig) -> list[Image.Image]:
    """Cut `image` into its tiles (row-major), plus a thumbnail when there is more than one tile."""
    cols, rows = tile_grid(image.width, image.height, cfg.tile_size, cfg.min_tiles, cfg.max_tiles)
    s = cfg.tile_size
    resized = image.resize((cols * s, rows * s), Image.Resampling.BICUBIC)
    tiles = [resized.crop((c * s, r * s, (c + 1) * s, (r + 1) * s)) for r in range(rows) for c in range(cols)]
    if cfg.use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((s, s), Image.Resampling.BICUBIC))
    return tiles


def jpeg_recompress(image: Image.Image, quality: int) -> Image.Image:
    """Re-encode `image` as JPEG at `quality` (training-time augmentation)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def process_image(
    image: Image.Image,
    cfg: ImageProcessingConfig,
    *,
    augment: bool = False,
    rng: random.Random | None = None,
) -> torch.Tensor:
    """Tile and normalise one image: the single entry point used by training, evaluation and serving.

    Args:
        image: a decoded PIL image (any mode; converted to RGB).
        cfg: tiling and normalisation settings (read from the checkpoint at inference).
        augment: apply random JPEG re-compression (quality in [jpeg_quality_min, jpeg_quality_max]);
            training only.
        rng: the seeded generator that draws the JPEG quality.

    Returns:
        A float tensor of shape (num_tiles, 3, tile_size, tile_size).
    """
    image = image.convert("RGB")
    if augment:
        quality = (rng or random).randint(cfg.jpeg_quality_min, cfg.jpeg_quality_max)
        image = jpeg_recompress(image, quality)
    tiles = dynamic_tiles(image, cfg)
    array = np.stack([np.asarray(t, dtype=np.float32) for t in tiles]) / 255.0
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    array = (array - mean) / std
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def per_image_config(
    cfg: ImageProcessingConfig, num_images: int, rule: str = "divide"
) -> ImageProcessingConfig:
    """The tiling settings for each image of a record with `num_images` images.

    `divide` (InternVL's rule, the default) gives each image `max(1, max_tiles // num_images)` tiles, so a
    multi-image record costs about as many visual tokens as a single-image one; `full` gives every image
    `max_tiles`.
    """
    if rule == "full" or num_images <= 1:
        return cfg
    budget = max(1, cfg.max_tiles // num_images)
    return cfg.model_copy(update={"max_tiles": budget, "min_tiles": min(cfg.min_tiles, budget)})


def num_tiles(width: int, height: int, cfg: ImageProcessingConfig) -> int:
    """How many tiles `process_image` makes for an image of this size (without decoding it)."""
    cols, rows = tile_grid(width, height, cfg.tile_size, cfg.min_tiles, cfg.max_tiles)
    n = cols * rows
    return n + 1 if cfg.use_thumbnail and n > 1 else n


def decode_image(data: bytes, *, source: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes, refusing corrupt files and decompression bombs.

    Args:
        data: encoded image bytes.
        source: the file or sample name, used in error messages.
        max_pixels: largest width·height accepted.

    Raises:
        SampleError: with reason `corrupt_image` or `image_too_large`.
    """
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            if width * height > max_pixels:
                raise SampleError(
                    source,
                    "image_too_large",
                    f"image is {width}x{height} = {width * height} pixels, above the cap of {max_pixels}; "
                    "downscale it or raise max_pixels",
                )
            probe.load()
            return probe.convert("RGB")
    except SampleError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # PIL refuses images above twice its own pixel limit inside Image.open, before our check can run (and
        # warns above its limit, which is an error where warnings are errors).
        raise SampleError(
            source,
            "image_too_large",
            f"image has more pixels than the decoder accepts (a decompression bomb), above the cap of "
            f"{max_pixels}; downscale it",
        ) from None
    except UnidentifiedImageError:
        raise SampleError(
            source, "corrupt_image", "cannot decode image (not a known image format); re-export or remove it"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        # The exception's text is not shown: PIL's messages can hold object reprs of the buffer.
        raise SampleError(
            source,
            "corrupt_image",
            f"cannot decode image ({type(exc).__name__}: truncated or malformed data); re-export or remove it",
        ) from None


def load_image(
    uri: str,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_LIMITS.max_file_bytes,
    storage_options: dict | None = None,
) -> Image.Image:
    """Read and decode an image from a local path or `s3://` URL: a regular file of at most `max_bytes`.

    Paths taken from data must be checked first (`vlpipe.model.files.DatasetRoots.resolve`).

    Raises:
        SampleError: `missing_image`, `not_a_file`, `file_too_large`, or as `decode_image`.
    """
    data = read_bounded(uri, max_bytes=max_bytes, source=uri, storage_options=storage_options)
    return decode_image(data, source=uri, max_pixels=max_pixels)


def image_size(
    uri: str,
    *,
    source: str,
    max_bytes: int = DEFAULT_LIMITS.max_file_bytes,
    storage_options: dict | None = None,
) -> tuple[int, int]:
    """(width, height) of an image file from its header, without decoding the pixels.

    Raises:
        SampleError: `missing_image`, `not_a_file`, `file_too_large` (as `load_image` would) or
            `corrupt_image`; a decompression bomb is `image_too_large`.
    """
    try:
        with open_regular(uri, storage_options=storage_options) as f:
            check_size(f, max_bytes, uri, source)
            with Image.open(f) as probe:
                return probe.size
    except FileNotFoundError as exc:
        raise SampleError(
            source, "missing_image", f"{uri} not found; check the dataset root and path"
        ) from exc
    except SampleError:
        raise
    except NotRegularFileError as exc:
        raise SampleError(source, "not_a_file", str(exc)) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise SampleError(
            source,
            "image_too_large",
            "image is above the decoder's pixel limit (a decompression bomb); downscale it",
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise SampleError(
            source, "corrupt_image", f"cannot read image header ({type(exc).__name__})"
        ) from exc
