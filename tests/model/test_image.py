import io
import random
import struct
import zlib

import pytest
import torch
from PIL import Image
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

from vlpipe.model.errors import SampleError
from vlpipe.model.image import (
    ImageProcessingConfig,
    decode_image,
    load_image,
    num_tiles,
    process_image,
    tile_grid,
)

SIZES = [(448, 448), (896, 448), (448, 896), (1000, 300), (300, 1000), (1344, 896), (50, 50), (2000, 2000),
         (640, 480), (480, 640), (1920, 1080), (447, 449), (896, 897), (3000, 200), (224, 448), (900, 900)]  # fmt: skip


@pytest.mark.parametrize(("min_tiles", "max_tiles"), [(1, 12), (1, 6), (2, 8), (1, 4)])
def test_grid_matches_transformers(min_tiles, max_tiles):
    for w, h in SIZES:
        ours = tile_grid(w, h, 448, min_tiles, max_tiles)
        theirs = get_optimal_tiled_canvas((h, w), (448, 448), min_tiles, max_tiles)
        assert ours == tuple(theirs), (w, h, min_tiles, max_tiles)


def test_ties_go_to_larger_grid_only_when_image_is_big_enough():
    # A square image ties between 1x1, 2x2 and 3x3 (same aspect). 2x2 is taken when the area exceeds half of it:
    # 0.5 * 448^2 * 4 = 401408 px → a 640x640 image (409600 px) gets 2x2, a 600x600 (360000 px) stays 1x1.
    assert tile_grid(640, 640, 448, 1, 12) == (2, 2)
    assert tile_grid(600, 600, 448, 1, 12) == (1, 1)
    # 3x3 needs area > 0.5 * 448^2 * 9 = 903168 px: 951x951 = 904401 px qualifies, 950x950 = 902500 does not.
    assert tile_grid(951, 951, 448, 1, 12) == (3, 3)
    assert tile_grid(950, 950, 448, 1, 12) == (2, 2)


def test_pixels_match_transformers_processor():
    cfg = ImageProcessingConfig(tile_size=64, max_tiles=6)
    hf = cfg.to_hf_image_processor()
    rng = random.Random(0)
    for w, h in [(64, 64), (130, 60), (60, 200), (256, 128)]:
        img = Image.new("RGB", (w, h))
        img.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(w * h)])
        ours = process_image(img, cfg)
        theirs = hf(images=[img], return_tensors="pt")
        assert ours.shape[0] == int(theirs["num_patches"][0]) == num_tiles(w, h, cfg)
        assert torch.allclose(ours, theirs["pixel_values"], atol=1e-4), (w, h)


def test_tiles_are_row_major_with_thumbnail_last():
    cfg = ImageProcessingConfig(tile_size=32, max_tiles=4, image_mean=(0, 0, 0), image_std=(1, 1, 1))
    img = Image.new("RGB", (64, 32))
    img.paste((255, 0, 0), (0, 0, 32, 32))  # left half red
    img.paste((0, 0, 255), (32, 0, 64, 32))  # right half blue
    tiles = process_image(img, cfg)
    assert tiles.shape == (3, 3, 32, 32)  # 2x1 grid + thumbnail
    assert tiles[0, 0].mean() > 0.9 and tiles[0, 2].mean() < 0.1  # first tile red
    assert tiles[1, 2].mean() > 0.9 and tiles[1, 0].mean() < 0.1  # second tile blue
    assert 0.3 < tiles[2, 0].mean() < 0.7  # thumbnail: half red


def test_jpeg_augmentation_is_seeded_and_training_only():
    cfg = ImageProcessingConfig(tile_size=32, max_tiles=1)
    img = Image.new("RGB", (32, 32))
    img.putdata([((x * 37) % 256, (x * 11) % 256, (x * 5) % 256) for x in range(32 * 32)])
    plain = process_image(img, cfg)
    a = process_image(img, cfg, augment=True, rng=random.Random(3))
    b = process_image(img, cfg, augment=True, rng=random.Random(3))
    assert torch.equal(a, b)
    assert not torch.allclose(a, plain, atol=1e-3)
    assert torch.equal(process_image(img, cfg), plain)


def test_config_rejects_inverted_ranges():
    with pytest.raises(ValueError, match="min_tiles"):
        ImageProcessingConfig(min_tiles=5, max_tiles=2)
    with pytest.raises(ValueError, match="jpeg_quality_min"):
        ImageProcessingConfig(jpeg_quality_min=99, jpeg_quality_max=80)


def test_bad_images_raise_sample_errors(tmp_path):
    with pytest.raises(SampleError) as err:
        decode_image(b"not an image at all", source="ds/line 3")
    assert err.value.reason == "corrupt_image" and "ds/line 3" in str(err.value)

    buf = io.BytesIO()
    Image.new("RGB", (400, 300)).save(buf, format="PNG")
    with pytest.raises(SampleError) as err:
        decode_image(buf.getvalue(), source="big.png", max_pixels=100_000)
    assert err.value.reason == "image_too_large" and "120000" in str(err.value)

    truncated = buf.getvalue()[: len(buf.getvalue()) // 2]
    with pytest.raises(SampleError) as err:
        decode_image(truncated, source="half.png")
    assert err.value.reason == "corrupt_image"
    assert " at 0x" not in str(err.value)  # PIL's messages can hold the buffer's repr; they are not shown

    # A decompression bomb PIL refuses inside Image.open (30000 x 30000, only the header): too large, not
    # corrupt, whatever our own cap is.
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30_000, 30_000, 8, 0, 0, 0, 0))
    with pytest.raises(SampleError) as err:
        decode_image(bomb + chunk(b"IEND", b""), source="bomb.png", max_pixels=10**12)
    assert err.value.reason == "image_too_large"

    with pytest.raises(SampleError) as err:
        load_image(str(tmp_path / "missing.png"))
    assert err.value.reason == "missing_image"
