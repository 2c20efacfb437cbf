"""The vlpipe demo dataset: a shape-counting visual reasoning task a ~0.7M-parameter model learns on a CPU.

`write_demo_dataset(out)` writes, through fsspec (a local path or an `s3://bucket/prefix` URL):

    meta_pretrain.json       InternVL meta file: text corpus, captions, reasoning train
    meta_sft.json            InternVL meta file: captions, reasoning train (step-by-step solutions)
    text/corpus.jsonl        pure-text conversations (no "image" key)
    captions/captions.jsonl  shape captions and simple questions, plus a few cropped sample photographs
    reasoning/train.jsonl    counting questions with three-step solutions (conversation format)
    reasoning/test.jsonl     held-out benchmark: {id, image, question, answer, solution}
    reasoning/prm.jsonl      items held out from SFT, same format: the source of on-policy PRM data
    video/train.jsonl        (when sizes ask for video) clips whose shapes appear one by one, counted at the end
    video/test.jsonl         held-out video benchmark: {id, video, question, answer, solution}
    mpo/pairs.jsonl          preference pairs: {id, image, question, chosen, rejected}
    prm/train.jsonl          step-labelled solutions: {id, image, question, steps, labels, answer, final_correct}
    images/...               every image; annotation "image" fields are relative to this root
    README.md                what the files are

The task, its solution format, the answer extraction rule (`extract_answer`: the last line must read
"So the answer is N.") and how wrong solutions and step labels are made are described in
`vlpipe.model.data.reasoning`. Everything is drawn from `random.Random` streams derived from `seed`, so the same
seed writes byte-identical files (the meta files name `out`, so they differ only in that path).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Iterator

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ConfigDict, Field

from vlpipe.model.data.corpus import (
    caption_conversation,
    load_photos,
    number_word,
    photo_conversation,
    photo_crop,
    plural,
    text_conversation,
)
from vlpipe.model.data.reasoning import (
    ReasoningItem,
    balanced_plan,
    extract_answer,
    is_correct,
    label_steps,
    perturb,
    sample_item,
)
from vlpipe.model.data.scenes import COLOURS, KINDS, MAX_SHAPES, Scene, png_bytes, render_scene, sample_scene

__all__ = [
    "DemoSizes",
    "DemoSummary",
    "Scene",
    "extract_answer",
    "is_correct",
    "iter_demo_texts",
    "label_steps",
    "render_scene",
    "write_demo_dataset",
]

logger = logging.getLogger(__name__)

MAX_DYNAMIC_PATCH = 6
PHOTO_FRACTION = 0.05  # of caption samples; real photos only add realism (and multi-tile images)
FILES = {
    "text": "text/corpus.jsonl",
    "captions": "captions/captions.jsonl",
    "reasoning_train": "reasoning/train.jsonl",
    "reasoning_test": "reasoning/test.jsonl",
    "reasoning_prm": "reasoning/prm.jsonl",
    "mpo": "mpo/pairs.jsonl",
    "prm": "prm/train.jsonl",
    "video_train": "video/train.jsonl",
    "video_test": "video/test.jsonl",
}
CONVERSATION_FILES = ("text", "captions", "reasoning_train", "video_train")
_OUTPUTS = (
    "meta_pretrain.json",
    "meta_sft.json",
    "README.md",
    "text",
    "captions",
    "reasoning",
    "mpo",
    "prm",
    "video",
    "images",
)
VIDEO_FRAMES = (
    8  # frames per demo clip; training samples 4-8 of them, evaluation the benchmark's video_frames
)
VIDEO_QUESTION = "How many shapes are there at the end of the video?"
_IMAGE_BATCH = 1000


class DemoSizes(BaseModel):
    """How many samples of each kind to write. The defaults size the `small` CPU demo."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text_corpus: int = Field(2000, ge=1, le=1_000_000)
    captions: int = Field(1500, ge=1, le=1_000_000)
    reasoning_train: int = Field(6000, ge=1, le=1_000_000)
    reasoning_test: int = Field(500, ge=1, le=1_000_000)
    # Items no training split holds (not in SFT): the policy samples its PRM data there, so its mistakes
    # look like its test-time mistakes and a critic trained on the SFT data has not memorised the answers.
    reasoning_prm: int = Field(4000, ge=1, le=1_000_000)
    mpo_pairs: int = Field(2000, ge=1, le=1_000_000)
    prm_solutions: int = Field(4000, ge=1, le=1_000_000)
    # The video task (off unless asked for: it would shift the measured results of the image recipes).
    video_train: int = Field(0, ge=0, le=1_000_000)
    video_test: int = Field(0, ge=0, le=1_000_000)

    @classmethod
    def tiny(cls) -> DemoSizes:
        """A few dozen of each: for tests."""
        return cls(
            text_corpus=20,
            captions=20,
            reasoning_train=50,
            reasoning_test=20,
            reasoning_prm=20,
            mpo_pairs=20,
            prm_solutions=40,
        )


class DemoSummary(BaseModel):
    """What `write_demo_dataset` wrote."""

    model_config = ConfigDict(frozen=True)

    out: str  # absolute path or URL of the output root
    seed: int
    sizes: DemoSizes
    counts: dict[str, int]  # relative file path -> lines (JSONL) or entries (meta); "images" -> image files
    paths: dict[
        str, str
    ]  # name (text, captions, ..., meta_pretrain, meta_sft, images) -> absolute path or URL
    skipped_photos: dict[str, str] = {}  # sample photograph -> why it could not be loaded


def _rng(seed: int, stream: str) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, so streams are independent and stable across runs.
    return random.Random(f"vlpipe-demo:{seed}:{stream}")


def _jsonl(records: Iterable[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def _root_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    if isinstance(fs, LocalFileSystem):
        return path
    return fs.unstrip_protocol(path)


def _existing(fs: fsspec.AbstractFileSystem, path: str, out: str) -> list[str]:
    if fs.isfile(path):
        raise FileExistsError(f"{out} is a file; pass a directory or a prefix for the demo dataset")
    try:
        return fs.ls(path, detail=False)
    except FileNotFoundError:
        return []


class _Writer:
    """Collects images and writes them in batches (concurrent puts on object stores)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        self.fs, self.root = fs, root
        self.pending: dict[str, bytes] = {}
        self.count = 0
        self.dirs: set[str] = set()

    def image(self, rel: str, data: bytes) -> None:
        directory = rel.rsplit("/", 1)[0]
        if directory not in self.dirs:
            self.fs.makedirs(f"{self.root}/images/{directory}", exist_ok=True)
            self.dirs.add(directory)
        self.pending[f"{self.root}/images/{rel}"] = data
        self.count += 1
        if len(self.pending) >= _IMAGE_BATCH:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.fs.pipe(self.pending)
            self.pending = {}

    def file(self, rel: str, data: bytes) -> None:
        if "/" in rel:
            self.fs.makedirs(f"{self.root}/{rel.rsplit('/', 1)[0]}", exist_ok=True)
        self.fs.pipe_file(f"{self.root}/{rel}", data)


def _reasoning_items(seed: int, stream: str, n: int, exclude: set[str]) -> list[ReasoningItem]:
    rng = _rng(seed, stream)
    items = []
    for question_kind, target in balanced_plan(rng, n):
        item = sample_item(rng, question_kind, target)
        while item.scene.key() in exclude:  # never a held-out scene outside the test split
            item = sample_item(rng, question_kind, target)
        items.append(item)
    return items


def _question_record(writer: _Writer, split: str, i: int, item: ReasoningItem) -> dict:
    """A benchmark-format record (test and PRM source splits); writes its image."""
    image = f"reasoning/{split}/{i:06d}.png"
    writer.image(image, png_bytes(render_scene(item.scene)))
    return {
        "id": f"reasoning-{split}-{i:06d}",
        "image": image,
        "question": item.question.text(),
        "answer": item.answer,
        "solution": item.solution,
    }


def _write_video_task(
    writer: _Writer, rng: random.Random, sizes: DemoSizes, held_out: set[str], put_jsonl
) -> None:
    """Clips of a scene whose 1-4 shapes appear one after another; the question counts them at the end."""
    from dataclasses import replace

    from vlpipe.model.video import encode_clip  # PyAV: imported only when a video task is asked for

    every = [(c, k) for c in COLOURS for k in KINDS]
    for split, n in (("train", sizes.video_train), ("test", sizes.video_test)):
        records = []
        for i in range(n):
            count = rng.randint(1, 4)
            scene = sample_scene(rng, [rng.choice(every) for _ in range(count)])
            while scene.key() in held_out:
                scene = sample_scene(rng, scene.objects())
            order = list(scene.shapes)
            rng.shuffle(order)
            frames = [
                render_scene(replace(scene, shapes=tuple(order[: -(-(f + 1) * count // VIDEO_FRAMES)])))
                for f in range(VIDEO_FRAMES)
            ]
            clip = f"video/{split}/{i:06d}.mp4"
            writer.image(clip, encode_clip(frames))
            solution = (
                f"At the end there {'is' if count == 1 else 'are'} {number_word(count)} "
                f"{plural('shape', count)}.\nSo the answer is {count}."
            )
            record_id = f"video-{split}-{i:06d}"
            if split == "train":
                records.append(
                    {"id": record_id, "video": clip, "conversations": [
                        {"from": "human", "value": f"<video>\n{VIDEO_QUESTION}"},
                        {"from": "gpt", "value": solution},
                    ]}
                )  # fmt: skip
            else:
                records.append(
                    {"id": record_id, "video": clip, "question": VIDEO_QUESTION, "answer": str(count),
                     "solution": solution}
                )  # fmt: skip
        put_jsonl(f"video_{split}", records)


def _conversation(record_id: str, image: str | None, human: str, gpt: str) -> dict:
    record: dict = {"id": record_id}
    if image is not None:
        record["image"] = image
    record["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
    return record


def write_demo_dataset(
    out: str,
    *,
    seed: int = 0,
    sizes: DemoSizes | None = None,
    overwrite: bool = False,
    storage_options: dict | None = None,
) -> DemoSummary:
    """Write the demo dataset to `out`.

    Args:
        out: a local directory or a URL such as `s3://bucket/prefix` (written through fsspec; S3 credentials
            and endpoint come from the environment, e.g. `AWS_ENDPOINT_URL`, or from `storage_options`).
        seed: the seed every sample is drawn from; the same seed gives byte-identical files.
        sizes: sample counts; default `DemoSizes()`.
        overwrite: replace the dataset's files if `out` is not empty (other files there are left alone).
        storage_options: extra fsspec options, e.g. `{"client_kwargs": {"endpoint_url": ...}}`.

    Returns:
        A `DemoSummary` with the line count and location of every file.

    Raises:
        FileExistsError: `out` is a file, or a non-empty directory/prefix and `overwrite` is false.
    """
    sizes = sizes or DemoSizes()
    fs, root = url_to_fs(out, **(storage_options or {}))
    root = root.rstrip("/")
    if _existing(fs, root, out):
        if not overwrite:
            raise FileExistsError(
                f"{out} is not empty; pass overwrite=True (--overwrite) to replace the demo dataset there, "
                "or choose an empty or new location"
            )
        for name in _OUTPUTS:
            if fs.exists(f"{root}/{name}"):
                fs.rm(f"{root}/{name}", recursive=True)
    fs.makedirs(root, exist_ok=True)
    root_url = _root_url(fs, root)
    writer = _Writer(fs, root)
    counts: dict[str, int] = {}

    def put_jsonl(name: str, records: list[dict]) -> None:
        writer.file(FILES[name], _jsonl(records))
        counts[FILES[name]] = len(records)

    # Text corpus.
    rng = _rng(seed, "text")
    put_jsonl(
        "text",
        [{"id": f"text-{i:06d}", "conversations": text_conversation(rng)} for i in range(sizes.text_corpus)],
    )

    # Held-out test split first: every other split rejects its scenes.
    test_items = _reasoning_items(seed, "reasoning-test", sizes.reasoning_test, set())
    held_out = {item.scene.key() for item in test_items}
    put_jsonl(
        "reasoning_test", [_question_record(writer, "test", i, item) for i, item in enumerate(test_items)]
    )

    train_items = _reasoning_items(seed, "reasoning-train", sizes.reasoning_train, held_out)
    # The PRM source split: neither a test scene nor a training scene.
    unseen = held_out | {item.scene.key() for item in train_items}
    prm_source_items = _reasoning_items(seed, "reasoning-prm", sizes.reasoning_prm, unseen)
    put_jsonl(
        "reasoning_prm", [_question_record(writer, "prm", i, item) for i, item in enumerate(prm_source_items)]
    )

    train_records = []
    for i, item in enumerate(train_items):
        image = f"reasoning/train/{i:06d}.png"
        writer.image(image, png_bytes(render_scene(item.scene)))
        train_records.append(
            _conversation(
                f"reasoning-train-{i:06d}", image, f"<image>\n{item.question.text()}", item.solution
            )
        )
    put_jsonl("reasoning_train", train_records)

    # Captions: shape scenes, and a few sample photographs.
    rng = _rng(seed, "captions")
    wanted = min(sizes.captions, max(1, round(PHOTO_FRACTION * sizes.captions)))
    photos, skipped = load_photos(limit=wanted)
    n_photos = wanted if photos else 0
    for name, reason in skipped.items():
        logger.warning("skipped sample photograph %s: %s", name, reason)
    caption_records = []
    every = [(c, k) for c in COLOURS for k in KINDS]
    for i in range(sizes.captions - n_photos):
        scene = sample_scene(rng, [rng.choice(every) for _ in range(rng.randint(1, MAX_SHAPES))])
        while scene.key() in held_out:
            scene = sample_scene(rng, scene.objects())
        image = f"captions/{i:06d}.png"
        writer.image(image, png_bytes(render_scene(scene)))
        conversation = caption_conversation(rng, scene)
        caption_records.append(
            _conversation(f"captions-{i:06d}", image, conversation[0]["value"], conversation[1]["value"])
        )
    names = sorted(photos)
    for j in range(n_photos):
        i = sizes.captions - n_photos + j
        name = names[j % len(names)]
        image = f"photos/{i:06d}.jpg"
        writer.image(image, photo_crop(rng, photos[name]))
        conversation = photo_conversation(rng, name)
        caption_records.append(
            _conversation(f"captions-{i:06d}", image, conversation[0]["value"], conversation[1]["value"])
        )
    put_jsonl("captions", caption_records)

    # Preference pairs: the reference solution against one with a wrong final answer.
    rng = _rng(seed, "mpo-errors")
    mpo_records = []
    for i, item in enumerate(_reasoning_items(seed, "mpo", sizes.mpo_pairs, held_out)):
        image = f"mpo/{i:06d}.png"
        writer.image(image, png_bytes(render_scene(item.scene)))
        rejected, _ = perturb(rng, item, require_wrong_answer=True)
        mpo_records.append(
            {
                "id": f"mpo-{i:06d}",
                "image": image,
                "question": item.question.text(),
                "chosen": item.solution,
                "rejected": "\n".join(rejected),
            }
        )
    put_jsonl("mpo", mpo_records)

    # Step-labelled solutions: half reference solutions, half perturbed (some still reach the right answer).
    rng = _rng(seed, "prm-errors")
    prm_items = _reasoning_items(seed, "prm", sizes.prm_solutions, held_out)
    wrong = [i % 2 == 1 for i in range(len(prm_items))]
    rng.shuffle(wrong)
    prm_records = []
    for i, item in enumerate(prm_items):
        image = f"prm/{i:06d}.png"
        writer.image(image, png_bytes(render_scene(item.scene)))
        steps = perturb(rng, item)[0] if wrong[i] else list(item.steps)
        prm_records.append(
            {
                "id": f"prm-{i:06d}",
                "image": image,
                "question": item.question.text(),
                "steps": steps,
                "labels": label_steps(steps, list(item.steps)),
                "answer": item.answer,
                "final_correct": is_correct("\n".join(steps), item.answer),
            }
        )
    put_jsonl("prm", prm_records)
    if sizes.video_train or sizes.video_test:
        _write_video_task(writer, _rng(seed, "video"), sizes, held_out, put_jsonl)
    writer.flush()

    images_url = f"{root_url}/images"

    def entry(name: str) -> dict:
        return {
            "root": images_url,
            "annotation": f"{root_url}/{FILES[name]}",
            "repeat_time": 1,
            "length": counts[FILES[name]],
            "data_augment": False,
            "max_dynamic_patch": MAX_DYNAMIC_PATCH,
        }

    meta_pretrain = {f"demo_{name}": entry(name) for name in ("text", "captions", "reasoning_train")}
    meta_sft = {f"demo_{name}": entry(name) for name in ("captions", "reasoning_train")}
    if sizes.video_train:
        video = {**entry("video_train"), "min_num_frame": VIDEO_FRAMES // 2, "max_num_frame": VIDEO_FRAMES}
        meta_pretrain["demo_video_train"] = meta_sft["demo_video_train"] = video
    writer.file("meta_pretrain.json", (json.dumps(meta_pretrain, indent=2) + "\n").encode())
    writer.file("meta_sft.json", (json.dumps(meta_sft, indent=2) + "\n").encode())
    counts["meta_pretrain.json"], counts["meta_sft.json"] = len(meta_pretrain), len(meta_sft)
    counts["images"] = writer.count
    writer.file("README.md", _readme(seed, counts).encode())
    if not isinstance(fs, LocalFileSystem):
        fs.invalidate_cache()

    paths = {name: f"{root_url}/{rel}" for name, rel in FILES.items()}
    paths.update(
        meta_pretrain=f"{root_url}/meta_pretrain.json",
        meta_sft=f"{root_url}/meta_sft.json",
        images=images_url,
    )
    return DemoSummary(
        out=root_url, seed=seed, sizes=sizes, counts=counts, paths=paths, skipped_photos=skipped
    )


def _readme(seed: int, counts: dict[str, int]) -> str:
    lines = [
        "# vlpipe demo dataset",
        "",
        f"Written by `vlpipe.model.data.demo.write_demo_dataset` with seed {seed}. Images are 64x64 PNG shape scenes",
        "(1-6 circles, squares and triangles in red, green, blue and yellow) plus a few JPEG crops of",
        "scikit-image sample photographs. Annotation `image` fields are relative to `images/`.",
        "",
        'The task: "How many <colour> shapes are there?" or "How many <shape>s are there?" (answers 0-4),',
        'answered in three lines: the shapes seen left to right, the ones asked about, "So the answer is N."',
        'The final answer is N from a last line reading exactly "So the answer is N.".',
        "",
        "| file | records | contents |",
        "|---|---|---|",
    ]
    described = {
        FILES["text"]: "pure-text conversations (shapes, colours, counting, arithmetic)",
        FILES["captions"]: "captions and simple questions about shape scenes and photographs",
        FILES["reasoning_train"]: "counting questions with step-by-step solutions (conversations)",
        FILES["reasoning_test"]: "held-out benchmark: question, answer, reference solution",
        FILES["reasoning_prm"]: "items held out from SFT (test format): where the policy samples PRM data",
        FILES["mpo"]: "preference pairs: chosen (correct) and rejected (wrong final answer) solutions",
        FILES["prm"]: "solutions with per-step labels (true until the first wrong step) and final_correct",
        "meta_pretrain.json": "InternVL meta file for pre-training: text, captions, reasoning train",
        "meta_sft.json": "InternVL meta file for SFT: captions, reasoning train",
        FILES["video_train"]: "video clips (8 frames) whose shapes appear one by one: count them at the end",
        FILES["video_test"]: "held-out video benchmark: question, answer, reference solution",
    }
    lines += [f"| `{rel}` | {counts[rel]} | {text} |" for rel, text in described.items() if rel in counts]
    lines += [f"| `images/` | {counts['images']} | all images |", ""]
    return "\n".join(lines)


def iter_demo_texts(
    out: str, *, storage_options: dict | None = None, keep_image_token: bool = False
) -> Iterator[str]:
    """Every human and gpt turn of the demo's conversation files (text, captions, reasoning train).

    For tokenizer training. The `<image>` placeholder (a special token the chat template handles) is removed
    unless `keep_image_token`.

    Raises:
        FileNotFoundError: `out` holds no demo dataset.
    """
    fs, root = url_to_fs(out, **(storage_options or {}))
    root = root.rstrip("/")
    for name in CONVERSATION_FILES:
        if name == "video_train" and not fs.exists(f"{root}/{FILES[name]}"):
            continue  # the video task is optional
        with fs.open(f"{root}/{FILES[name]}", "r", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                for turn in json.loads(line)["conversations"]:
                    value = turn["value"]
                    if not keep_image_token:
                        value = value.replace("<image>\n", "").replace("<image>", "")
                        value = value.replace("<video>\n", "Frame1: \n")  # what the encoder sees per frame
                    yield value
