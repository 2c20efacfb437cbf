"""InternVL meta JSON: dataset descriptions, their validation, and reading annotations with a quarantine.

A meta file maps dataset names to `{"root", "annotation", "repeat_time", "length", "data_augment",
"max_dynamic_patch"}`; `root` (images) and `annotation` (JSONL) are local paths or `s3://` URLs read through
fsspec. Bad lines are never dropped silently: each is recorded in a `Quarantine` with dataset, line and reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vlpipe.model.data.index import AnnotationIndex, annotation_index
from vlpipe.model.errors import SampleError
from vlpipe.model.files import (
    DEFAULT_LIMITS,
    DatasetRoots,
    NotRegularFileError,
    RangeReader,
    ReadLimits,
    line_too_long_detail,
    open_regular,
    parse_json_line,
)
from vlpipe.model.record import check_record
from vlpipe.model.storage import is_remote

MAX_META_BYTES = 16 * 1024 * 1024


class DatasetSpec(BaseModel):
    """One entry of an InternVL meta file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    root: str | None = Field(
        default="",
        description="Image root (local path or s3:// URL); null or empty: the annotation file's directory.",
    )
    allowed_roots: tuple[str, ...] = Field(
        default=(),
        description="Further directories (or s3:// prefixes) record paths may resolve into (absolute paths, "
        "symlinks); everything else outside the root is quarantined as outside_root.",
    )
    annotation: str = Field(min_length=1, description="JSONL annotation file (local path or s3:// URL).")
    repeat_time: float = Field(default=1.0, gt=0, description="Times per epoch; fractional takes a subset.")
    length: int | None = Field(default=None, ge=0, description="Number of lines, checked when read.")
    data_augment: bool = False
    max_dynamic_patch: int | None = Field(default=None, ge=1, description="Per-dataset max_tiles override.")
    min_dynamic_patch: int | None = Field(default=None, ge=1, description="Per-dataset min_tiles override.")
    min_num_frame: int = Field(default=8, ge=1, description="Fewest frames sampled from a video (training).")
    max_num_frame: int = Field(default=32, ge=1, description="Most frames sampled from a video (all frames "
                               "in evaluation).")  # fmt: skip
    system_prompt: str | None = Field(
        default=None,
        description="This dataset's system message (vlpipe's key; default: the stage's setting).",
    )
    sampling_method: Literal["rand", "middle"] = Field(
        default="rand", description="Frame sampling in training: a random frame per segment, or its middle."
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> DatasetSpec:
        if self.min_num_frame > self.max_num_frame:
            raise ValueError(
                f"min_num_frame ({self.min_num_frame}) exceeds max_num_frame ({self.max_num_frame})"
            )
        if (
            self.min_dynamic_patch
            and self.max_dynamic_patch
            and self.min_dynamic_patch > self.max_dynamic_patch
        ):
            raise ValueError("min_dynamic_patch exceeds max_dynamic_patch")
        return self


class MetaFile(BaseModel):
    """A validated meta file: dataset name → spec."""

    model_config = ConfigDict(frozen=True)

    path: str
    sha256: str
    datasets: dict[str, DatasetSpec]


class MetaError(ValueError):
    """A meta file is wrong (user mistake: fix the file, do not retry)."""


def load_meta(uri: str, *, storage_options: dict | None = None) -> MetaFile:
    """Read and validate a meta JSON file.

    Raises:
        MetaError: naming the dataset and key that is wrong, or the file when it is not a JSON object.
        FileNotFoundError: when the file does not exist.
    """
    try:
        with open_regular(uri, storage_options=storage_options) as f:
            raw = f.read(MAX_META_BYTES + 1)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"meta file {uri} does not exist") from exc
    except NotRegularFileError as exc:
        raise MetaError(f"meta file {exc}; point at a JSON file") from exc
    if len(raw) > MAX_META_BYTES:
        raise MetaError(f"{uri}: larger than {MAX_META_BYTES} bytes; a meta file lists datasets, not records")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MetaError(f"{uri}: not valid JSON in UTF-8 ({exc})") from exc
    if not isinstance(data, dict) or not data:
        raise MetaError(f"{uri}: expected a non-empty JSON object mapping dataset names to specs")
    datasets = {}
    for name, entry in data.items():
        if not isinstance(entry, dict):
            raise MetaError(f"{uri}: dataset {name!r} must be an object with root/annotation/repeat_time/...")
        try:
            datasets[name] = DatasetSpec.model_validate(entry)
        except ValidationError as exc:
            problems = "; ".join(f"key {'.'.join(map(str, e['loc']))!r}: {e['msg']}" for e in exc.errors())
            raise MetaError(f"{uri}: dataset {name!r}: {problems}") from exc
    return MetaFile(path=uri, sha256=hashlib.sha256(raw).hexdigest(), datasets=datasets)


@dataclass
class Quarantine:
    """Skipped items with reasons. Every skip is recorded; nothing is dropped silently."""

    entries: list[dict] = field(default_factory=list)
    max_examples: int = 1000  # full counts are kept; only the first examples keep their detail

    def add(self, dataset: str, line: int | None, reason: str, detail: str) -> None:
        self.entries.append({"dataset": dataset, "line": line, "reason": reason, "detail": detail[:500]})

    @property
    def counts(self) -> dict[str, int]:
        """Skips per `dataset/reason`."""
        return dict(Counter(f"{e['dataset']}/{e['reason']}" for e in self.entries))

    def __len__(self) -> int:
        return len(self.entries)

    def report(self) -> dict:
        """JSON-serialisable summary: total, counts per dataset/reason, and the first examples."""
        return {
            "total": len(self.entries),
            "counts": self.counts,
            "examples": self.entries[: self.max_examples],
        }

    def check(self, seen: int, max_bad_fraction: float, bad: int | None = None) -> None:
        """Fail when more than `max_bad_fraction` of `seen` items were skipped.

        Args:
            seen: items looked at.
            max_bad_fraction: the tolerated share of bad items.
            bad: bad items among them (default: every quarantine entry).

        Raises:
            ValueError: listing the counts per dataset and reason.
        """
        bad = len(self.entries) if bad is None else bad
        if seen and bad / seen > max_bad_fraction:
            raise ValueError(
                f"{bad} of {seen} samples were bad ({bad / seen:.1%} > "
                f"max_bad_fraction {max_bad_fraction:.1%}): {self.summary()}. "
                "Fix the data or raise max_bad_fraction."
            )

    def summary(self, top: int = 3) -> str:
        """The most frequent reasons with their counts and one example each (file line and detail)."""
        counts = Counter(f"{e['dataset']}/{e['reason']}" for e in self.entries)
        parts = []
        for key, n in counts.most_common(top):
            first = next(e for e in self.entries if f"{e['dataset']}/{e['reason']}" == key)
            parts.append(f"{key} x{n} (e.g. line {first['line']}: {first['detail'][:160]})")
        if len(counts) > top:
            parts.append(f"and {len(counts) - top} more reasons")
        return "; ".join(parts)


@dataclass
class Dataset:
    """A dataset of a meta file, opened through its annotation index: records are read and parsed on demand.

    Memory per record is the index's 16 bytes, whatever the record holds. `record(i)` reads line `i` of the
    index (a ranged read on `s3://`), checks it and returns it, or raises the `SampleError` that quarantines it.
    """

    name: str
    spec: DatasetSpec
    index: AnnotationIndex
    storage_options: dict | None = None
    _reader: RangeReader = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._reader = RangeReader(self.spec.annotation, self.storage_options)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def sha256(self) -> str:
        return self.index.sha256

    @property
    def lines(self) -> np.ndarray:
        """1-based line number of each record in the annotation file."""
        return self.index.numbers

    @property
    def is_multimodal(self) -> bool:
        return self.index.multimodal

    @property
    def roots(self) -> DatasetRoots:
        """Where this dataset's records may point (its root, else the annotation's directory, + allowed)."""
        return DatasetRoots(self.spec.root or annotation_dir(self.spec.annotation), self.spec.allowed_roots)

    def image_uri(self, relative: object, source: str | None = None) -> str:
        """The checked location of a record's image.

        Raises:
            SampleError: `outside_root` or `malformed` (see `DatasetRoots.resolve`).
        """
        return self.roots.resolve(relative, source or self.name)

    def sample_id(self, i: int) -> str:
        return f"{self.name}:{int(self.index.numbers[i])}"

    def raw(self, i: int) -> bytes:
        """The bytes of record `i` (one line, without its newline)."""
        return self._reader.read(int(self.index.offsets[i]), int(self.index.lengths[i]))

    def record(self, i: int) -> dict:
        """Record `i`, parsed and checked.

        Raises:
            SampleError: `bad_encoding`, `malformed_json` or `malformed` (naming the key).
        """
        sid = self.sample_id(i)
        record = check_record(parse_json_line(self.raw(i), sid), sid)
        record.setdefault("id", sid)
        return record

    def scan(self, quarantine: Quarantine) -> Iterator[dict]:
        """Every good record in file order; each bad one goes to `quarantine` (a full check of the file)."""
        for i in range(len(self)):
            try:
                yield self.record(i)
            except SampleError as exc:
                quarantine.add(self.name, int(self.index.numbers[i]), exc.reason, exc.detail)

    def close(self) -> None:
        self._reader.close()


def annotation_dir(annotation: str) -> str:
    """The directory of an annotation file (local path or URL)."""
    if is_remote(annotation):
        return posixpath.dirname(annotation.rstrip("/"))
    return os.path.dirname(os.path.abspath(annotation))


def read_dataset(
    name: str,
    spec: DatasetSpec,
    quarantine: Quarantine,
    *,
    storage_options: dict | None = None,
    limits: ReadLimits = DEFAULT_LIMITS,
) -> Dataset:
    """Open a dataset through its annotation index (built in one streaming pass, or loaded from the cache).

    Lines above `limits.max_line_bytes` go to `quarantine` now (`line_too_long`); every other check happens
    when a record is drawn (`Dataset.record`).

    Raises:
        FileNotFoundError: when the annotation file does not exist (a meta file error, not bad data).
        MetaError: when the annotation is not a regular file, or `length` is given and differs from the
            number of non-empty lines.
    """
    try:
        index = annotation_index(
            spec.annotation, max_line_bytes=limits.max_line_bytes, storage_options=storage_options
        )
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"dataset {name!r}: annotation {spec.annotation} does not exist") from exc
    except NotRegularFileError as exc:
        raise MetaError(f"dataset {name!r}: annotation {exc}; point at a JSONL file") from exc
    for number, size in index.too_long:
        quarantine.add(name, number, "line_too_long", line_too_long_detail(size, limits.max_line_bytes))
    if spec.length is not None and spec.length != index.lines:
        raise MetaError(
            f"dataset {name!r}: meta says length {spec.length} but {spec.annotation} has {index.lines} lines; "
            "fix the key 'length'"
        )
    return Dataset(name, spec, index, storage_options)
