"""Video records as InternVL reads them: frames sampled over segments, one tile each, `Frame{i}: <image>` lines.

A record `{"video": "clip.mp4", "conversations": [{"from": "human", "value": "<video>\\n..."}, ...]}` names a
video file (decoded with PyAV, which bundles FFmpeg) or a folder of frame images (sorted by the number in
their names, as InternVL's `read_frames_folder` does). Frames are sampled as InternVL's `get_frame_indices`
does: the video is cut into n equal segments and one frame is taken from each, at a random offset in training
(`rand`) or at the segment's middle in evaluation (`middle`); n is drawn between `min_num_frame` and
`max_num_frame` in training and is `max_num_frame` in evaluation; a video shorter than n frames repeats its
last frame. `<video>\\n` in the first human turn (prepended when absent) becomes one `Frame{i}: <image>\\n` line
per frame, the format InternVL's chat code and the inference runtimes use (InternVL's training script writes
`Frame-{i}:`; see docs/data.md). Each frame is one tile at the checkpoint's tile size.

Reads follow `vlpipe.model.files`: the path is confined to the dataset root (the caller resolves it), only
regular files are read, a video file is bounded by `max_video_bytes`, frames by `max_pixels`.
"""

from __future__ import annotations

import io
import os
import random
import re
from typing import Literal

from PIL import Image

from vlpipe.model.errors import SampleError
from vlpipe.model.files import NotRegularFileError, read_bounded
from vlpipe.model.storage import filesystem, is_remote

VIDEO_PLACEHOLDER = "<video>"
IMAGE_PLACEHOLDER = "<image>"
FrameSampling = Literal["rand", "middle"]
DEFAULT_MAX_VIDEO_BYTES = 1024 * 1024 * 1024
# A decoded video is walked frame by frame; this bounds the walk of a hostile file that claims endless frames.
MAX_DECODED_FRAMES = 200_000
_FRAME_NUMBER = re.compile(r"(\d+)(?=\.[A-Za-z0-9]+$)")
_FRAME_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def frame_count(min_num_frame: int, max_num_frame: int, sampling: FrameSampling, rng: random.Random) -> int:
    """How many frames to take: drawn in [min, max] for `rand` (training), `max` for `middle` (evaluation)."""
    return rng.randint(min_num_frame, max_num_frame) if sampling == "rand" else max_num_frame


def frame_indices(num_frames: int, length: int, sampling: FrameSampling, rng: random.Random) -> list[int]:
    """Which of `length` frames to take: one per equal segment, padded with the last when the video is short.

    `middle` takes each segment's middle frame; `rand` a uniformly random frame of each segment.
    """
    if length <= 0 or num_frames <= 0:
        raise ValueError("a video needs at least one frame")
    taken = min(num_frames, length)
    bounds = [int(length * i / taken) for i in range(taken + 1)]  # numpy linspace(0, length, taken+1) floors
    picks = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        last = max(start, end - 1)
        picks.append(start + rng.randrange(last - start + 1) if sampling == "rand" else (start + last) // 2)
    return picks + [picks[-1]] * (num_frames - taken)


def expand_video_prompt(turns: list[dict], num_frames: int, sample_id: str) -> list[dict]:
    """The conversation with `<video>` replaced by one `Frame{i}: <image>` line per frame.

    Raises:
        SampleError: `image_count_mismatch` when the conversation already holds `<image>` placeholders or more
            than one `<video>`.
    """
    if not turns or turns[0].get("from") not in ("human", "user"):
        raise SampleError(sample_id, "malformed", "a video record's first turn must be the human's")
    text = turns[0]["value"]
    total_video = sum(str(t.get("value", "")).count(VIDEO_PLACEHOLDER) for t in turns)
    if any(IMAGE_PLACEHOLDER in str(t.get("value", "")) for t in turns) or total_video > 1:
        raise SampleError(
            sample_id,
            "image_count_mismatch",
            "a video record holds exactly one <video> (in the first human turn) and no <image>",
        )
    if VIDEO_PLACEHOLDER not in text:
        text = f"{VIDEO_PLACEHOLDER}\n{text}"
    frames = "".join(f"Frame{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(num_frames))
    if f"{VIDEO_PLACEHOLDER}\n" in text:
        text = text.replace(f"{VIDEO_PLACEHOLDER}\n", frames, 1)
    else:
        text = text.replace(VIDEO_PLACEHOLDER, frames.rstrip("\n"), 1)
    return [{**turns[0], "value": text}, *turns[1:]]


def video_record(record: dict, num_frames: int, sample_id: str) -> dict:
    """A video record as the multi-image record the encoder reads (one placeholder image per frame)."""
    turns = expand_video_prompt(record["conversations"], num_frames, sample_id)
    out = {k: v for k, v in record.items() if k != "video"}
    return {**out, "conversations": turns, "image": [f"{record['video']}#{i}" for i in range(num_frames)]}


def is_frame_folder(location: str, storage_options: dict | None = None) -> bool:
    if is_remote(location):
        fs, path = filesystem(location, storage_options)
        return fs.isdir(path)
    return os.path.isdir(location)


def _frame_files(location: str, root_check, storage_options: dict | None) -> list[str]:
    if is_remote(location):
        fs, path = filesystem(location, storage_options)
        names = [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
        protocol = location.split("://", 1)[0]
        join = lambda n: f"{protocol}://{path.rstrip('/')}/{n}"  # noqa: E731
    else:
        names = os.listdir(location)
        join = lambda n: os.path.join(location, n)  # noqa: E731
    names = [n for n in names if os.path.splitext(n)[1].lower() in _FRAME_SUFFIXES]

    def key(name: str) -> tuple[int, str]:
        match = _FRAME_NUMBER.search(name)
        return (int(match.group(1)) if match else -1, name)

    # Every frame file is checked against the roots too: a symlinked frame must not lead outside.
    return [root_check(join(n)) for n in sorted(names, key=key)]


def read_video_frames(
    location: str,
    *,
    sample_id: str,
    num_frames: int,
    sampling: FrameSampling,
    rng: random.Random,
    root_check=lambda loc: loc,
    max_bytes: int = DEFAULT_MAX_VIDEO_BYTES,
    max_pixels: int,
    storage_options: dict | None = None,
) -> list[Image.Image]:
    """The sampled frames of a video file or frame folder, as RGB images.

    Args:
        location: the resolved (confined) path or URL of the video file or folder.
        sample_id: names the record in errors.
        num_frames: how many frames to return.
        sampling: `rand` (training) or `middle` (evaluation).
        rng: the record's seeded generator (`rand` offsets).
        root_check: resolves and confines a frame file of a folder (`DatasetRoots.resolve` bound to the record).
        max_bytes: the largest video file read.
        max_pixels: the largest frame accepted (width × height).
        storage_options: fsspec options for `s3://`.

    Raises:
        SampleError: `missing_video`, `not_a_file`, `file_too_large`, `corrupt_video`, `empty_video`,
            `image_too_large`, or a frame's image error.
    """
    from vlpipe.model.image import load_image

    if is_frame_folder(location, storage_options):
        files = _frame_files(location, root_check, storage_options)
        if not files:
            raise SampleError(sample_id, "empty_video", f"frame folder {location} holds no image files")
        picks = frame_indices(num_frames, len(files), sampling, rng)
        loaded: dict[int, Image.Image] = {}
        for i in sorted(set(picks)):
            loaded[i] = load_image(files[i], max_pixels=max_pixels, storage_options=storage_options)
        return [loaded[i] for i in picks]
    try:
        data = read_bounded(
            location, max_bytes=max_bytes, source=sample_id, missing_reason="missing_video",
            storage_options=storage_options,
        )  # fmt: skip
    except NotRegularFileError as exc:
        raise SampleError(sample_id, "not_a_file", str(exc)) from exc
    return _decode_frames(data, sample_id, num_frames, sampling, rng, max_pixels)


def count_video_frames(data: bytes, sample_id: str, max_pixels: int) -> int:
    """Frames of an encoded video (from the container, else by walking its packets; nothing is decoded)."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            stream = _video_stream(container, sample_id, max_pixels)
            if stream.frames:
                return int(stream.frames)
            return sum(1 for packet in container.demux(stream) if packet.size)
    except SampleError:
        raise
    except (av.FFmpegError, ValueError, IndexError, OSError) as exc:
        raise SampleError(
            sample_id, "corrupt_video", f"cannot read the video ({type(exc).__name__})"
        ) from exc


def _video_stream(container, sample_id: str, max_pixels: int):
    if not container.streams.video:
        raise SampleError(sample_id, "empty_video", "the file has no video stream")
    stream = container.streams.video[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > max_pixels:
        raise SampleError(
            sample_id, "image_too_large", f"frames are {width}x{height}, above max_pixels {max_pixels}"
        )
    return stream


def decode_video_frames(
    data: bytes,
    *,
    sample_id: str,
    num_frames: int,
    sampling: FrameSampling,
    rng: random.Random,
    max_pixels: int,
) -> list[Image.Image]:
    """The sampled frames of an encoded video held in memory (a served request's), as `read_video_frames`
    samples a file's.

    Raises:
        SampleError: `corrupt_video`, `empty_video`, `image_too_large`.
    """
    return _decode_frames(data, sample_id, num_frames, sampling, rng, max_pixels)


def _decode_frames(
    data: bytes, sample_id: str, num_frames: int, sampling: FrameSampling, rng: random.Random, max_pixels: int
) -> list[Image.Image]:
    """Count the frames, pick the indices, then decode up to the last pick, converting only the picked frames
    (a long video is never held decoded)."""
    length = count_video_frames(data, sample_id, max_pixels)
    if length == 0:
        raise SampleError(sample_id, "empty_video", "the video has no frame")
    state = rng.getstate()
    picks = frame_indices(num_frames, length, sampling, rng)
    images, decoded = _decode_picks(data, sample_id, set(picks), max_pixels)
    if decoded < length and any(i >= decoded for i in picks):
        # The container overstated its frames: pick again over the frames that decode.
        if decoded == 0:
            raise SampleError(sample_id, "empty_video", "the video has no decodable frame")
        rng.setstate(state)
        picks = frame_indices(num_frames, decoded, sampling, rng)
        images, _ = _decode_picks(data, sample_id, set(picks), max_pixels)
    return [images[i] for i in picks]


def _decode_picks(data: bytes, sample_id: str, wanted: set[int], max_pixels: int) -> tuple[dict, int]:
    import av

    images: dict[int, Image.Image] = {}
    last = max(wanted)
    decoded = 0
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = _video_stream(container, sample_id, max_pixels)
            for index, frame in enumerate(container.decode(stream)):
                decoded = index + 1
                if index in wanted:
                    images[index] = frame.to_image().convert("RGB")
                if index >= last or decoded > MAX_DECODED_FRAMES:
                    break
    except SampleError:
        raise
    except (av.FFmpegError, ValueError, IndexError, OSError, MemoryError) as exc:
        raise SampleError(
            sample_id, "corrupt_video", f"cannot decode the video ({type(exc).__name__}); re-encode it"
        ) from exc
    return images, decoded


def encode_clip(frames: list[Image.Image], fps: int = 4) -> bytes:
    """Frames → an H.264 MP4 (yuv420p, one encoder thread so the same frames give the same bytes)."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {"crf": "18", "preset": "veryfast"}
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_image(image.convert("RGB"))):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def frame_tile_config(cfg):
    """Tiling for video frames: exactly one tile per frame at the checkpoint's tile size."""
    return cfg.model_copy(update={"min_tiles": 1, "max_tiles": 1})


def mean_frames(min_num_frame: int, max_num_frame: int, sampling: FrameSampling) -> int:
    """The expected frame count (for token estimates, without decoding)."""
    return (min_num_frame + max_num_frame) // 2 if sampling == "rand" else max_num_frame
