"""Benchmark loading: the demo task's held-out JSONL and VLMEvalKit-style TSV files, with bad rows skipped.

Every item becomes a `BenchmarkItem`: the question shown to the model (multiple-choice options appended as
"A. ...\\nB. ..." lines), the encoded image bytes (checked to decode at load time, decoded again when the
item is evaluated so a large benchmark is not held decoded in memory), and the rule that extracts and checks
its final answer:

- `demo`: `vlpipe.model.data.demo.extract_answer` (a last line "So the answer is N.") compared with the reference,
  exactly `vlpipe.model.data.demo.is_correct`.
- `choice` (a TSV row with option columns): the text after the last "answer is" / "answer:" if any, else the
  last non-blank line, stripped of brackets, `*` and a final period, must be an option letter ("B", "(B)",
  "B. text") or an option's text; the reference is the `answer` letter (or an option's text, mapped to its
  letter).
- `free` (a TSV row without options): the same span, whitespace-collapsed and lower-cased; numbers compare
  by value ("2.50" = "2.5"; "," is read as a thousands separator, so "1,000" = "1000").
  Benchmark-specific judges (MathVista's GPT extraction, MMMU's option matching heuristics) are not
  reproduced; this is the strict, model-free variant (protocol `vlpipe`, the default for TSVs).
- `mcq` (protocol `vlmevalkit-mcq`): InternVL's VLMEvalKit prompt (hint, question, options, the instruction) and
  VLMEvalKit's matching (`vlpipe.components.evaluate.vlmevalkit.match_mcq`), optionally CircularEval groups.
- `mathvista` (protocol `vlmevalkit-mathvista`): the `question` cell as the prompt and VLMEvalKit's MathVista
  check (`vlpipe.components.evaluate.vlmevalkit.extract_mathvista`).

Extraction returns a canonical string, so two samples with equal extractions are equally correct (what the
majority vote relies on).

Bad rows (undecodable or missing image, missing answer or question, malformed line) are returned as
`SkippedRow`s with a reason; a benchmark without any usable row is an error naming the file.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Literal

from vlpipe.components.evaluate import vlmevalkit
from vlpipe.components.evaluate.config import BenchmarkSpec
from vlpipe.model.data.demo import extract_answer
from vlpipe.model.errors import SampleError
from vlpipe.model.files import DEFAULT_LIMITS, DatasetRoots, read_bounded
from vlpipe.model.image import decode_image

# VLMEvalKit TSVs carry their images inline (MMBench_DEV_EN is ~300 MB); a file above this is refused unread.
MAX_BENCHMARK_BYTES = 4 * 1024**3

ItemKind = Literal["demo", "choice", "free", "mcq", "mathvista"]
IMAGE_PLACEHOLDER = "<image>"
OPTION_LETTERS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
# VLMEvalKit stores an image once and lets later rows point at it by `index` (values this short are no base64).
_IMAGE_REFERENCE_MAX_LEN = 64
_ANSWER_MARK = re.compile(r"answer\s+is\s*:?|answer\s*:", re.IGNORECASE)
_LETTER_PREFIX = re.compile(r"^\(?([A-Z])(?:[).:]\s*|\s*$)")


class BenchmarkError(ValueError):
    """A benchmark cannot be evaluated at all (empty, every row bad, or a missing column). A user's mistake."""


@dataclass(frozen=True)
class SkippedRow:
    """A row that was not evaluated, and why."""

    benchmark: str
    path: str
    item_id: str
    reason: str
    detail: str

    def to_dict(self) -> dict:
        """JSON-able form."""
        return {
            "benchmark": self.benchmark,
            "path": self.path,
            "item": self.item_id,
            "reason": self.reason,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class BenchmarkItem:
    """One question to evaluate.

    Attributes:
        benchmark: the benchmark's name.
        item_id: its id (`id` of a JSONL line, `index` of a TSV row).
        question: the text shown to the model, options appended, without `<image>` placeholders.
        answer: the reference answer in canonical form (see the module docstring).
        kind: which extraction rule applies.
        images: encoded image bytes, in order (empty for a text-only item).
        frames: the images are a video's sampled frames (one tile each, `Frame{i}: <image>` lines).
        options: (letter, text) pairs of a multiple-choice item.
        raw_answer: the reference as written in the file.
        judge_question: the question a judge is shown (`mcq`: the `question` cell; `mathvista`: the prompt).
        group: the CircularEval group (`mcq` with `circular`); None: the item stands alone.
        question_type, answer_type, precision: MathVista's columns (`mathvista` only).
    """

    benchmark: str
    item_id: str
    question: str
    answer: str
    kind: ItemKind
    images: tuple[bytes, ...] = ()
    frames: bool = False
    options: tuple[tuple[str, str], ...] = ()
    raw_answer: str = ""
    judge_question: str = ""
    group: str | None = None
    question_type: str = ""
    answer_type: str = ""
    precision: int | None = None

    @property
    def prompt_text(self) -> str:
        """The user turn: one `<image>` placeholder line per image (`Frame{i}: <image>` per video frame), then
        the question."""
        if self.frames:
            return (
                "".join(f"Frame{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(len(self.images)))
                + self.question
            )
        return f"{IMAGE_PLACEHOLDER}\n" * len(self.images) + self.question

    def extract(self, text: str, judge: vlmevalkit.Judge | None = None) -> str | None:
        """The canonical final answer of a model answer, or None when none can be extracted.

        Args:
            text: the model's answer.
            judge: where the `mcq` and `mathvista` rules fail, the judge extracts (VLMEvalKit's judge step);
                ignored by the other kinds.
        """
        if self.kind == "demo":
            return extract_answer(text)
        if self.kind == "choice":
            return extract_choice(text, self.options)
        if self.kind == "mcq":
            return vlmevalkit.match_mcq(text, self.judge_question, dict(self.options), judge)
        if self.kind == "mathvista":
            return vlmevalkit.extract_mathvista(
                text,
                question=self.judge_question,
                question_type=self.question_type,
                answer_type=self.answer_type,
                choices=dict(self.options),
                precision=self.precision,
                reference=self.answer,
                judge=judge,
            )
        return extract_free(text)

    def is_correct(self, extracted: str | None) -> bool:
        """Whether an extracted answer (from `extract`) matches the reference."""
        return extracted is not None and extracted == self.answer


@dataclass
class LoadedBenchmark:
    """A benchmark's usable items and its skipped rows."""

    spec: BenchmarkSpec
    items: list[BenchmarkItem] = field(default_factory=list)
    skipped: list[SkippedRow] = field(default_factory=list)


# -- answer extraction ------------------------------------------------------------------------------------------
def _answer_span(text: str) -> str | None:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    span = lines[-1]
    for i in range(len(lines) - 1, -1, -1):  # the last "answer is ..." wins
        marks = list(_ANSWER_MARK.finditer(lines[i]))
        if marks:
            span = lines[i][marks[-1].end() :].strip()
            if not span and i + 1 < len(lines):  # "The answer is:\nB"
                span = lines[i + 1]
            break
    span = span.strip().strip("*").strip()
    span = re.sub(r"[.。]\s*$", "", span).strip()
    return span or None


def _normalise_text(text: str) -> str:
    return " ".join(text.strip().rstrip(".").split()).lower()


def extract_choice(text: str, options: tuple[tuple[str, str], ...]) -> str | None:
    """The option letter a multiple-choice answer picks, or None.

    Args:
        text: the model's answer.
        options: (letter, option text) pairs.
    """
    span = _answer_span(text)
    if span is None:
        return None
    letters = {letter for letter, _ in options}
    match = _LETTER_PREFIX.match(span)
    if match and match.group(1) in letters:
        return match.group(1)
    by_text = {_normalise_text(option): letter for letter, option in options}
    return by_text.get(_normalise_text(span))


def _canonical_number(text: str) -> str | None:
    candidate = text.replace(",", "").strip()
    try:
        value = float(candidate)
    except ValueError:
        return None
    if value != value or value in (float("inf"), float("-inf")):
        return None
    return repr(float(value))


def extract_free(text: str) -> str | None:
    """The canonical free-form final answer: a number's value (`repr(float)`) or lower-cased text."""
    span = _answer_span(text)
    if span is None:
        return None
    return canonical_free(span)


def canonical_free(answer: str) -> str:
    """Canonical form of a free-form answer (reference or extracted)."""
    return _canonical_number(answer) or _normalise_text(answer)


# -- loading ----------------------------------------------------------------------------------------------------
def _check_image(data: bytes, source: str) -> None:
    decode_image(data, source=source)


def _raise_if_empty(loaded: LoadedBenchmark) -> LoadedBenchmark:
    if not loaded.items:
        spec = loaded.spec
        if loaded.skipped:
            reasons = sorted({s.reason for s in loaded.skipped})
            raise BenchmarkError(
                f"benchmark {spec.name!r}: every row of {spec.path} is bad ({len(loaded.skipped)} rows; "
                f"reasons: {', '.join(reasons)}); fix the file (first: {loaded.skipped[0].item_id}: "
                f"{loaded.skipped[0].detail})"
            )
        raise BenchmarkError(
            f"benchmark {spec.name!r}: {spec.path} has no rows; point `path` at a non-empty file"
        )
    return loaded


def _read_text(spec: BenchmarkSpec, encoding: str) -> str:
    """The whole benchmark file as text: a regular file of at most MAX_BENCHMARK_BYTES, valid `encoding`."""
    try:
        data = read_bounded(
            spec.path, max_bytes=MAX_BENCHMARK_BYTES, source=spec.name, missing_reason="missing"
        )
    except SampleError as exc:
        if exc.reason == "missing":
            raise FileNotFoundError(
                f"benchmark file {spec.path} does not exist; check the benchmark path"
            ) from exc
        raise BenchmarkError(f"benchmark {spec.name!r}: {exc.detail}") from exc
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise BenchmarkError(
            f"benchmark {spec.name!r}: {spec.path} is not valid UTF-8 (byte {exc.start}); re-encode it as UTF-8"
        ) from exc


def _video_frames(spec: BenchmarkSpec, root: str, video: object, item_id: str) -> list[bytes]:
    """The evaluation frames of a row's video (segment middles, `spec.video_frames` of them) as PNG bytes.

    Raises:
        SampleError: as `vlpipe.model.video.read_video_frames`, or `outside_root`.
    """
    import random

    from vlpipe.model.image import DEFAULT_MAX_PIXELS
    from vlpipe.model.video import read_video_frames

    roots = DatasetRoots(root)
    frames = read_video_frames(
        roots.resolve(video, item_id),
        sample_id=item_id,
        num_frames=spec.video_frames,
        sampling="middle",
        rng=random.Random(0),  # unused by "middle": evaluation frames are deterministic
        root_check=lambda location: roots.resolve(location, item_id),
        max_pixels=DEFAULT_MAX_PIXELS,
    )
    out = []
    for frame in frames:
        buffer = io.BytesIO()
        frame.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def _demo_image_root(spec: BenchmarkSpec) -> str:
    if spec.image_root is not None:
        return spec.image_root
    if "://" in spec.path:
        protocol, rest = spec.path.split("://", 1)
        return f"{protocol}://{PurePosixPath(rest).parent.parent / 'images'}"
    return str(PurePosixPath(spec.path).parent.parent / "images")


def _demo_rows(text: str) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield number, line


def load_demo(spec: BenchmarkSpec) -> LoadedBenchmark:
    """Load a demo-format JSONL benchmark (see `BenchmarkSpec.format`).

    Raises:
        FileNotFoundError: the file does not exist.
        BenchmarkError: no usable row.
    """
    loaded = LoadedBenchmark(spec)
    text = _read_text(spec, "utf-8")
    root = _demo_image_root(spec)
    for number, line in _demo_rows(text):
        if spec.limit is not None and len(loaded.items) >= spec.limit:
            break
        item_id = f"line {number}"

        def skip(reason: str, detail: str, item_id: str = item_id) -> None:
            loaded.skipped.append(SkippedRow(spec.name, spec.path, item_id, reason, detail))

        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            skip("malformed", f"not valid JSON ({exc.msg})")
            continue
        if not isinstance(record, dict):
            skip("malformed", "a line must be a JSON object")
            continue
        item_id = str(record.get("id", item_id))
        question, answer = record.get("question"), record.get("answer")
        if not isinstance(question, str) or not question.strip():
            skip("missing_question", 'no "question" text', item_id)
            continue
        if answer is None or not str(answer).strip():
            skip("missing_answer", 'no "answer"; a benchmark item needs its reference answer', item_id)
            continue
        images: list[bytes] = []
        image_field = record.get("image")
        paths = [] if image_field is None else [image_field] if isinstance(image_field, str) else image_field
        video = record.get("video")
        try:
            if video is not None:
                images = _video_frames(spec, root, video, item_id)
                paths = []
            if not isinstance(paths, list):
                raise SampleError(item_id, "malformed", 'key "image" must be a path or a list of paths')
            for rel in paths:
                uri = DatasetRoots(root).resolve(rel, item_id)
                data = read_bounded(uri, max_bytes=DEFAULT_LIMITS.max_file_bytes, source=item_id)
                _check_image(data, uri)
                images.append(data)
        except SampleError as exc:
            skip(exc.reason, exc.detail, item_id)
            continue
        loaded.items.append(
            BenchmarkItem(
                benchmark=spec.name,
                item_id=item_id,
                question=question.strip(),
                answer=str(answer).strip(),
                kind="demo",
                images=tuple(images),
                frames=video is not None,
                raw_answer=str(answer),
            )
        )
    return _raise_if_empty(loaded)


def _tsv_rows(text: str, path: str) -> tuple[list[str], list[dict[str, str | None]]]:
    # Base64 images exceed csv's default 128 KiB field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t")
    columns = list(reader.fieldnames or [])
    rows = list(reader)
    missing = [c for c in ("index", "question", "answer") if c not in columns]
    if columns and missing:
        raise BenchmarkError(
            f"{path} lacks the column(s) {', '.join(missing)}; a VLMEvalKit TSV needs index, question, answer "
            f"(and image); found: {', '.join(columns)}"
        )
    return columns, rows


def _blank(value: str | None) -> bool:
    return value is None or not value.strip() or value.strip().lower() == "nan"


def _decode_base64(value: str, source: str) -> bytes:
    try:
        return base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SampleError(source, "corrupt_image", f"image is not valid base64 ({exc})") from exc


def _row_images(value: str, by_index: dict[str, str], source: str) -> list[bytes]:
    value = value.strip()
    if len(value) <= _IMAGE_REFERENCE_MAX_LEN and value in by_index:
        value = by_index[value].strip()
    if value.startswith("["):  # multi-image rows (MMMU): a Python list literal of base64 strings
        try:
            encoded = ast.literal_eval(value)
        except (ValueError, SyntaxError) as exc:
            raise SampleError(source, "corrupt_image", "image list is not a valid list literal") from exc
        if not isinstance(encoded, list) or not all(isinstance(v, str) for v in encoded):
            raise SampleError(source, "corrupt_image", "image list must hold base64 strings")
    else:
        encoded = [value]
    images = []
    for i, part in enumerate(encoded):
        name = source if len(encoded) == 1 else f"{source} image {i}"
        data = _decode_base64(part, name)
        _check_image(data, name)
        images.append(data)
    return images


def _images_by_index(rows: list[dict]) -> dict[str, str]:
    """Each row's inline image by its `index`, for rows whose `image` cell references another row's
    (VLMEvalKit's de-duplication: a short cell equal to another row's index)."""
    return {
        str(r["index"]).strip(): r["image"]
        for r in rows
        if r.get("index") is not None and not _blank(r.get("image"))
        and len(r["image"].strip()) > _IMAGE_REFERENCE_MAX_LEN
    }  # fmt: skip


def load_tsv(spec: BenchmarkSpec) -> LoadedBenchmark:
    """Load a VLMEvalKit-style TSV benchmark (see `BenchmarkSpec.format`).

    Rows with options (non-blank columns `A`, `B`, ...) get them appended to the question as "A. ..." lines and
    are scored by option letter. An `image` value of at most 64 characters that equals another row's `index`
    reuses that row's image (VLMEvalKit's de-duplication); a value starting with "[" is a list of images.

    Raises:
        FileNotFoundError: the file does not exist.
        BenchmarkError: a required column is missing, or no usable row.
    """
    loaded = LoadedBenchmark(spec)
    text = _read_text(spec, "utf-8-sig")
    columns, rows = _tsv_rows(text, spec.path)
    option_columns = [c for c in OPTION_LETTERS if c in columns]
    has_images = "image" in columns
    by_index = _images_by_index(rows) if has_images else {}
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        if spec.limit is not None and len(loaded.items) >= spec.limit:
            break
        item_id = str(row.get("index") or f"line {number}").strip()

        def skip(reason: str, detail: str, item_id: str = item_id) -> None:
            loaded.skipped.append(SkippedRow(spec.name, spec.path, item_id, reason, detail))

        if None in row or any(row.get(c) is None for c in columns):
            skip("malformed", f"line {number} has a different number of fields than the header")
            continue
        question, answer = row["question"], row["answer"]
        if _blank(question):
            skip("missing_question", "empty question")
            continue
        if _blank(answer):
            skip("missing_answer", "empty answer; a benchmark item needs its reference answer")
            continue
        images: list[bytes] = []
        if has_images:
            if _blank(row["image"]):
                skip("missing_image", "empty image cell")
                continue
            try:
                images = _row_images(row["image"], by_index, f"{spec.path}:{item_id}")
            except SampleError as exc:
                skip(exc.reason, exc.detail)
                continue
        options = tuple((c, row[c].strip()) for c in option_columns if not _blank(row[c]))
        question = question.strip()
        if options:
            letters = {letter for letter, _ in options}
            reference = answer.strip()
            if reference not in letters:
                by_text = {_normalise_text(o): letter for letter, o in options}
                if _normalise_text(reference) not in by_text:
                    skip(
                        "bad_answer",
                        f"answer {reference!r} is neither an option letter ({', '.join(sorted(letters))}) "
                        "nor an option's text",
                    )
                    continue
                reference = by_text[_normalise_text(reference)]
            question = question + "\n" + "\n".join(f"{letter}. {o}" for letter, o in options)
            kind: ItemKind = "choice"
        else:
            reference = canonical_free(answer)
            kind = "free"
        loaded.items.append(
            BenchmarkItem(
                benchmark=spec.name,
                item_id=item_id,
                question=question,
                answer=reference,
                kind=kind,
                images=tuple(images),
                options=options,
                raw_answer=answer,
            )
        )
    return _raise_if_empty(loaded)


def _mcq_item(spec: BenchmarkSpec, row: dict[str, str | None], option_columns: list[str]) -> dict:
    """The `mcq` fields of a VLMEvalKit multiple-choice row (build_multi_choice_prompt).

    Raises:
        SampleError: no options, or an answer that is not one of the row's option letters.
    """
    item_id = str(row["index"]).strip()
    options = tuple((c, str(row[c]).strip()) for c in option_columns if not vlmevalkit.is_na(row[c]))
    if not options:
        raise SampleError(item_id, "no_options", "a multiple-choice row needs option columns A, B, ...")
    hint = row.get("hint")
    hint = None if vlmevalkit.is_na(hint) else str(hint).strip()
    answer = str(row["answer"]).strip()
    letters = [letter for letter, _ in options]
    if answer not in letters:
        raise SampleError(
            item_id, "bad_answer", f"answer {answer!r} is not one of the option letters {', '.join(letters)}"
        )
    question = str(row["question"]).strip()
    group = None
    if spec.circular:
        try:
            group = vlmevalkit.circular_group(item_id, row.get("g_index"))
        except ValueError as exc:
            raise SampleError(item_id, "malformed", f"CircularEval needs integer indices ({exc})") from exc
    return {
        "question": vlmevalkit.build_mcq_prompt(question, hint, dict(options)),
        "answer": answer,
        "kind": "mcq",
        "options": options,
        "judge_question": question,
        "group": group,
    }


def _mathvista_item(row: dict[str, str | None]) -> dict:
    """The `mathvista` fields of a VLMEvalKit MathVista row.

    Raises:
        SampleError: an unknown question type, unreadable choices, or a reference that `post_check` cannot read.
    """
    item_id = str(row["index"]).strip()
    question_type = str(row.get("question_type") or "").strip()
    answer_type = str(row.get("answer_type") or "").strip()
    answer = str(row["answer"]).strip()
    precision_cell = row.get("precision")
    precision = None
    if not vlmevalkit.is_na(precision_cell):
        try:
            precision = int(float(str(precision_cell)))
        except ValueError as exc:
            raise SampleError(item_id, "malformed", f"precision {precision_cell!r} is not a number") from exc
    options: tuple[tuple[str, str], ...] = ()
    if question_type == "multi_choice":
        try:
            choices = vlmevalkit.parse_choices(str(row.get("choices") or ""))
        except ValueError as exc:
            raise SampleError(item_id, "malformed", str(exc)) from exc
        options = tuple((OPTION_LETTERS[i], text) for i, text in enumerate(choices[: len(OPTION_LETTERS)]))
        option_cell = row.get("answer_option")
        if not vlmevalkit.is_na(option_cell):
            reference = str(option_cell).strip()
        else:  # no answer_option column: the option whose text is the answer
            matches = [letter for letter, text in options if text == answer]
            reference = matches[0] if len(matches) == 1 else ""
        if reference not in {letter for letter, _ in options}:
            raise SampleError(
                item_id, "bad_answer", f"answer {answer!r} / answer_option {option_cell!r} names no choice"
            )
    elif question_type == "free_form":
        reference = vlmevalkit.mathvista_value(answer, question_type, answer_type, {}) or answer
    else:
        raise SampleError(
            item_id, "malformed", f"question_type {question_type!r} is neither multi_choice nor free_form"
        )
    return {
        "question": str(row["question"]).strip(),
        "answer": reference,
        "kind": "mathvista",
        "options": options,
        "judge_question": str(row["question"]).strip(),
        "question_type": question_type,
        "answer_type": answer_type,
        "precision": precision,
    }


_VLMEVALKIT_COLUMNS = {
    "vlmevalkit-mcq": ("index", "question", "answer"),
    "vlmevalkit-mathvista": ("index", "question", "answer", "question_type", "answer_type"),
}


def load_vlmevalkit(spec: BenchmarkSpec) -> LoadedBenchmark:
    """Load a VLMEvalKit TSV under a `vlmevalkit-*` protocol (`spec.protocol`).

    Rows without an answer (an MMBench test split: VLMEvalKit submits those to the MMBench server) are skipped
    as `missing_answer`. With `spec.circular`, the rows of a group (`g_index`, else `index % 1e6`) stand or fall
    together: a group with a skipped row is skipped whole (`incomplete_circular_group`), and `limit` counts
    groups.

    Raises:
        FileNotFoundError: the file does not exist.
        BenchmarkError: a required column is missing, or no usable row.
    """
    loaded = LoadedBenchmark(spec)
    text = _read_text(spec, "utf-8-sig")
    columns, rows = _tsv_rows(text, spec.path)
    missing = [c for c in _VLMEVALKIT_COLUMNS[str(spec.protocol)] if c not in columns]
    if columns and missing:
        raise BenchmarkError(
            f"{spec.path} lacks the column(s) {', '.join(missing)} that protocol {spec.protocol!r} reads; "
            f"found: {', '.join(columns)}"
        )
    option_columns = [c for c in OPTION_LETTERS if c in columns]
    has_images = "image" in columns
    by_index = _images_by_index(rows) if has_images else {}
    bad_groups: dict[str, str] = {}
    for number, row in enumerate(rows, start=2):
        if not spec.circular and spec.limit is not None and len(loaded.items) >= spec.limit:
            break
        item_id = str(row.get("index") or f"line {number}").strip()
        group = None
        if spec.circular:
            try:
                group = vlmevalkit.circular_group(item_id, row.get("g_index"))
            except (ValueError, TypeError):
                group = item_id

        def skip(reason: str, detail: str, item_id: str = item_id, group: str | None = group) -> None:
            loaded.skipped.append(SkippedRow(spec.name, spec.path, item_id, reason, detail))
            if group is not None:
                bad_groups.setdefault(group, item_id)

        if None in row or any(row.get(c) is None for c in columns):
            skip("malformed", f"line {number} has a different number of fields than the header")
            continue
        if _blank(row["question"]):
            skip("missing_question", "empty question")
            continue
        if _blank(row["answer"]):
            split = (row.get("split") or "").strip()
            skip(
                "missing_answer",
                "no reference answer"
                + (f" (split {split!r}: VLMEvalKit scores it on the benchmark's server)" if split else ""),
            )
            continue
        try:
            fields = (
                _mcq_item(spec, row, option_columns)
                if spec.protocol == "vlmevalkit-mcq"
                else _mathvista_item(row)
            )
            images: list[bytes] = []
            if has_images:
                if _blank(row["image"]):
                    raise SampleError(item_id, "missing_image", "empty image cell")
                images = _row_images(row["image"], by_index, f"{spec.path}:{item_id}")
        except SampleError as exc:
            skip(exc.reason, exc.detail)
            continue
        loaded.items.append(
            BenchmarkItem(
                benchmark=spec.name,
                item_id=item_id,
                images=tuple(images),
                raw_answer=str(row["answer"]),
                **fields,
            )
        )
    if spec.circular:
        kept: list[BenchmarkItem] = []
        groups_seen: list[str] = []
        for item in loaded.items:
            if item.group in bad_groups:
                loaded.skipped.append(
                    SkippedRow(
                        spec.name, spec.path, item.item_id, "incomplete_circular_group",
                        f"row {bad_groups[item.group]} of circular group {item.group} was skipped",
                    )
                )  # fmt: skip
                continue
            if item.group not in groups_seen:
                if spec.limit is not None and len(groups_seen) >= spec.limit:
                    continue
                groups_seen.append(str(item.group))
            kept.append(item)
        loaded.items = kept
    return _raise_if_empty(loaded)


def load_benchmark(spec: BenchmarkSpec) -> LoadedBenchmark:
    """Load a benchmark of either format under its protocol, with its bad rows reported in `skipped`.

    Raises:
        FileNotFoundError: the file does not exist.
        BenchmarkError: empty, every row bad, or a required TSV column is missing.
    """
    if spec.format == "demo":
        return load_demo(spec)
    if spec.protocol in _VLMEVALKIT_COLUMNS:
        return load_vlmevalkit(spec)
    return load_tsv(spec)
